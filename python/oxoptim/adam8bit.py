"""Adam and AdamW with 8-bit block-wise state (bitsandbytes' ``Adam8bit`` and
``AdamW8bit``) on the Rust SIMD kernels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim.adam import adam as torch_adam  # `torch.optim.adam` is not an attribute: torch deletes it

from . import _blockwise as bw
from . import _core
from ._eightbit import EightBitOptimizer
from ._native import check_scalar_state, num_threads

__all__ = ["Adam8bit", "AdamW8bit"]

# torch AdamW's group flags, written into a dequantised state dict.
_TORCH_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None}


class Adam8bit(EightBitOptimizer):
    """Adam with 8-bit block-wise optimizer state, as ``bitsandbytes.optim.Adam8bit``.

    Same arguments as bitsandbytes (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``amsgrad`` — only ``False`` — and ``min_8bit_size``;
    the block size is 256). Parameters with at least ``min_8bit_size``
    elements keep each moment as uint8 codes of bitsandbytes' dynamic map
    (signed for ``exp_avg``, unsigned for ``exp_avg_sq``) plus one float32
    absmax per block of 256: state entries ``exp_avg``, ``exp_avg_sq``
    (uint8, shaped like the parameter), ``exp_avg_absmax``,
    ``exp_avg_sq_absmax`` (float32, ``ceil(numel / 256)``) and ``step``
    (bitsandbytes calls them ``state1``, ``state2``, ``absmax1``,
    ``absmax2``). About 2.03 bytes of state per parameter instead of 8.
    Smaller parameters keep fp32 state and get exactly ``oxoptim.Adam``'s
    update.

    Each step dequantises a block, applies ``oxoptim.Adam``'s fp32 update
    to it and quantises it back (nearest code), one pass per block, split
    across ``torch.get_num_threads()`` threads by whole blocks: results are
    bit-identical whatever the thread count. 8-bit state needs dense
    float32 or bfloat16 CPU parameters; bfloat16 ones are computed in
    float32 and stored back rounded to nearest, or, with the keyword-only
    ``bf16_stochastic_round=True`` (as torchao's), with unbiased stochastic
    rounding (see :class:`oxoptim.AdamW`; ``sr_seed`` and ``sr_count`` live
    in the parameter group and resume bit for bit). Kahan summation is not
    offered with 8-bit state.

    Weight decay is torch's: ``Adam8bit`` adds ``weight_decay * param`` to
    the gradient (as ``torch.optim.Adam``), ``AdamW8bit`` decays the
    parameter. (bitsandbytes' ``Adam8bit`` decays the parameter in both.)

    Switching in the middle of training: ``load_state_dict`` takes a
    ``torch.optim.Adam``/``AdamW`` (or oxoptim) state dict and quantises its
    moments, and a ``bitsandbytes.optim.Adam8bit``/``AdamW8bit`` one as it is
    (the same scheme; torchao's low-bit state dicts are refused, saying so);
    :meth:`dequantized_state_dict` (or
    :meth:`dequantize_state_dict` on a saved dict) gives a state dict that
    ``torch.optim.AdamW``/``oxoptim.AdamW`` load.
    """

    KIND: ClassVar[str] = "adam8bit"  # its row of the Rust table
    MOMENTS: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    LOADED_DEFAULTS: ClassVar[tuple[str, ...]] = ("min_8bit_size", "amsgrad")
    DECOUPLED: ClassVar[bool] = False

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        min_8bit_size: int = 4096,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum)

    def _check_group(self, group: dict) -> None:
        """torch Adam's checks and messages (NaN rejected too), then the 8-bit ones."""
        lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
        name = type(self).__name__
        if isinstance(lr, torch.Tensor) or isinstance(betas[0], torch.Tensor) or isinstance(betas[1], torch.Tensor):
            raise ValueError(f"{name}: lr and betas must be numbers, not tensors")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")
        if group.get("amsgrad", False):
            raise ValueError(f"{name}: amsgrad=True is not supported with 8-bit state (bitsandbytes has none either); use oxoptim.Adam(amsgrad=True)")
        if group.get("maximize", False):
            raise ValueError(f"{name}: maximize=True is not supported with 8-bit state")
        self._check_8bit_options(group)

    def _check_param(self, group: dict, i: int, p: torch.Tensor, entry: Any) -> None:
        """And fp32 moments of the parameter's dtype and device: torch's step, which takes the others,
        raises part-way (a parameter whose dtype changed after its state was made)."""
        super()._check_param(group, i, p, entry)
        if entry is not None and not bw.is_8bit(entry):
            for m in self.MOMENTS:
                if entry[m].dtype != p.dtype or entry[m].device != p.device:
                    raise ValueError(f"{type(self).__name__}: the state of parameter {i} is {entry[m].dtype} on {entry[m].device}, "
                                     f"the parameter {p.dtype} on {p.device} (changed after its state was made?): they must match")

    def _hyper(self, group: dict) -> dict:
        return {
            "lr": float(group["lr"]),
            "betas": (float(group["betas"][0]), float(group["betas"][1])),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "decoupled_weight_decay": self._decoupled(group),
        }

    def _decoupled(self, group: dict) -> bool:
        """The class's decay, or a loaded torch group's own (torch's Adam and AdamW obey it)."""
        return bool(group.get("decoupled_weight_decay", self.DECOUPLED))

    def _fp32_part(self, group: dict) -> tuple[str, dict]:
        """``oxoptim.Adam``'s kernel, as :meth:`_step_fp32` calls it."""
        return "adam", {**self._hyper(group), "amsgrad": False, "maximize": False}

    def _check_fp32(self, group: dict, full: list) -> None:
        """A step count Adam's bias corrections cannot take (torch's error), from the kernel's check
        (:func:`check_scalar_state`; whatever the tensors' layout, which may send the step itself to
        torch's path, whose refusals are the same)."""
        kind, adam_hyper = self._fp32_part(group)
        check_scalar_state(kind, adam_hyper, [p for p, _ in full], [entry for _, entry in full], state_like_param=True)

    def _step_fp32(self, group: dict, full: list) -> None:
        if not full:
            return
        params = [p for p, _ in full]
        grads = [p.grad for p in params]
        exp_avgs = [entry["exp_avg"] for _, entry in full]
        exp_avg_sqs = [entry["exp_avg_sq"] for _, entry in full]
        steps = [entry["step"] for _, entry in full]
        hyper = self._hyper(group)
        kind, adam_hyper = self._fp32_part(group)
        if _core.step(kind, params, grads, [exp_avgs, exp_avg_sqs], [steps], adam_hyper, num_threads=num_threads(), **self._rounding(group, params)):
            return
        if group.get("bf16_stochastic_round"):
            raise ValueError(f"{type(self).__name__}: bf16_stochastic_round=True needs dense contiguous bfloat16 CPU tensors that share no memory")
        beta1, beta2 = hyper["betas"]
        torch_adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            decoupled_weight_decay=self._decoupled(group), amsgrad=False, beta1=beta1, beta2=beta2,
            lr=hyper["lr"], weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=False,
        )  # fmt: skip

    # -- state dicts ---------------------------------------------------------

    def _saved_group(self, index: int, saved: dict) -> dict:
        """A bitsandbytes group without its AdEMAMix settings, refused unless they are Adam's; a
        group without Adam's settings (SGD's, Adagrad's) is not an Adam one."""
        missing = [k for k in ("betas", "eps") if k not in saved]
        if missing:
            raise ValueError(f"param_groups[{index}] has no {missing[0]!r}: not a state dict of Adam or AdamW (torch's, "
                             f"oxoptim's or bitsandbytes' 8-bit one), which {type(self).__name__} loads")
        return bw.without_bnb_settings(index, saved, "oxoptim's 8-bit Adam")

    @classmethod
    def _torch_group(cls, saved: dict) -> dict:
        return {**saved, **_TORCH_FLAGS, "decoupled_weight_decay": bool(saved.get("decoupled_weight_decay", cls.DECOUPLED))}


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit block-wise optimizer state, as ``bitsandbytes.optim.AdamW8bit``
    (``weight_decay=1e-2`` by default, decoupled: the parameter is multiplied
    by ``1 - lr * weight_decay``). See :class:`Adam8bit` for the state layout,
    thresholds and how to switch to and from fp32 AdamW.
    """

    DECOUPLED: ClassVar[bool] = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        min_8bit_size: int = 4096,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            min_8bit_size=min_8bit_size, bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum,
        )  # fmt: skip

