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

__all__ = ["BLOCK", "SIGNED", "dequantize", "foreign_entry", "is_8bit", "quantization_map", "quantize"]

#: Elements per block (one absmax each).
BLOCK = 256

#: The moments kept in 8 bits (Adam's, SGD's) and whether each uses the signed map.
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "momentum_buffer": True}


def quantization_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (``create_dynamic_map(signed)``), 256 ascending float32 values."""
    return torch.tensor(_core.quantization_map(signed), dtype=torch.float32)


def _zero_code(signed: bool) -> int:
    return _core.quantization_map(signed).index(0.0)


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def is_8bit(entry: dict) -> bool:
    """Whether the moments of a state entry are 8-bit codes."""
    return any(isinstance(value, torch.Tensor) and value.dtype == torch.uint8 for value in map(entry.get, SIGNED))


def fresh(param: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Zero state of moment ``name`` in 8 bits: the zero code and absmax 0."""
    signed = SIGNED[name]
    return {
        name: torch.full(param.shape, _zero_code(signed), dtype=torch.uint8),
        f"{name}_absmax": torch.zeros(blocks(param.numel()), dtype=torch.float32),
    }


def quantize(values: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Moment ``name`` given in any float dtype/device as 8-bit state (CPU)."""
    if type(values) not in (torch.Tensor, torch.nn.Parameter):
        # A tensor subclass (torchao's OptimState8bit...) stays one through .to() and .contiguous().
        raise TypeError(f"cannot quantise {name}: a {type(values).__module__}.{type(values).__qualname__}, not a plain tensor")
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


def check_entry(where: str, entry: Any, param: torch.Tensor, moments: tuple[str, ...]) -> None:
    """Raises (TypeError/KeyError/ValueError, as torch would) unless ``entry`` is a
    well-formed state entry with ``moments`` for ``param``, 8-bit or fp32."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    if not entry:
        return
    eight = is_8bit(entry)
    for name in ("step", *moments, *(f"{n}_absmax" for n in moments if eight)):
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
    both = " and ".join(moments)
    for name in moments:
        value = entry[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)}")
        if eight != (value.dtype == torch.uint8):
            raise ValueError(f"{where}: {both} must {'both' if len(moments) == 2 else 'all'} be 8-bit (uint8) or {'both' if len(moments) == 2 else 'all'} floating point")
        if not eight and not value.is_floating_point():
            raise ValueError(f"{where}[{name!r}] must be uint8 codes or floating point, got {value.dtype}")
        if eight:
            absmax = entry[f"{name}_absmax"]
            if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (blocks(param.numel()),):
                got = f"{absmax.dtype} of shape {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
                raise ValueError(f"{where}[{name + '_absmax'!r}] must be float32 of shape ({blocks(param.numel())},), got {got}")


def step_tensor(step: Any) -> torch.Tensor:
    """A saved step count as the 0-d float32 CPU tensor torch's Adam keeps (and the native step takes)."""
    if isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu":
        return step
    return torch.tensor(float(step), dtype=torch.float32)



#: bitsandbytes' names for the first and second moment: (codes or fp32 state, dynamic map, absmax per block).
_BNB_KEYS = (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2"))
_BNB_MARKERS = ("__bnb_optimizer_quant_state__", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
_BNB_ADVICE = "load it into bitsandbytes' optimizer, or start oxoptim's from fresh state"


def _is_torchao(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value).__module__.split(".")[0] == "torchao"


def foreign_entry(where: str, entry: Any, param: torch.Tensor, moments: tuple[str, ...]) -> Any:
    """``entry`` in this module's layout, with ``moments``, where it is another library's 8-bit state.

    bitsandbytes' (``state1``/``state2`` with ``qmap1``/``qmap2`` and ``absmax1``/``absmax2``,
    from 0.45 under ``__bnb_optimizer_quant_state__``) is the same scheme, so its block-wise
    entries with bitsandbytes' dynamic maps and blocks of 256 convert exactly (the codes and
    absmax are taken as they are; fp32 entries as they are); any other (non-block-wise, other
    maps or block sizes, percentile or unorm clipping state) raises ``ValueError``. torchao's
    (``OptimState8bit``... tensor subclasses) raises ``ValueError`` saying what to do.
    Anything else is returned as it is."""
    if not isinstance(entry, dict):
        return entry
    for name, value in entry.items():
        if _is_torchao(value):
            raise ValueError(
                f"{where}[{name!r}] is a {type(value).__module__}.{type(value).__qualname__}: this is a torchao "
                "low-bit optimizer state dict, which oxoptim's 8-bit optimizers cannot load; load it into torchao's "
                "optimizer, or first make every such state tensor a plain one (value.dequantize()) and each group's "
                "lr a number (a torch.optim.AdamW state dict, which is quantised on loading)"
            )
    if not any(key in entry for key in _BNB_MARKERS):
        return entry
    quant = entry.get("__bnb_optimizer_quant_state__", entry)
    if not isinstance(quant, dict):
        raise ValueError(f"{where} is bitsandbytes optimizer state whose '__bnb_optimizer_quant_state__' is not a dict")
    bnb_keys = dict(zip(moments, _BNB_KEYS))
    known = {"step", "__bnb_optimizer_quant_state__", *(k for keys in bnb_keys.values() for k in keys)}
    unknown = sorted(str(k) for k in (*entry, *quant) if k not in known)
    if unknown:
        raise ValueError(
            f"{where} is bitsandbytes optimizer state with entries oxoptim has no equivalent of ({', '.join(unknown)}: "
            f"non-block-wise state, percentile or unorm clipping, a third moment): {_BNB_ADVICE}"
        )
    out: dict = {k: v for k, v in entry.items() if k != "__bnb_optimizer_quant_state__" and k not in _BNB_MARKERS}
    for name, (state_key, map_key, absmax_key) in bnb_keys.items():
        value = quant.get(state_key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} is bitsandbytes optimizer state without a tensor {state_key!r} ({name}): {_BNB_ADVICE}")
        if value.dtype != torch.uint8:
            out[name] = value  # fp32 state (a parameter under bitsandbytes' min_8bit_size)
            continue
        qmap, absmax = quant.get(map_key), quant.get(absmax_key)
        signed = SIGNED[name]
        if not isinstance(qmap, torch.Tensor) or qmap.shape != (256,) or not torch.equal(qmap.to("cpu", torch.float32), quantization_map(signed)):
            raise ValueError(
                f"{where} is bitsandbytes 8-bit state whose {map_key!r} is not bitsandbytes' "
                f"{'signed' if signed else 'unsigned'} dynamic map, the only one oxoptim has: {_BNB_ADVICE}"
            )
        if not isinstance(absmax, torch.Tensor) or absmax.shape != (blocks(param.numel()),):
            got = f"shape {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
            raise ValueError(
                f"{where} is bitsandbytes 8-bit state whose {absmax_key!r} ({got}) is not one absmax per block of "
                f"{BLOCK} elements ({blocks(param.numel())} for this parameter), the only block size oxoptim has: {_BNB_ADVICE}"
            )
        out[name] = value
        out[f"{name}_absmax"] = absmax.to(dtype=torch.float32)
    return out


#: bitsandbytes' group settings of AdEMAMix, saved by every optimizer of its, and their values in Adam.
BNB_GROUP_DEFAULTS = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}


def without_bnb_settings(index: int, saved: dict, loader: str) -> dict:
    """A bitsandbytes group without its AdEMAMix settings, refused (naming ``loader``) unless they are Adam's."""
    for key, default in BNB_GROUP_DEFAULTS.items():
        if key in saved and saved[key] != default:
            raise ValueError(f"param_groups[{index}][{key!r}] is {saved[key]!r}: another optimizer's setting (bitsandbytes' "
                             f"AdEMAMix, torch's RMSprop), which {loader} cannot load")
    return {k: v for k, v in saved.items() if k not in BNB_GROUP_DEFAULTS}
