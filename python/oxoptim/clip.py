"""``clip_grad_norm_`` computed in Rust: torch's signature, result and errors, deterministic."""

from __future__ import annotations

import math
import types
import warnings
from typing import Iterable, Optional, Union

import torch

from . import _core
from ._native import num_threads

__all__ = ["clip_grad_norm_", "get_total_norm"]

_Tensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def _native_total_norm(grads: list, norm_type: float) -> Optional[torch.Tensor]:
    """The total norm as torch returns it (a 0-d tensor of the gradients' dtype), or None.

    ``as_torch``: where torch's arithmetic leaves the range of the dtype it
    reduces in, the native result is torch's (see ``clip_grad_norm_``); the
    rounding to the dtype below turns a norm beyond its maximum into inf."""
    dtype = grads[0].dtype
    if any(g.dtype != dtype for g in grads):
        return None
    if norm_type == float("inf") and any(g.numel() == 0 for g in grads):
        return None  # torch raises: the infinity norm of an empty tensor has no identity
    if math.isfinite(norm_type) and norm_type != 0.0 and not _FLOAT32_NORMAL <= abs(norm_type) <= _FLOAT32_MAX:
        return None  # torch's float32 p is inf, 0 or subnormal: its arithmetic is another norm
    value = _core.tensor_norm(grads, norm_type, as_torch=True, num_threads=num_threads())
    if value is None:
        return None
    return torch.tensor(value, dtype=dtype, device=grads[0].device)  # not the default device


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_NORMAL = torch.finfo(torch.float32).tiny


def _check_finite(total_norm: torch.Tensor, norm_type: float, error_if_nonfinite: bool) -> None:
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def get_total_norm(
    tensors: _Tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: Optional[bool] = None
) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm``, computed by a deterministic Rust reduction on CPU."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    total = _native_total_norm(tensors, norm_type)
    if total is None:
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    _check_finite(total, norm_type, error_if_nonfinite)
    return total


@torch.no_grad()
def clip_grad_norm_(
    parameters: _Tensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> torch.Tensor:
    """Drop-in ``torch.nn.utils.clip_grad_norm_`` whose CPU work runs in Rust.

    The total norm (1, 2, inf or any finite p > 0) is one deterministic
    parallel reduction — bit-identical whatever the thread count — and the
    scaling ``grad *= min(max_norm / (total_norm + 1e-6), 1)`` one fused pass,
    both with the GIL released. Returns the total norm as a 0-d tensor of the
    gradients' dtype, as torch does, and raises the same error for a
    non-finite norm with ``error_if_nonfinite=True``. Gradients on other
    devices, sparse or of mixed dtypes, other norm types (0, -inf, …) and
    norm types whose float32 value, which torch computes with, is inf, 0 or
    subnormal use torch's implementation; ``foreach`` is only passed on to it. A gradient
    listed twice (a parameter listed twice, or parameters sharing one
    gradient tensor) counts twice in the norm and is scaled once per listing
    by ``torch._foreach_mul_``, as torch does.

    Range: torch takes each tensor's ``vector_norm`` — Σ|x|^p accumulated in
    float32 for float32, bfloat16 and float16 gradients (in float64 for
    float64), each |x|^p a float32 ``pow``, a tensor of one element being
    its |x| — then the norm of the stacked per-tensor norms, each stage
    rounded to the gradients' dtype. The native reduction sums exact terms in
    float64 (thread-count independent), and reproduces torch where that
    arithmetic leaves its dtype's range:

    * a sum Σ|x|^p (p = 1, 2 or general, per tensor or over the per-tensor
      norms) that float32 rounds to inf gives an infinite norm, as torch's
      float32 accumulator does (one check per call on the float64 sum, which
      bounds every per-tensor sum and equals the second stage's up to
      rounding): 4096 × 4e17 at p = 2, ``[1e13, 1e13]`` at p = 3,
      ``[1.5e19]`` and ``[1.5e19]`` as two tensors at p = 2;
    * a term |x|^p (general p) beyond float32's maximum is inf (``[2, 2]`` at
      p = 1000); one below float32's smallest normal takes float32's rounding
      to a subnormal or 0 (values near 1e-20 at p = 3 give 0). At p = 2 the
      squares of float32/bfloat16/float16 gradients are float32 products, as
      torch's; at p = 1 and inf nothing can leave the range;
    * a lone one-element gradient's norm is its |x| for every p;
    * a norm beyond the dtype's maximum (float16 above 65504, p < 1) is inf.

    An infinite norm then zeroes the gradients (``max_norm / (inf + 1e-6)``)
    and raises with ``error_if_nonfinite=True``, as torch does; float64
    gradients follow float64's range the same way. What still differs:
    within float32 rounding of the overflow threshold (a sum within ~1e-7 of
    float32's maximum; a per-tensor norm that torch rounds up to the dtype)
    torch's answer depends on its summation order and thread count, ours on
    the float64 sum rounded once. Inside the range torch rounds each
    per-tensor norm to the dtype and uses float32 ``p`` and ``1/p`` (a
    relative difference up to ~1e-6 for general p, and one unit of the
    dtype's last place — large relative to float16 subnormal norms), while
    float32 accumulation of many small terms onto a large sum loses digits
    that the float64 sum keeps; these are the normal-range differences the
    native result always had.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        float(max_norm)  # torch's check of max_norm, which it makes also without gradients
        return torch.tensor(0.0)
    total_norm = _native_total_norm(grads, norm_type)
    if total_norm is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    _check_finite(total_norm, norm_type, error_if_nonfinite)
    clip_coef = float(max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    if not _core.scale_(grads, scale=float(clip_coef_clamped), num_threads=num_threads()):
        torch._foreach_mul_(grads, clip_coef_clamped)
    return total_norm
