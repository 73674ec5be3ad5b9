"""Prodigy (learning-rate-free Adam) on the Rust SIMD kernels, with the
semantics of the reference package ``prodigyopt`` (1.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from . import _core
from ._native import (evaluate_closure, group_is_native, has_huge_hyper, num_threads, step_or_restore, tensor_cache,
                      use_grad_for_differentiable)
from ._twin import NATIVE_NOTE, TorchTwin

__all__ = ["Prodigy", "ProdigyReference"]


@dataclass(frozen=True)
class _Start:
    """The optimizer-wide numbers a step starts from, as the reference computes
    them from its first group (and ``lr``, the largest of all groups)."""

    beta1: float
    beta2: float
    beta3: float
    d: float
    d_max: float
    d_coef: float
    lr: float
    dlr: float
    growth_rate: float
    decouple: bool
    d_numerator: float  # already multiplied by beta3


@dataclass(frozen=True)
class _Estimate:
    """Where the step moved the estimate of ``d`` (the groups' new entries)."""

    d: float
    d_max: float
    d_hat: float
    d_numerator: float
    d_denom: float


class ProdigyReference(torch.optim.Optimizer):
    """Prodigy as ``prodigyopt.Prodigy`` (1.1.2) defines it, in plain torch: the
    semantics oxoptim's :class:`Prodigy` reproduces, and its path for what the
    kernels do not take (CUDA, half precision, ``slice_p > 1``, ...).

    A step first reads every parameter for the two global sums of the
    estimate of ``d`` (``dot(g, p0 − p)`` and ``Σ|s|``, each tensor's reduced
    by torch as the reference does), moves ``d``, then updates every element.
    Differences from the reference: the gradient is left as it was (the
    reference adds a coupled weight decay to ``p.grad`` in place);
    ``fsdp_in_use=True`` is refused (the reference all-reduces on CUDA); groups
    whose ``lr`` is neither the largest nor 0 are refused before anything is
    written (the reference raises half-way through its first pass); nothing
    is printed.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: Optional[float] = None,
        eps: float = 1e-8,
        weight_decay: float = 0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        fsdp_in_use: bool = False,
        slice_p: int = 1,
    ) -> None:
        if not 0.0 < d0:
            raise ValueError("Invalid d0 value: {}".format(d0))
        if not 0.0 < lr:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if not 0.0 < eps:
            raise ValueError("Invalid epsilon value: {}".format(eps))
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError("Invalid beta parameter at index 0: {}".format(betas[0]))
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError("Invalid beta parameter at index 1: {}".format(betas[1]))
        if fsdp_in_use:
            raise ValueError("fsdp_in_use=True is not supported: the reference all-reduces its sums on CUDA; oxoptim's Prodigy runs unsharded")
        if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
            raise ValueError(f"Invalid slice_p value: {slice_p}")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0, d_max=d0,
                        d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple, safeguard_warmup=safeguard_warmup,
                        fsdp_in_use=fsdp_in_use, slice_p=slice_p)  # fmt: skip
        self.d0 = d0
        super().__init__(params, defaults)

    def _start(self) -> _Start:
        """The top of the reference's step (and its check of the groups' ``lr``)."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        beta3 = group["beta3"]
        if beta3 is None:
            beta3 = math.sqrt(beta2)
        k = group["k"]
        d = group["d"]
        lr = max(g["lr"] for g in self.param_groups)
        if group["use_bias_correction"]:
            bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
        else:
            bias_correction = 1
        for g in self.param_groups:
            if g["lr"] not in [lr, 0.0]:
                raise RuntimeError("Setting different lr values in different parameter groups is only supported for values of 0")
        return _Start(beta1, beta2, beta3, d, group["d_max"], group["d_coef"], lr, d * lr * bias_correction,
                      group["growth_rate"], group["decouple"], group["d_numerator"] * beta3)  # fmt: skip

    def _init_group(self, group: dict, params: list, grads: list) -> None:
        """Every parameter of ``group`` with a gradient, its state created where missing as the reference does."""
        beta1 = self.param_groups[0]["betas"][0]
        slice_p = group["slice_p"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                # Made whole before it is stored: a failure (p.any() of a meta tensor) leaves none.
                fresh: dict[str, Any] = {"step": 0, "s": torch.zeros_like(p.data.flatten()[::slice_p]).detach()}
                if p.any():
                    fresh["p0"] = p.flatten()[::slice_p].detach().clone()
                else:
                    # All values are zero, so save VRAM with a zero-tensor
                    fresh["p0"] = torch.tensor(0, device=p.device, dtype=p.dtype)
                if beta1 > 0:
                    fresh["exp_avg"] = torch.zeros_like(p.data).detach()
                fresh["exp_avg_sq"] = torch.zeros_like(p.data).detach()
                state.update(fresh)
            params.append(p)
            grads.append(p.grad)

    def _grad(self, group: dict, start: _Start, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with the coupled weight decay (a new tensor: ``p.grad`` stays as it was)."""
        decay = group["weight_decay"]
        return grad.add(p, alpha=decay) if decay != 0 and not start.decouple else grad

    def _s_weight(self, group: dict, start: _Start) -> float:
        d, d0 = start.d, group["d0"]
        return (d / d0) * d if group["safeguard_warmup"] else (d / d0) * start.dlr

    def _sums(self, group: dict, start: _Start, params: list, grads: list) -> list[tuple[float, float]]:
        """Each parameter's ``(dot(g, p0 − p), Σ|s'|)``, nothing written."""
        slice_p, s_weight, out = group["slice_p"], self._s_weight(group, start), []
        for p, grad in zip(params, grads):
            state = self.state[p]
            sliced_grad = self._grad(group, start, p, grad).flatten()[::slice_p]
            dot = torch.dot(sliced_grad, state["p0"].data - p.data.flatten()[::slice_p]).item()
            s_next = state["s"].mul(start.beta3).add_(sliced_grad, alpha=s_weight)
            out.append((dot, s_next.abs().sum().item()))
        return out

    def _estimate(self, start: _Start, sums: list[tuple[dict, list[tuple[float, float]]]]) -> Optional[_Estimate]:
        """The reference's new ``d`` from every group's sums, in its order; None when
        it returns early (no gradient information: ``Σ|s| = 0``)."""
        delta_numerator = 0.0
        d_denom = 0.0
        d = start.d
        for group, group_sums in sums:
            for dot, s_abs in group_sums:
                delta_numerator += (d / group["d0"]) * start.dlr * dot
                d_denom += s_abs
        if d_denom == 0:
            return None
        d_max = start.d_max
        d_hat = d
        global_d_numerator = start.d_numerator + delta_numerator
        if start.lr > 0.0:
            d_hat = start.d_coef * global_d_numerator / d_denom
            # The reference compares with the d0 of its last group (its loop variable).
            if d == self.param_groups[-1]["d0"]:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * start.growth_rate)
        return _Estimate(d, d_max, d_hat, global_d_numerator, d_denom)

    def _moments(self, group: dict, start: _Start, params: list, grads: list) -> None:
        """The reference's first-pass writes, with the ``d`` the step started
        from: the moments and ``s`` of a group whose ``lr`` is positive."""
        if not group["lr"] > 0.0:
            return
        d, beta1, beta2 = start.d, start.beta1, start.beta2
        for p, grad in zip(params, grads):
            state = self.state[p]
            g = self._grad(group, start, p, grad)
            if beta1 > 0:
                state["exp_avg"].mul_(beta1).add_(g, alpha=d * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
            state["s"].mul_(start.beta3).add_(g.flatten()[:: group["slice_p"]], alpha=self._s_weight(group, start))

    def _params(self, group: dict, start: _Start, estimate: _Estimate, params: list, grads: list) -> None:
        """The reference's second pass: the parameters, with the new ``d``."""
        dlr, decay = start.dlr, group["weight_decay"]
        for p, grad in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            denom = state["exp_avg_sq"].sqrt().add_(estimate.d * group["eps"])
            if decay != 0 and start.decouple:
                p.data.add_(p.data, alpha=-decay * dlr)
            if start.beta1 > 0:
                p.data.addcdiv_(state["exp_avg"], denom, value=-dlr)
            else:
                p.data.addcdiv_(self._grad(group, start, p, grad), denom, value=-dlr * estimate.d)

    def _can_fuse(self, gathered: list) -> bool:
        """Whether every group of the step can run both passes in one call
        (else all run the reference's passes, failing where it fails)."""
        return False

    def _fused(self, group: dict, start: _Start, estimate: _Estimate, params: list, grads: list) -> bool:
        """Both passes of one group in one call, where an implementation has one."""
        return False

    @staticmethod
    def _commit(group: dict, estimate: _Estimate) -> None:
        group["d_numerator"] = estimate.d_numerator
        group["d_denom"] = estimate.d_denom
        group["d"] = estimate.d
        group["d_max"] = estimate.d_max
        group["d_hat"] = estimate.d_hat
        group["k"] = group["k"] + 1

    def _step_all(self, skipped: frozenset = frozenset()) -> None:
        """One step; the groups at ``skipped`` take part with no parameter, as groups without gradients."""
        start = self._start()
        gathered = []
        for i, group in enumerate(self.param_groups):
            params: list = []
            grads: list = []
            if i not in skipped:
                self._init_group(group, params, grads)
            gathered.append((group, params, grads))
        for _, params, _ in gathered:
            for p in params:
                self.state[p]["step"] + 1  # the reference's `step += 1` fails here, before any write
        sums = [(group, self._sums(group, start, params, grads)) for group, params, grads in gathered if group["lr"] > 0.0]
        estimate = self._estimate(start, sums)
        # The first pass's writes of every group come before any parameter
        # moves (a coupled decay reads the parameter), except within a group
        # that both passes step in one call.
        fuse = estimate is not None and self._can_fuse(gathered)
        fused = [estimate is not None and fuse and self._fused(group, start, estimate, params, grads)
                 for group, params, grads in gathered]
        for (group, params, grads), done in zip(gathered, fused):
            if not done:
                self._moments(group, start, params, grads)
        if estimate is None:
            return  # the reference's early return: no gradient information
        for (group, params, grads), done in zip(gathered, fused):
            if not done:
                self._params(group, start, estimate, params, grads)
            # Every group, a skipped one too, stores the one estimate of d (the next step reads group 0's).
            self._commit(group, estimate)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = evaluate_closure(closure)
        self._step_all()
        return loss


class Prodigy(TorchTwin, ProdigyReference, kind="prodigy"):
    __doc__ = (
        """Prodigy (Mishchenko & Defazio 2023), the learning-rate-free Adam,
    whose CPU passes run in Rust SIMD: same signature and defaults as
    ``prodigyopt.Prodigy`` (``lr=1.0``, ``d0=1e-6``, ``slice_p=1``...), same
    ``state_dict`` (per parameter ``step``, ``s``, ``p0``, ``exp_avg``,
    ``exp_avg_sq``; ``d``, ``d_max``, ``d_numerator``, ``k`` in the groups), so
    either loads the other's.

    A step is two native calls per group: one read pass returning each
    tensor's terms of the global estimate of ``d`` (summed over all groups in
    Python, in the reference's order), then the element-wise update
    (moments, ``s``, parameters), operation for operation as the reference.
    Each tensor's two sums are reduced in a fixed order (the same bits
    whatever the thread count) rather than by torch's ``dot``/``sum``: they
    agree to rounding, so ``d``, and through it every update, agrees with
    the reference to rounding, not bit for bit (bfloat16 and float16 tensors
    are summed in float32). ``slice_p > 1`` and what the kernels do not take
    run the plain-torch reference (:class:`ProdigyReference`), whose sums
    are torch's and so depend on the thread count.
    The step needs every gradient before any update: it cannot run inside
    ``step_in_backward``. With ``skip_nonfinite=True``, a group whose
    gradients hold a NaN/Inf takes part in the step as a group without
    gradients: its parameters and their state are untouched, while the one
    estimate of ``d`` (``d``, ``d_max``, ``d_numerator``, ``k``, kept alike in
    every group) moves on from the other groups' gradients.
"""
        + NATIVE_NOTE
    )

    STEPS_IN_BACKWARD = False

    def required_state(self, group: dict) -> tuple[str, ...]:
        # No "step": an entry without it is fresh state, as the reference re-creates it.
        # "exp_avg" when the first group's beta1 (the reference's, for every group) is positive.
        beta1 = self.__dict__.get("_loading_beta1")
        if beta1 is None:
            beta1 = self.param_groups[0]["betas"][0]
        return ("s", "p0", *(("exp_avg",) if beta1 > 0 else ()), "exp_avg_sq")

    def _check_state(self, state: dict) -> None:
        groups = state.get("param_groups") if isinstance(state, dict) else None
        self._loading_beta1 = groups[0]["betas"][0] if groups else None  # the state's own first group
        # Each parameter's slice_p, from the group the state puts it in.
        self._loading_slice_p: Optional[dict] = {id(p): g.get("slice_p", 1) for g in groups or () for p in g.get("params", ())}
        try:
            super()._check_state(state)
        finally:
            self._loading_beta1 = self._loading_slice_p = None

    def _check_entry(self, where: str, name: str, value: Any, param: torch.Tensor) -> None:
        if name in ("s", "p0"):
            # The reference's p.flatten()[::slice_p]: ceil(numel / slice_p) elements; p0 is a 0-d
            # zero instead when the parameter was all zeros at its first step.
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
            slice_p = (self.__dict__.get("_loading_slice_p") or {}).get(id(param))
            if isinstance(slice_p, int) and not isinstance(slice_p, bool) and slice_p >= 1:
                size = -(-param.numel() // slice_p)
                if value.shape != (size,) and not (name == "p0" and value.dim() == 0):
                    zero_d = " or a 0-d tensor" if name == "p0" else ""
                    raise ValueError(
                        f"{where} has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)}: "
                        f"with slice_p={slice_p}, {name} needs shape ({size},){zero_d} (every slice_p-th element of the flattened parameter)"
                    )
            elif value.dim() > 1 or value.numel() > max(param.numel(), 1) or (name == "s" and value.dim() != 1):
                raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)} (of which it is a flat slice)")
            return
        super()._check_entry(where, name, value, param)

    def _kernel_hyper(self, group: dict, start: _Start, estimate: _Estimate) -> dict:
        return dict(lr=group["lr"], betas=(start.beta1, start.beta2), beta3=start.beta3, eps=group["eps"],
                    weight_decay=group["weight_decay"], decouple=start.decouple, d=start.d, d0=group["d0"],
                    d_next=estimate.d, dlr=start.dlr, safeguard_warmup=group["safeguard_warmup"])  # fmt: skip

    def _native(self, group: dict, params: list, grads: list) -> bool:
        """Whether the kernels may take ``group``: the reference's settings
        allow it and every state tensor is the parameter's flat twin."""
        if group["slice_p"] != 1 or not group_is_native(self, group) or has_huge_hyper(self, group):
            return False  # (a huge setting: the kernels decline the update, so the sums are the reference's too)
        with_exp_avg = self.param_groups[0]["betas"][0] > 0
        for p, g in zip(params, grads):
            if g.shape != p.shape or (with_exp_avg and "exp_avg" not in self.state[p]):
                return False  # torch's path raises torch's error where the reference does
            s, p0 = self.state[p].get("s"), self.state[p].get("p0")
            if not (torch.is_tensor(s) and torch.is_tensor(p0)) or s.numel() != p.numel() or (p0.dim() != 0 and p0.numel() != p.numel()):
                return False
        return True

    def _sums(self, group: dict, start: _Start, params: list, grads: list) -> list[tuple[float, float]]:
        if self._native(group, params, grads):
            decay = group["weight_decay"] if not start.decouple else 0.0
            beta3, s_weight = start.beta3, self._s_weight(group, start)  # as set: the kernel declines non-numbers
            full = [i for i, p in enumerate(params) if self.state[p]["p0"].dim() != 0]
            zero = [i for i, p in enumerate(params) if self.state[p]["p0"].dim() == 0]
            out: list[Any] = [None] * len(params)
            for indices, with_origin in ((full, True), (zero, False)):
                if not indices:
                    continue
                ps = [params[i] for i in indices]
                origins = [self.state[p]["p0"] for p in ps] if with_origin else None
                sums = _core.prodigy_sums(ps, [grads[i] for i in indices], [self.state[p]["s"] for p in ps], origins,
                                          weight_decay=decay, beta3=beta3, s_weight=s_weight, num_threads=num_threads())
                if sums is None:
                    break
                for i, value in zip(indices, sums):
                    out[i] = value
            else:
                return out
        return super()._sums(group, start, params, grads)

    def _can_fuse(self, gathered: list) -> bool:
        return all(self._native(group, params, grads) for group, params, grads in gathered)

    def _fused(self, group: dict, start: _Start, estimate: _Estimate, params: list, grads: list) -> bool:
        if not params:
            return True  # nothing to step (a skipped group: the whole-group path would take its parameters)
        self._context: Optional[Tuple[_Start, _Estimate]] = (start, estimate)
        try:
            # TorchTwin's two native paths: the whole group (descriptions cached), else the list.
            done = self._fast_step(group, tensor_cache(self)) or self._list_step(group, params, grads)
        finally:
            self._context = None
        if done:
            for p in params:
                self.state[p]["step"] += 1
        return done

    def _hyper(self, group: dict) -> dict:
        """The kernel's settings for ``group``: this step's, during a step; else
        those a step would use if ``d`` did not move (for tools that inspect them)."""
        context = self.__dict__.get("_context")
        if context is None:
            start = self._start()
            context = (start, _Estimate(start.d, start.d_max, start.d, start.d_numerator, 0.0))
        return self._kernel_hyper(group, *context)

    @use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = evaluate_closure(closure)
        self._start()  # the reference's check of the groups' lr: a refused step counts no skip
        # A group skipped for a NaN/Inf gradient takes part with no parameter (its
        # gradients add nothing to the estimate of d, its parameters do not move).
        skipped = frozenset(i for i, g in enumerate(self.param_groups) if g.get("skip_nonfinite") and self._skip_group(g))
        cache = tensor_cache(self)
        cache.begin_step()
        try:
            if any(has_huge_hyper(self, g) for g in self.param_groups):  # the reference may raise half-way
                step_or_restore(self, self.param_groups, lambda: self._step_all(skipped))
            else:
                self._step_all(skipped)
        finally:
            cache.finish_step()
        return loss

