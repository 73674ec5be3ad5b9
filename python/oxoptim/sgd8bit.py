"""SGD with momentum whose momentum buffer is 8-bit block-wise state
(bitsandbytes' ``SGD8bit``) on the Rust SIMD kernels."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch.optim.sgd import sgd as torch_sgd

from . import _blockwise as bw
from . import _core
from ._eightbit import EightBitOptimizer
from ._native import num_threads

__all__ = ["SGD8bit"]

# torch SGD's group flags, written into a dequantised state dict.
_TORCH_FLAGS = {"foreach": None, "differentiable": False, "fused": None}


class SGD8bit(EightBitOptimizer):
    """SGD with momentum whose momentum buffer is 8-bit block-wise state, as
    ``bitsandbytes.optim.SGD8bit``.

    Arguments are ``torch.optim.SGD``'s (``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``, keyword-only ``maximize``; ``foreach`` and
    ``fused`` accepted and ignored, ``differentiable=True`` refused) with
    torch's checks and messages, plus bitsandbytes' ``min_8bit_size`` (block
    size 256) and ``bf16_stochastic_round``. ``momentum`` must be positive: without
    momentum there is no state to quantise, and the constructor raises
    ``NotImplementedError`` as bitsandbytes does (use :class:`oxoptim.SGD`).

    Parameters with at least ``min_8bit_size`` elements keep the buffer as
    ``momentum_buffer`` (uint8 codes of bitsandbytes' signed dynamic map,
    shaped like the parameter) and ``momentum_buffer_absmax`` (float32, one
    per block of 256): about 1.02 bytes of state per parameter instead of 4.
    Smaller parameters keep a ``momentum_buffer`` of their own dtype and get
    exactly ``oxoptim.SGD``'s update. Every parameter's entry also has ``step``
    (0 until its first step, whose buffer is the gradient itself, as torch
    makes it).

    Each step dequantises a block of the buffer, applies ``oxoptim.SGD``'s
    fp32 update to it (weight decay, dampening, Nesterov and maximize as
    torch) and quantises it back, one pass per block, split across
    ``torch.get_num_threads()`` threads by whole blocks: the results are
    bit-identical whatever the thread count. With ``dampening=0`` and
    ``nesterov=False`` this is bitsandbytes' 8-bit momentum update (which
    ignores both). bfloat16 parameters are computed in float32 and stored
    back rounded to nearest, or, with ``bf16_stochastic_round=True``, with
    unbiased stochastic rounding (``sr_seed``/``sr_count`` in the group,
    resumed bit for bit). Kahan summation is not offered with 8-bit state.

    Switching in the middle of training: ``load_state_dict`` takes a
    ``torch.optim.SGD``/``oxoptim.SGD`` state dict and quantises its
    buffers, and a ``bitsandbytes.optim.SGD8bit`` one as it is (the same
    scheme; its groups read with what bitsandbytes ran: dampening 0, no
    Nesterov); other optimizers' state dicts are refused, but for
    bitsandbytes' ``Lion8bit``, whose layout is the same.
    :meth:`dequantized_state_dict` gives one that ``torch.optim.SGD`` loads.
    """

    KIND: ClassVar[str] = "sgd8bit"
    MOMENTS: ClassVar[tuple[str, ...]] = ("momentum_buffer",)
    LOADED_DEFAULTS: ClassVar[tuple[str, ...]] = ("min_8bit_size", "nesterov", "maximize", "dampening")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        min_8bit_size: int = 4096,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
    ) -> None:
        if differentiable:
            raise ValueError("SGD8bit: differentiable=True is not supported with 8-bit state (its update is not an autograd graph)")
        del foreach, fused  # accepted as torch.optim.SGD's: the one native path is taken either way
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum)

    def _check_group(self, group: dict) -> None:
        """torch SGD's checks and messages (NaN rejected too), then the 8-bit ones."""
        lr, momentum, dampening, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        name = type(self).__name__
        if any(isinstance(x, torch.Tensor) for x in (lr, momentum, dampening, wd)):
            raise ValueError(f"{name}: lr, momentum, dampening and weight_decay must be numbers, not tensors")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")
        if dampening != dampening:
            raise ValueError(f"Invalid dampening value: {dampening}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if momentum == 0:
            raise NotImplementedError(f"SGD without momentum is not supported! ({name} keeps the momentum buffer in 8 bits; use oxoptim.SGD)")
        self._check_8bit_options(group)

    def _hyper(self, group: dict) -> dict:
        return {
            "lr": float(group["lr"]),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group["maximize"]),
        }

    def _step_fp32(self, group: dict, full: list) -> None:
        """``oxoptim.SGD``'s step: a first step takes the buffer from the gradient, which from a zero
        buffer is a step without dampening (one native call for those, one for the others)."""
        if not full:
            return
        hyper = self._hyper(group)
        first = [(p, entry) for p, entry in full if float(entry["step"]) == 0]
        later = [(p, entry) for p, entry in full if float(entry["step"]) != 0]
        # A first step with dampening makes its buffer with torch's step, as oxoptim.SGD's does,
        # except under stochastic rounding, which only the kernels do, and (as oxoptim.SGD) for
        # bfloat16/float16 parameters, which take torch's fused float32 maths.
        half = any(p.dtype in (torch.bfloat16, torch.float16) for p, _ in full)
        torch_first = hyper["dampening"] != 0 and not group.get("bf16_stochastic_round") and not half
        for part, settings in ((first, {**hyper, "dampening": 0.0}), (later, hyper)):
            if not part:
                continue
            params = [p for p, _ in part]
            grads = [p.grad for p in params]
            buffers = [entry["momentum_buffer"] for _, entry in part]
            by_torch = torch_first and part is first
            if by_torch or not _core.step("sgd", params, grads, [buffers], [], settings, num_threads=num_threads(), **self._rounding(group, params)):
                if group.get("bf16_stochastic_round"):
                    raise ValueError(f"{type(self).__name__}: bf16_stochastic_round=True needs dense contiguous bfloat16 CPU tensors that share no memory")
                fresh = part is first
                listed: list = [None if fresh else b for b in buffers]  # torch makes a first buffer from the gradient
                torch_sgd(
                    params, grads, listed, weight_decay=hyper["weight_decay"], momentum=hyper["momentum"], lr=hyper["lr"],
                    dampening=hyper["dampening"], nesterov=hyper["nesterov"], maximize=hyper["maximize"],
                )  # fmt: skip
                for (_, entry), made in zip(part, listed):
                    entry["momentum_buffer"] = made
            for _, entry in part:
                entry["step"] += 1

    # -- state dicts ---------------------------------------------------------

    def _saved_group(self, index: int, saved: dict) -> dict:
        """bitsandbytes' SGD8bit saves ``lr``, ``betas=(momentum, dampening)``, ``eps`` and
        ``weight_decay`` only, and its update ignores dampening (and has no Nesterov or maximize):
        read as torch's keys with what it ran, dampening 0. Any other group without ``momentum``
        is not an SGD one."""
        saved = bw.without_bnb_settings(index, saved, type(self).__name__)
        if "momentum" in saved:
            return saved
        # bitsandbytes' SGD8bit saves eps 0 and no Adam flag (torch adds keys of its own, e.g. a
        # scheduler's initial_lr, param_names). Its Lion8bit saves the same keys: not told apart.
        adam = {"amsgrad", "capturable", "decoupled_weight_decay", "differentiable", "fused", "foreach"} & set(saved)
        if "betas" not in saved or saved.get("eps", 0.0) != 0 or adam:
            raise ValueError(f"param_groups[{index}] has no 'momentum': not a state dict of SGD (torch's, oxoptim's "
                             f"or bitsandbytes' SGD8bit), which {type(self).__name__} loads")
        out = {k: v for k, v in saved.items() if k not in ("betas", "eps")}
        return {**out, "momentum": saved["betas"][0], "dampening": 0.0, "nesterov": False, "maximize": False}

    def _saved_entry(self, entry: Any) -> Any:
        """torch SGD keeps only ``momentum_buffer`` (None, or absent, before the first step): its
        entries get the step counter (1 once a buffer exists)."""
        if not isinstance(entry, dict) or "step" in entry:
            return entry
        buffer = entry.get("momentum_buffer")
        if buffer is None:
            return {k: v for k, v in entry.items() if k != "momentum_buffer"}
        return {**entry, "step": torch.tensor(1.0)}

    @classmethod
    def _torch_group(cls, saved: dict) -> dict:
        return {**saved, **_TORCH_FLAGS}

    @classmethod
    def _torch_entry(cls, entry: dict) -> dict:
        if not entry:
            return entry
        fresh = float(entry["step"]) == 0
        return {"momentum_buffer": None if fresh else entry["momentum_buffer"]}
