"""The subgradient method for non-smooth objectives, on Rust SIMD kernels."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from . import _core
from ._hooks import load_hooks_outside, save_hooks_outside
from ._native import evaluate_closure, num_threads, scalar
from ._skip import SkipNonfinite, grads_nonfinite

__all__ = ["Subgradient"]

STEP_RULES = ("constant", "sqrt", "harmonic", "polyak")


class Subgradient(torch.optim.Optimizer):
    r"""The subgradient method: θ ← θ − αₜ·d, d = g + l1·sign(θ) + weight_decay·θ.

    It minimises ``f(θ) = loss(θ) + l1·‖θ‖₁ + ½·weight_decay·‖θ‖²`` (with
    ``maximize=True``, ``−loss(θ)`` plus the same penalties), where ``g`` is
    any subgradient of the loss (what ``backward()`` gives) and ``d`` is a
    subgradient of ``f``. The step size αₜ at step t = 0, 1, … follows
    ``step_rule``:

    * ``"constant"``: ``lr`` (converges to a band around f* of width ∝ lr);
    * ``"sqrt"``: ``lr / √(t+1)``;
    * ``"harmonic"``: ``lr / (t+1)``;
    * ``"polyak"``: ``lr · (f(θₜ) − f*) / ‖d‖²`` with ``f_star`` = f* and
      f(θₜ) the objective above (``lr=1`` is Polyak's rule); needs the loss
      (a closure or :meth:`record_loss`). ‖d‖² is taken over all Polyak groups.

    ``normalize=True`` divides the step by the group's ‖d‖₂ (not with Polyak).
    ‖d‖ and the penalties are deterministic parallel reductions in Rust; the
    update is one fused Rust pass per group, with the GIL released.

    The method is not a descent method, so the optimizer keeps the best
    iterate: whenever the loss is known (from the closure, or given with
    :meth:`record_loss` before :meth:`step`) the objective f(θₜ) is compared
    with the best seen and, if lower, θₜ is copied. :meth:`restore_best` writes
    it back. ``best_objective``, ``best_step``, the step count and the copies
    are all in :meth:`state_dict`.

    ``skip_nonfinite=True`` leaves a group untouched when one of its gradients
    holds a NaN/Inf and counts it in ``skipped_steps``.
    """

    # Attributes torch's Optimizer.__getstate__ would drop from a deepcopy or pickle.
    _COUNTERS = ("steps", "skipped_steps", "best_objective", "best_step", "last_objective", "_pending_loss")

    def __init__(
        self,
        params: Any,
        lr: float,
        *,
        step_rule: str = "constant",
        l1: float = 0.0,
        weight_decay: float = 0.0,
        normalize: bool = False,
        f_star: Optional[float] = None,
        maximize: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        if not 0.0 <= scalar(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_rule(step_rule, f_star)
        if not 0.0 <= l1:
            raise ValueError(f"Invalid l1 value: {l1}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(
            lr=lr,
            step_rule=step_rule,
            l1=l1,
            weight_decay=weight_decay,
            normalize=normalize,
            f_star=f_star,
            maximize=maximize,
            skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)
        self.steps = 0
        self.skipped_steps = 0
        self.best_objective = math.inf
        self.best_step: Optional[int] = None
        self.last_objective: Optional[float] = None
        self._pending_loss: Optional[float] = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._COUNTERS})
        return state

    def add_param_group(self, param_group: dict) -> None:
        """torch's, after checking a group's own ``step_rule`` and ``f_star``."""
        if isinstance(param_group, dict) and self.__dict__.get("defaults") is not None:
            _check_rule(param_group.get("step_rule", self.defaults["step_rule"]), param_group.get("f_star", self.defaults["f_star"]))
        super().add_param_group(param_group)

    def record_loss(self, loss: Any) -> None:
        """Gives the loss at the current parameters, for a :meth:`step` without closure."""
        self._pending_loss = scalar(loss)

    @torch.no_grad()
    def objective(self, loss: Any) -> float:
        """f(θ) at the current parameters for the given loss: ±loss + l1·‖θ‖₁ + ½·wd·‖θ‖²."""
        value = -scalar(loss) if _maximizes(self.param_groups) else scalar(loss)
        for group in self.param_groups:
            params = list(group["params"])
            l1, wd = scalar(group["l1"]), scalar(group["weight_decay"])
            if l1 != 0.0 and params:
                value += l1 * _norm(params, 1.0)
            if wd != 0.0 and params:
                value += 0.5 * wd * _norm(params, 2.0) ** 2
        return value

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Performs one subgradient step; ``closure`` re-evaluates the model and returns the loss.
        Every group is checked before anything is written: a refused step changes no parameter,
        counter, best iterate or recorded loss. Groups that disagree on ``maximize`` (a min-max
        problem) step, but keep no best iterate and cannot take Polyak's rule."""
        loss = evaluate_closure(closure)
        known = loss if loss is not None else self._pending_loss
        plans, skipped = [], 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rule = group["step_rule"]
            _check_rule(rule, group["f_star"])
            lr = scalar(group["lr"])  # a group's lr that is not a number is refused here, not mid-step
            grads = [p.grad for p in params]
            if group.get("skip_nonfinite") and grads_nonfinite(grads):
                skipped += 1
                continue
            if any(g.is_sparse for g in grads):
                raise RuntimeError("Subgradient does not support sparse gradients")
            if rule == "polyak" and known is None:
                raise RuntimeError("step_rule='polyak' needs the loss: pass a closure or call record_loss(loss)")
            plans.append((group, params, grads, lr))
        # The objective (the best iterate, Polyak's gap) needs one direction; groups that disagree on
        # maximize (a min-max problem) keep no best iterate and cannot take Polyak's rule.
        one_direction = len({bool(g["maximize"]) for g in self.param_groups}) == 1
        if known is not None and not one_direction and any(g["step_rule"] == "polyak" for g, *_ in plans):
            _maximizes(self.param_groups)  # raises its error
        objective = None if known is None or not one_direction else self.objective(known)

        # Nothing below raises on the inputs: the step is committed.
        self._pending_loss = None
        self.skipped_steps += skipped
        if objective is not None:
            self.last_objective = objective
            if objective < self.best_objective:
                self._save_best(objective)
        if not plans:
            return loss
        # ‖d‖² is read before any group moves (a group's Polyak step uses all Polyak groups' sum).
        sqs = [_direction_sq_norm(g, ps, gs) if g["step_rule"] == "polyak" or g["normalize"] else 0.0 for g, ps, gs, _ in plans]
        polyak_sq = sum(sq for (g, *_), sq in zip(plans, sqs) if g["step_rule"] == "polyak")
        t = self.steps
        for (group, params, grads, lr), sq in zip(plans, sqs):
            rule = group["step_rule"]
            if rule == "constant":
                alpha = lr
            elif rule == "sqrt":
                alpha = lr / math.sqrt(t + 1)
            elif rule == "harmonic":
                alpha = lr / (t + 1)
            else:
                assert objective is not None  # checked above
                gap = max(objective - float(group["f_star"]), 0.0)
                alpha = lr * gap / polyak_sq if polyak_sq > 0 else 0.0
            if group["normalize"] and rule != "polyak":
                alpha = alpha / math.sqrt(sq) if sq > 0 else 0.0
            _update(group, params, grads, alpha)
        self.steps += 1
        return loss

    @torch.no_grad()
    def restore_best(self) -> float:
        """Writes the best iterate seen back into the parameters; returns its objective."""
        if self.best_step is None:
            raise RuntimeError("no objective has been recorded yet (pass a closure or call record_loss)")
        params, bests = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if "best" in self.state[p]:
                    params.append(p)
                    bests.append(self.state[p]["best"])
        _copy(params, bests)
        return self.best_objective

    def _save_best(self, objective: float) -> None:
        params, bests = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "best" not in state:
                    state["best"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                params.append(p.detach())
                bests.append(state["best"])
        _copy(bests, params)
        self.best_objective = objective
        self.best_step = self.steps

    @save_hooks_outside
    def state_dict(self) -> dict:  # type: ignore[override]
        sd = super().state_dict()
        sd["subgradient"] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "best_objective": self.best_objective,
            "best_step": self.best_step,
            "last_objective": self.last_objective,
            "objective": self._objective_settings(),
        }
        return sd

    def _objective_settings(self) -> list:
        """What f is made of besides the loss: a best objective under other settings is not comparable."""
        return [[scalar(g["l1"]), scalar(g["weight_decay"]), bool(g["maximize"])] for g in self.param_groups]

    @load_hooks_outside
    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        extra = state_dict.pop("subgradient", {})
        super().load_state_dict(state_dict)
        self.steps = int(extra.get("steps", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.best_objective = float(extra.get("best_objective", math.inf))
        self.best_step = extra.get("best_step")
        self.last_objective = extra.get("last_objective")
        saved = extra.get("objective")
        if saved is not None and saved != self._objective_settings():
            # f changed (a continued stage with other l1/weight_decay/maximize): the best point is kept
            # in state["best"], but its objective is unknown under the new f, so any new point may replace it
            self.best_objective, self.last_objective = math.inf, None


def _check_rule(step_rule: Any, f_star: Any) -> None:
    """A group's step rule is one of :data:`STEP_RULES`; Polyak's has a number for ``f_star``."""
    if step_rule not in STEP_RULES:
        raise ValueError(f"Invalid step_rule {step_rule!r}: expected one of {STEP_RULES}")
    if step_rule == "polyak":
        if f_star is None:
            raise ValueError("step_rule='polyak' needs f_star, the optimal objective value")
        try:
            scalar(f_star)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"step_rule='polyak' needs f_star to be a number, got {f_star!r}") from e


def _maximizes(groups: list) -> bool:
    """Whether the objective is −loss: every group's ``maximize`` (one loss cannot be both)."""
    flags = {bool(g["maximize"]) for g in groups}
    if len(flags) > 1:
        raise ValueError("maximize differs between parameter groups: the objective has one loss, maximized or minimized")
    return flags == {True}


def _norm(tensors: list, p: float) -> float:
    value = _core.tensor_norm(tensors, p, num_threads=num_threads())
    if value is None:
        norms = torch.stack([torch.linalg.vector_norm(t.detach(), p, dtype=torch.float64) for t in tensors])
        value = float(torch.linalg.vector_norm(norms, p))
    return value


def _direction(group: dict, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    d = -g if group["maximize"] else g.clone()
    if group["weight_decay"] != 0:
        d.add_(p, alpha=scalar(group["weight_decay"]))
    if group["l1"] != 0:
        d.add_(torch.sign(p), alpha=scalar(group["l1"]))
    return d


def _direction_sq_norm(group: dict, params: list, grads: list) -> float:
    sq = _core.direction_sq_norm(
        params,
        grads,
        l1=scalar(group["l1"]),
        weight_decay=scalar(group["weight_decay"]),
        maximize=bool(group["maximize"]),
        num_threads=num_threads(),
    )
    if sq is None:
        sq = sum(float(_direction(group, p, g).double().square().sum()) for p, g in zip(params, grads))
    return sq


def _update(group: dict, params: list, grads: list, alpha: float) -> None:
    done = _core.subgradient_step(
        params,
        grads,
        step=alpha,
        l1=scalar(group["l1"]),
        weight_decay=scalar(group["weight_decay"]),
        maximize=bool(group["maximize"]),
        num_threads=num_threads(),
    )
    if not done:
        for p, g in zip(params, grads):
            p.add_(_direction(group, p, g), alpha=-alpha)


def _copy(dst: list, src: list) -> None:
    if dst and not _core.copy_scaled(dst, src, scale=1.0, num_threads=num_threads()):
        torch._foreach_copy_(dst, src)
