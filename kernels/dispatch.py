"""Backend selection shared by every op: ``backend="auto" | "triton" | "torch"``.

* ``"torch"``: the plain-torch reference of the op (any device, float64 included).
* ``"triton"``: the Triton kernels. On CUDA tensors they are compiled; on CPU tensors they run
  under the Triton interpreter, which only works when ``TRITON_INTERPRET=1`` was set *before*
  the kernel modules were imported (``@triton.jit`` picks compiled or interpreted at decoration
  time; stack.md section 5).
* ``"auto"``: Triton for CUDA tensors of a supported dtype, the torch reference otherwise
  (CPU tensors, float64, or triton not installed).

triton is an optional extra (``pip install dist-reid[triton]``): importing this package never
needs it, and only an explicit ``backend="triton"`` fails without it.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

HAS_TRITON: bool = triton is not None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# Read once, at import, because that is when triton makes the choice for our kernels: the op
# modules import this module before their @triton.jit decorations run.
INTERPRET: bool = HAS_TRITON and _env_flag("TRITON_INTERPRET")

# The Triton path computes in fp32; these are the input dtypes it accepts (upcast after load).
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

POISON_ENV = "REID_KERNELS_POISON"


def poison_enabled() -> bool:
    """True when ``REID_KERNELS_POISON=1``: output buffers start as NaN so unwritten cells show."""
    return _env_flag(POISON_ENV)


def new_buffer(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Output buffer for a kernel: ``torch.empty``, or NaN-filled (-1 for ints) in poison mode."""
    if not poison_enabled():
        return torch.empty(shape, device=device, dtype=dtype)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, device=device, dtype=dtype)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn ``auto|triton|torch`` into ``"triton"`` or ``"torch"`` for these input tensors.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when ``"triton"`` cannot run:
    triton missing, CPU tensors without the interpreter, or a dtype the kernels don't take.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    floats_ok = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if backend == "auto":
        # Under the interpreter "auto" stays on torch for CPU tensors: the interpreter is a test
        # tool, orders of magnitude slower than the reference.
        return "triton" if (HAS_TRITON and on_cuda and floats_ok) else "torch"
    if not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the optional dependency triton "
            "(pip install 'dist-reid[triton]'); use backend='torch' or 'auto' instead"
        )
    if not floats_ok:
        bad = sorted(
            {str(t.dtype) for t in tensors if t.is_floating_point()}
            - {str(d) for d in TRITON_DTYPES}
        )
        raise RuntimeError(
            f"backend='triton' takes float32/float16/bfloat16 inputs, got {bad}; "
            "float64 is served by backend='torch' (the reference)"
        )
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"all inputs must be on one device, got {sorted(devices)}")
    if not on_cuda and not INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors runs the Triton interpreter, which must be enabled "
            "before reid_kernels is imported: set the environment variable TRITON_INTERPRET=1 "
            "before the first import (e.g. in the shell or at the top of conftest.py)"
        )
    return "triton"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_config(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """``(DOT_NATIVE, PRECISION)`` constexprs for the tiled distance kernels.

    * bf16/fp16 on a GPU: feed the native half tiles to ``tl.dot`` (tensor cores, exact products,
      fp32 accumulation). Under the interpreter half arithmetic is wrong, so tiles are upcast.
    * The backward dots multiply fp32 coefficients by upcast features. For bf16 inputs ``tf32``
      is enough (its rounding stays below the bf16 gradient's own); fp16 gradients carry as many
      mantissa bits as tf32, so they get ``tf32x3`` (measured on an H200: plain tf32 missed the
      fp16 tolerance).
    * fp32 inputs use full ``ieee`` fp32 everywhere: TF32 would inflate small distances
      (anchors.md C.4), and eager torch runs fp32 matmuls without TF32 by default too.
    """
    native = dtype in (torch.float16, torch.bfloat16) and device.type == "cuda" and not INTERPRET
    prec = {torch.bfloat16: "tf32", torch.float16: "tf32x3"}.get(dtype, "ieee")
    return native, prec


__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "INTERPRET",
    "POISON_ENV",
    "TRITON_DTYPES",
    "Backend",
    "cdiv",
    "dot_config",
    "new_buffer",
    "next_pow2",
    "poison_enabled",
    "resolve_backend",
    "tl",
    "triton",
]
