"""Spiking neuron layers built from snnTorch ``Leaky``: the one place neuron dynamics are configured.

The paper's LIF (SpikingJelly ``LIFNode``, ``decay_input=True``, hard reset; Liu et al. 2022) is

    H[t] = V[t-1] + (I[t] - V[t-1]) / tau
    S[t] = Heaviside(H[t] - v_th)
    V[t] = H[t] * (1 - S[t])

Writing beta = 1 - 1/tau and U = H, this is snnTorch's ``Leaky`` with reset-to-zero and a one-step
reset delay, fed with the scaled current I / tau:

    U[t] = beta * (1 - S[t-1]) * U[t-1] + I[t] / tau,      S[t] = Heaviside(U[t] - threshold)

With ``reset="subtract"`` the reset term is ``- S[t-1] * threshold`` instead. The IF neuron has no leak:
beta = 1 and the current enters unscaled (SpikingJelly ``IFNode``: H[t] = V[t-1] + I[t]).

Spikes are Heaviside forward and a surrogate backward, sg'(x) = d/dx surrogate(x) (ATan, alpha = 2:
sg'(x) = alpha / 2 / (1 + (pi / 2 * alpha * x)^2)). The forward pass does not depend on whether the
gradient also flows through the spike in the reset term; the backward does (``detach_reset``):

- ``detach_reset=True`` (snnTorch's ``Leaky``, SpikingJelly ``detach_reset=True``): S in the reset is
  a constant, dV/dH = 1 - S[t] (zero reset) or 1 (subtract).
- ``detach_reset=False`` (SpikingJelly's default, which Liu et al.'s code uses): with
  V[t] = H[t] (1 - S[t]) + v_reset S[t] and v_reset = 0, dV/dH = 1 - S[t] + (v_reset - H[t]) sg'(H[t] - v_th);
  for the subtract reset, V[t] = H[t] - S[t] v_th, dV/dH = 1 - v_th sg'(H[t] - v_th).

The ``fused`` engine computes both; the ``snntorch`` engine steps ``Leaky``, whose reset is always
detached, so it refuses ``detach_reset=False``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import snntorch as snn
import torch
from snntorch import surrogate as snn_surrogate
from torch import nn

from spikeq.snn import engine

NEURONS = ("lif", "if")
RESETS = ("zero", "subtract")
# name -> (snnTorch factory, name of its shape argument, default value of that argument)
SURROGATES: dict[str, tuple[Callable[..., Callable], str, float]] = {
    "atan": (snn_surrogate.atan, "alpha", 2.0),
    "sigmoid": (snn_surrogate.sigmoid, "slope", 25.0),
    "fast_sigmoid": (snn_surrogate.fast_sigmoid, "slope", 25.0),
    "triangular": (snn_surrogate.triangular, "threshold", 1.0),
    "straight_through": (snn_surrogate.straight_through_estimator, "", 0.0),
}
ENGINES = ("fused", "snntorch")


def _choice(kind: str, value: str, allowed: tuple[str, ...] | dict) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


def make_surrogate(name: str, slope: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return snnTorch's surrogate spike function ``name`` (Heaviside forward, smooth backward).

    :param name: one of ``SURROGATES`` (``atan`` is the paper's, alpha = 2)
    :param slope: the surrogate's shape parameter (atan: alpha; sigmoid / fast_sigmoid: slope);
        ``None`` takes the paper's / snnTorch's default
    """
    factory, arg, default = SURROGATES[_choice("surrogate", name, SURROGATES)]
    if not arg:
        return factory()
    return factory(**{arg: default if slope is None else float(slope)})


def check_engine(engine_name: str, detach_reset: bool) -> None:
    """Raise ``ValueError`` where the engine cannot give the reset's gradient asked for.

    snnTorch's ``Leaky`` always detaches its reset signal (``mem_reset`` returns it detached), so the
    ``snntorch`` engine, which steps ``Leaky``, cannot let the gradient through the reset.
    """
    if engine_name == "snntorch" and not detach_reset:
        raise ValueError(
            "engine='snntorch' cannot run detach_reset=False: snnTorch's Leaky always detaches its reset; "
            "use engine='fused' (both settings) or detach_reset=True"
        )


@dataclass(frozen=True)
class NeuronSpec:
    """How every spiking layer of a network behaves.

    :param neuron: ``"lif"`` (leaky, the paper's DSQN) or ``"if"`` (no leak, the DSQN-IF ablation)
    :param tau: membrane time constant of the LIF neuron (paper: 2.0); beta = 1 - 1/tau
    :param threshold: firing threshold (paper: 1.0)
    :param reset: ``"zero"`` (hard reset, the paper) or ``"subtract"`` (soft reset)
    :param surrogate: name of the surrogate gradient (paper: ``"atan"``)
    :param surrogate_slope: the surrogate's shape parameter (``None``: its default; atan alpha 2)
    :param learn_beta: make each layer's decay a trainable parameter
    :param learn_threshold: make each layer's threshold a trainable parameter
    :param detach_reset: cut the gradient through the reset (snnTorch's ``Leaky``); False lets it flow
        through the spike in the reset term, as SpikingJelly's ``detach_reset=False`` and the paper's
        code do. The forward pass is the same either way.
    """

    neuron: str = "lif"
    tau: float = 2.0
    threshold: float = 1.0
    reset: str = "zero"
    surrogate: str = "atan"
    surrogate_slope: float | None = None
    learn_beta: bool = False
    learn_threshold: bool = False
    detach_reset: bool = True

    def __post_init__(self) -> None:
        _choice("neuron", self.neuron, NEURONS)
        _choice("reset", self.reset, RESETS)
        _choice("surrogate", self.surrogate, SURROGATES)
        if self.neuron == "lif" and not self.tau > 1.0:
            raise ValueError(
                f"tau={self.tau!r} gives no valid leak: beta = 1 - 1/tau must lie in (0, 1), "
                "so tau must be > 1 (use neuron='if' for no leak)"
            )
        if not self.threshold > 0:
            raise ValueError(f"threshold={self.threshold!r} must be > 0")
        # Every surrogate's shape parameter is a width or steepness: 0 divides by zero in the backward
        # pass, and a negative one turns the sign of every surrogate gradient.
        slope = self.surrogate_slope
        if slope is not None and (
            isinstance(slope, bool) or not isinstance(slope, numbers.Real) or not 0 < slope < math.inf
        ):
            raise ValueError(
                f"surrogate_slope={slope!r} must be a finite number > 0 (or None: the surrogate's default)"
            )
        if slope is not None and not SURROGATES[self.surrogate][1]:
            raise ValueError(
                f"surrogate_slope={slope!r}: surrogate {self.surrogate!r} has no shape parameter; "
                "leave it None or choose one of "
                + ", ".join(name for name, (_, arg, _) in SURROGATES.items() if arg)
            )
        for name in ("learn_beta", "learn_threshold", "detach_reset"):
            # A truthy string such as "False" would silently mean True.
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")

    @property
    def beta(self) -> float:
        """Membrane decay per step: 1 - 1/tau for LIF, 1 for IF."""
        return 1.0 - 1.0 / self.tau if self.neuron == "lif" else 1.0

    @property
    def input_scale(self) -> float:
        """Factor on the input current: 1/tau for LIF (SpikingJelly ``decay_input``), 1 for IF."""
        return 1.0 / self.tau if self.neuron == "lif" else 1.0


class SpikingLayer(nn.Module):
    """A layer of spiking neurons over a whole sequence (multi-step): current ``[T, B, ...]`` -> spikes.

    The neuron itself is an snnTorch ``Leaky`` (``self.leaky``); this module scales the input current
    and runs it over T steps with the chosen engine. State starts at zero on every call.

        U[t] = beta * (1 - S[t-1]) * U[t-1] + input_scale * I[t]     (reset "zero")
        U[t] = beta * U[t-1] + input_scale * I[t] - S[t-1] * threshold (reset "subtract")
        S[t] = Heaviside(U[t] - threshold)

    With ``fire=False`` the neurons only integrate (no spikes, no reset): the non-spiking output
    neurons of the membrane readouts, U[t] = beta * U[t-1] + input_scale * I[t]. ``spec.detach_reset``
    chooses the reset's gradient (see the module docstring).

    :param spec: the neuron model
    :param fire: whether the neurons fire and reset (False: leaky integrators)
    :param backend: where the fused engine runs the recurrence: one of ``engine.BACKENDS``
    :param workspace: where the fused engine takes its large buffers from (None: fresh memory); a
        network gives all its layers its own
    """

    def __init__(
        self,
        spec: NeuronSpec,
        fire: bool = True,
        backend: str = "auto",
        workspace: engine.Workspace | None = None,
    ) -> None:
        super().__init__()
        if backend not in engine.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(engine.BACKENDS)}")
        self.spec = spec
        self.fire = fire
        self.backend = backend
        self.workspace = workspace
        self.input_scale = spec.input_scale
        self.detach_reset = spec.detach_reset
        self.leaky = snn.Leaky(
            beta=torch.tensor(spec.beta),
            threshold=torch.tensor(spec.threshold),
            spike_grad=make_surrogate(spec.surrogate, spec.surrogate_slope),
            learn_beta=spec.learn_beta,
            learn_threshold=spec.learn_threshold,
            reset_mechanism=spec.reset if fire else "none",
        )
        # snnTorch registers every neuron in a global list for its global resets; this project
        # never uses them (state is passed explicitly), so keep instances collectable.
        snn.SpikingNeuron.instances.remove(self.leaky)
        # The state dict holds floating-point tensors only, as SB3 expects of a policy (its save/load
        # round trips perturb every entry with rand_like): the reset mechanism is the spec's, and the
        # spikes are 0/1 (snnTorch's graded spikes, which the fused engine does not scale by, are
        # refused on load, see _check_loaded_state).
        for name in ("reset_mechanism_val", "graded_spikes_factor"):
            self.leaky.register_buffer(name, getattr(self.leaky, name), persistent=False)
        self._register_load_state_dict_pre_hook(self._check_loaded_state)

    def _check_loaded_state(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Take state dicts saved before these buffers left it: the reset mechanism must be the spec's
        (snnTorch's code: 0 subtract, 1 zero, 2 none) and the spikes unscaled."""
        reset = state_dict.pop(prefix + "leaky.reset_mechanism_val", None)
        if reset is not None and int(reset) != int(self.leaky.reset_mechanism_val):
            raise ValueError(
                f"the state dict's reset_mechanism_val={int(reset)} is not this layer's "
                f"{int(self.leaky.reset_mechanism_val)} (reset={self.spec.reset!r}, fire={self.fire})"
            )
        factor = state_dict.pop(prefix + "leaky.graded_spikes_factor", None)
        if factor is not None and float(factor) != 1.0:
            raise ValueError(
                f"graded_spikes_factor={float(factor)} is not supported: spikeq's spikes are 0/1 "
                "(snnTorch's graded spikes are not implemented by the fused engine); allowed: 1.0"
            )

    def forward(
        self, current: torch.Tensor, num_steps: int, engine_name: str = "fused"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the neurons for ``num_steps`` steps.

        :param current: input current ``[T, B, ...]`` or ``[1, B, ...]`` (the same current at every
            step: direct/static input)
        :param num_steps: T
        :param engine_name: ``"fused"`` (time-batched) or ``"snntorch"`` (``Leaky`` called per step)
        :return: spikes and membrane potentials, both ``[T, B, ...]`` (spikes are all zero when
            ``fire`` is False)
        """
        if engine_name == "fused":
            # A static current stays [1, B, ...]: the engine never expands it to T copies.
            return engine.leaky_sequence(
                current,
                self.leaky,
                fire=self.fire,
                num_steps=num_steps,
                input_scale=self.input_scale,
                detach_reset=self.detach_reset,
                backend=self.backend,
                workspace=self.workspace,
            )
        if engine_name != "snntorch":
            raise ValueError(f"unknown engine {engine_name!r}; allowed: {', '.join(ENGINES)}")
        check_engine(engine_name, self.detach_reset)
        if current.shape[0] == 1 and num_steps > 1:
            current = current.expand(num_steps, *current.shape[1:])
        mem = torch.zeros_like(current[0])
        spikes, mems = [], []
        for current_t in current.unbind(0):
            spk, mem = self.step(current_t, mem)
            spikes.append(spk)
            mems.append(mem)
        self.clear_state()
        return torch.stack(spikes), torch.stack(mems)

    def spikes(self, current: torch.Tensor, num_steps: int, recompute: bool = False) -> torch.Tensor:
        """The spikes of ``forward`` with the fused engine, without the membrane (hidden layers).

        Lighter and faster than ``forward``: the membrane is not returned, and under autograd its
        buffer is reused for the gradient (so the backward can run only once per forward).

        :param current: input current ``[T, B, ...]`` or ``[1, B, ...]`` (static)
        :param num_steps: T
        :param recompute: recompute the membrane in the backward pass instead of keeping it (less
            memory for a static current, one more forward loop)
        :return: spikes ``[T, B, ...]``
        """
        return engine.spike_sequence(
            current,
            self.leaky,
            num_steps,
            self.input_scale,
            recompute,
            self.detach_reset,
            self.backend,
            self.workspace,
        )

    def step(self, current: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step through snnTorch's ``Leaky`` (the step-by-step engine).

        :param current: ``[B, ...]`` input current at this step, unscaled
        :param mem: ``[B, ...]`` membrane potential after the previous step (zeros at t = 0)
        :return: spikes and the new membrane potential, ``[B, ...]``
        """
        check_engine("snntorch", self.detach_reset)
        spk, mem = self.leaky(current * self.input_scale, mem)
        # snnTorch's surrogates return float32 spikes whatever the input dtype.
        return (spk.to(mem.dtype) if self.fire else torch.zeros_like(mem)), mem

    def clear_state(self) -> None:
        """Drop the membrane that ``Leaky`` keeps as an attribute (and the graph it holds)."""
        self.leaky.mem = torch.zeros(0, device=self.leaky.mem.device)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"neuron={s.neuron}, tau={s.tau}, threshold={s.threshold}, reset={s.reset}, "
            f"surrogate={s.surrogate}, detach_reset={s.detach_reset}, fire={self.fire}, "
            f"backend={self.backend}"
        )
