"""Compile spikeq's Triton kernels for an NVIDIA H200 (sm_90) on any machine, and report on the PTX.

Triton compiles to PTX and cubin without a GPU (its wheel carries ptxas); only a launch needs one.
``tests/test_kernels.py`` runs this in a child process, because the interpreter its own process uses
(TRITON_INTERPRET=1) replaces the compiler. Prints one JSON line per variant: the kernel, its
constexpr arguments, the dtype, whether the PTX has a fused multiply-add, and its size.

    python tests/kernel_ptx.py
"""

import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spikeq.snn.engine import kernels

H200 = GPUTarget("cuda", 90, 32)
POINTER_ARGS = {
    "_forward_kernel": ("current", "mem", "spikes", "constants"),
    "_adjoint_kernel": (
        "mem",
        "grad_spikes",
        "grad_mem",
        "out",
        "beta_terms",
        "threshold_terms",
        "constants",
    ),
}
INT_ARGS = ("n", "steps", "current_stride", "last")


def ptx(kernel_name: str, constexprs: dict, dtype: str) -> str:
    """The PTX of one variant, compiled with the launch options ``spikeq.snn.engine.kernels`` uses."""
    kernel = getattr(kernels, kernel_name)
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in POINTER_ARGS[kernel_name]:
            signature[name] = f"*{dtype}"
        elif name in INT_ARGS:
            signature[name] = "i64" if name == "last" else "i32"
        else:
            signature[name] = "constexpr"
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    options = kernels._EXACT if kernel_name == "_forward_kernel" else kernels._FUSED
    return triton.compile(source, target=H200, options=options).asm["ptx"]


ADJOINT_FLAGS = dict(HAS_GRAD_SPIKES=True, BLOCK=kernels.BLOCK)
# (kernel, constexpr arguments, dtype): every reset and store of the forward; the adjoint of the hidden
# layers (spikes only) and of an output layer with a static current and learnable parameters, with the
# reset's gradient cut and not
VARIANTS = [
    *[
        ("_forward_kernel", dict(RESET=r, SCALED=True, STORE_MEM=m, STORE_SPIKES=s, BLOCK=kernels.BLOCK), d)
        for r in (0, 1, 2)
        for m, s in ((True, True), (False, True), (True, False))
        for d in ("fp32", "fp64")
    ],
    (
        "_forward_kernel",
        dict(RESET=1, SCALED=False, STORE_MEM=True, STORE_SPIKES=True, BLOCK=kernels.BLOCK),
        "fp32",
    ),
    *[
        (
            "_adjoint_kernel",
            dict(
                ADJOINT_FLAGS,
                RESET=r,
                HAS_GRAD_MEM=g,
                STATIC=g,
                NEED_BETA=g,
                NEED_THRESHOLD=g,
                DETACH_RESET=d,
            ),
            "fp32",
        )
        for r in (0, 1)
        for g in (False, True)
        for d in (True, False)
    ],
]


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: the interpreter compiles nothing"
    for name, constexprs, dtype in VARIANTS:
        code = ptx(name, constexprs, dtype)
        print(
            json.dumps(
                dict(kernel=name, constexprs=constexprs, dtype=dtype, fma="fma." in code, size=len(code))
            )
        )
