"""8-bit block-wise optimizer state: layout, creation, checks and conversion
to and from fp32 state, shared by the 8-bit optimizer classes.

A moment of a parameter with at least ``min_8bit_size`` elements is kept as
``<name>`` (uint8 codes shaped like the parameter) and ``<name>_absmax``
(float32, one per block of 256 elements in flattened order): element ``i``
is ``map[code[i]] * absmax[i // 256]``, with bitsandbytes' dynamic map,
signed for ``exp_avg`` and unsigned for ``exp_avg_sq``
(:func:`quantization_map`). Smaller parameters keep fp32 state, as
``torch.optim.Adam`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _core
from ._native import num_threads

__all__ = ["BLOCK", "SIGNED", "dequantize", "is_8bit", "quantization_map", "quantize"]

#: Elements per block (one absmax each).
BLOCK = 256

#: The moments kept in 8 bits and whether each uses the signed map.
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def quantization_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (``create_dynamic_map(signed)``), 256 ascending float32 values."""
    return torch.tensor(_core.quantization_map(signed), dtype=torch.float32)


def _zero_code(signed: bool) -> int:
    return _core.quantization_map(signed).index(0.0)


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def is_8bit(entry: dict, name: str = "exp_avg") -> bool:
    value = entry.get(name)
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8


def fresh(param: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Zero state of moment ``name`` in 8 bits: the zero code and absmax 0."""
    signed = SIGNED[name]
    return {
        name: torch.full(param.shape, _zero_code(signed), dtype=torch.uint8),
        f"{name}_absmax": torch.zeros(blocks(param.numel()), dtype=torch.float32),
    }


def quantize(values: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Moment ``name`` given in any float dtype/device as 8-bit state (CPU)."""
    x = values.detach().to(device="cpu", dtype=torch.float32).contiguous()
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(blocks(x.numel()), dtype=torch.float32)
    if not _core.quantize_blockwise([x], [codes], [absmax], signed=SIGNED[name], num_threads=num_threads()):
        raise RuntimeError(f"quantising {name} failed")  # pragma: no cover - all tensors are fresh and contiguous
    return {name: codes, f"{name}_absmax": absmax}


def dequantize(entry: dict, name: str) -> torch.Tensor:
    """Moment ``name`` of an 8-bit state entry as a float32 tensor shaped like its codes."""
    codes = entry[name].to("cpu").contiguous()
    absmax = entry[f"{name}_absmax"].to(device="cpu", dtype=torch.float32).contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    if not _core.dequantize_blockwise([codes], [absmax], [out], signed=SIGNED[name], num_threads=num_threads()):
        raise RuntimeError(f"dequantising {name} failed")  # pragma: no cover
    return out


def check_entry(where: str, entry: Any, param: torch.Tensor) -> None:
    """Raises (TypeError/KeyError/ValueError, as torch would) unless ``entry`` is a
    well-formed Adam state entry for ``param``, 8-bit or fp32."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    if not entry:
        return
    eight = is_8bit(entry)
    for name in ("step", *SIGNED, *(f"{n}_absmax" for n in SIGNED if eight)):
        if name not in entry:
            raise KeyError(f"{where} has no {name!r} entry")
    step = entry["step"]
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{where}['step'] must be a single real number, got a {step.dtype} tensor of shape {tuple(step.shape)}")
    else:
        float(step)
    if "max_exp_avg_sq" in entry:
        raise ValueError(f"{where} holds AMSGrad state (max_exp_avg_sq); 8-bit Adam has no AMSGrad")
    for name in SIGNED:
        value = entry[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)}")
        if eight != (value.dtype == torch.uint8):
            raise ValueError(f"{where}: exp_avg and exp_avg_sq must both be 8-bit (uint8) or both floating point")
        if not eight and not value.is_floating_point():
            raise ValueError(f"{where}[{name!r}] must be uint8 codes or floating point, got {value.dtype}")
        if eight:
            absmax = entry[f"{name}_absmax"]
            if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (blocks(param.numel()),):
                got = f"{absmax.dtype} of shape {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
                raise ValueError(f"{where}[{name + '_absmax'!r}] must be float32 of shape ({blocks(param.numel())},), got {got}")


def step_tensor(step: Any) -> torch.Tensor:
    """A saved step count as the 0-d float32 tensor torch's Adam keeps."""
    if isinstance(step, torch.Tensor):
        return step
    return torch.tensor(float(step), dtype=torch.float32)

