// The membrane recurrence on the CPU: all T steps of a layer in one call per direction.
//
// The same loops as the Triton kernels (kernels.py), on PyTorch's threads: each thread takes a range of
// the layer's neurons and runs all T steps over it, a step at a time, its state in arrays of the range.
// Built with floating-point contraction off (no fused multiply-add), so the forward's float operations
// and their order are engine.torch_backend.integrate's and its spikes and membranes are bit-identical
// to the PyTorch loop's, hence to snnTorch Leaky's. The adjoint is torch_backend.adjoint for snnTorch's
// ATan surrogate; its sums run in another order, so gradients agree within float rounding.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// reset codes: snnTorch's reset_mechanism_val, as torch_backend.RESET_*
constexpr int64_t SUBTRACT = 0, ZERO = 1;

template <typename T>
void forward_range(const T* current, T* mem, T* spikes, int64_t n, int64_t steps, int64_t current_stride,
                   int64_t begin, int64_t end, T beta, T threshold, T scale, int64_t reset, bool scaled) {
  const int64_t width = end - begin;
  std::vector<T> u(width), previous(width);  // U[t-1], and 1 - S[t-1] (zero reset) or S[t-1] (subtract)
  for (int64_t k = 0; k < width; ++k) {
    u[k] = 0;
    previous[k] = reset == ZERO ? T(0 <= threshold) : T(0 > threshold);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const T* drive_at = current + t * current_stride + begin;
    T* mem_at = mem ? mem + t * n + begin : nullptr;
    T* spikes_at = spikes ? spikes + t * n + begin : nullptr;
    for (int64_t k = 0; k < width; ++k) {
      const T drive = scaled ? drive_at[k] * scale : drive_at[k];
      const T decayed = u[k] * beta;
      T now;
      if (reset == ZERO) {
        now = decayed * previous[k] + drive;
        previous[k] = T(now <= threshold);
      } else if (reset == SUBTRACT) {
        now = (decayed + drive) - previous[k] * threshold;
        previous[k] = T(now > threshold);
      } else {
        now = decayed + drive;
      }
      u[k] = now;
      if (mem_at) mem_at[k] = now;
      if (spikes_at) spikes_at[k] = T(now > threshold);
    }
  }
}

// The ATan surrogate's numbers (torch_backend._surrogate_product): y = offset + slope * u is
// pi / 2 * alpha * (u - threshold); input_scale * grad * ATan'(u - threshold) = grad / (k + k * y^2);
// ATan'(u - threshold) = half_alpha / (1 + y^2).
template <typename T>
struct Surrogate {
  T slope, offset, k, half_alpha;
};

template <typename T>
void adjoint_range(const T* mem, const T* grad_spikes, const T* grad_mem, T* out, T* beta_terms,
                   T* threshold_terms, int64_t n, int64_t steps, int64_t begin, int64_t end, T beta,
                   T threshold, T scale, Surrogate<T> atan, int64_t reset, bool is_static, bool detach_reset) {
  // H[t+1] (= input_scale * dL/dU[t+1]), the sum of H over t (static current), and the terms of
  // dL/dbeta and dL/dthreshold, each per neuron
  const int64_t width = end - begin;
  std::vector<T> carry(width), summed(width), beta_sum(width), threshold_sum(width);
  const std::vector<T> zeros(width);  // read for a gradient that is absent, so the loop has no branch
  const bool zero_reset = reset == ZERO;
  const T subtract_reset = reset == SUBTRACT;
  const T through_reset = reset != ZERO && reset != SUBTRACT ? 0 : !detach_reset;  // the spike's gradient
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* u_at = mem + t * n + begin;
    const T* grad_spikes_at = grad_spikes ? grad_spikes + t * n + begin : zeros.data();
    const T* grad_mem_at = grad_mem ? grad_mem + t * n + begin : zeros.data();
    for (int64_t k = 0; k < width; ++k) {
      const T u = u_at[k];
      const T y = atan.offset + u * atan.slope;
      const T through_spikes = grad_spikes_at[k] / (atan.k + atan.k * (y * y));  // input_scale * dL/dS * S'
      const T h = through_spikes + grad_mem_at[k] * scale;
      const T keep = T(u <= threshold), spike = T(u > threshold);
      // ATan'(u - threshold) where the gradient flows through the spike in the reset term, else 0
      const T derivative = through_reset * (atan.half_alpha / (1 + y * y));
      beta_sum[k] += carry[k] * (zero_reset ? u * keep : u);
      threshold_sum[k] += carry[k] * (zero_reset ? beta * u * derivative : threshold * derivative)
                          - carry[k] * subtract_reset * spike - through_spikes;
      // dU[t+1]/dU[t]
      const T factor = zero_reset ? beta * (keep - u * derivative) : beta - threshold * derivative;
      carry[k] = h + carry[k] * factor;
    }
    // H[t] out, after every read of U[t] in the range (out may be mem)
    T* out_at = out + t * n + begin;
    for (int64_t k = 0; k < width; ++k) {
      if (is_static) {
        summed[k] += carry[k];
      } else {
        out_at[k] = carry[k];
      }
    }
  }
  for (int64_t k = 0; k < width; ++k) {
    if (is_static) out[begin + k] = summed[k];
    beta_terms[begin + k] = beta_sum[k];
    threshold_terms[begin + k] = threshold_sum[k];
  }
}

// Runs body(begin, end) on ranges of the n neurons, one a thread; a layer of fewer than 32k neuron-steps
// a thread stays on one.
template <typename Body>
void over_neurons(int64_t n, int64_t steps, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, steps));
  at::parallel_for(0, n, grain, body);
}

// torch_backend.integrate: U into mem, S into spikes (either may be undefined). current: [T, B, ...],
// or [1, B, ...] for the same current at every step; all contiguous, of one floating dtype.
void integrate(const torch::Tensor& current, const c10::optional<torch::Tensor>& mem,
               const c10::optional<torch::Tensor>& spikes, int64_t steps, double beta, double threshold,
               int64_t reset, double input_scale) {
  const int64_t n = current[0].numel();
  const int64_t current_stride = current.size(0) == 1 ? 0 : n;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "integrate", [&] {
    const scalar_t* in = current.data_ptr<scalar_t>();
    scalar_t* u = mem ? mem->data_ptr<scalar_t>() : nullptr;
    scalar_t* s = spikes ? spikes->data_ptr<scalar_t>() : nullptr;
    over_neurons(n, steps, [&](int64_t begin, int64_t end) {
      forward_range<scalar_t>(in, u, s, n, steps, current_stride, begin, end, scalar_t(beta),
                              scalar_t(threshold), scalar_t(input_scale), reset, input_scale != 1);
    });
  });
}

// torch_backend.adjoint for the ATan surrogate: H = dL/dI into out (its first n entries: the sum over
// the steps, for a static current), and per neuron the terms of dL/dbeta and dL/dthreshold (times
// input_scale) into terms[0] and terms[1]. out may be mem: each entry is read before it is written.
void adjoint(const torch::Tensor& mem, const c10::optional<torch::Tensor>& grad_spikes,
             const c10::optional<torch::Tensor>& grad_mem, const torch::Tensor& out, const torch::Tensor& terms,
             double beta, double threshold, int64_t reset, double input_scale, double alpha, bool is_static,
             bool detach_reset) {
  const int64_t steps = mem.size(0), n = mem[0].numel();
  const double slope = M_PI / 2 * alpha;
  AT_DISPATCH_FLOATING_TYPES(mem.scalar_type(), "adjoint", [&] {
    using T = scalar_t;
    const Surrogate<T> atan{T(slope), T(threshold) * T(-slope), T(2 / (alpha * input_scale)), T(alpha / 2)};
    const T* gs = grad_spikes ? grad_spikes->data_ptr<T>() : nullptr;
    const T* gm = grad_mem ? grad_mem->data_ptr<T>() : nullptr;
    T* beta_terms = terms.data_ptr<T>();
    over_neurons(n, steps, [&](int64_t begin, int64_t end) {
      adjoint_range<T>(mem.data_ptr<T>(), gs, gm, out.data_ptr<T>(), beta_terms, beta_terms + n, n, steps,
                       begin, end, T(beta), T(threshold), T(input_scale), atan, reset, is_static,
                       detach_reset);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("integrate", &integrate, "the membrane recurrence over all steps");
  m.def("adjoint", &adjoint, "its backward, for the ATan surrogate");
}
