"""The table of optimizers under test (optax style): every equivalence,
state_dict and threading test draws from here. Also the tables and helpers
the parity tests share: malformed state dicts, and snapshots of an optimizer
to check that a rejected call changed nothing."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import lion_pytorch
import prodigyopt
import schedulefree
import torch
from hypothesis import strategies as st

import oxoptim


@dataclass(frozen=True)
class Twin:
    """An oxoptim optimizer, its torch twin, a strategy for its hyper-parameters,
    and one setting that uses every state entry (what the shared tests construct).

    ``bit_exact``: float32/float64 results equal the twin's for-loop bit for bit
    (else they agree within torch's tolerances)."""

    name: str
    ours: type
    theirs: type
    hyper: Callable[[], st.SearchStrategy[dict[str, Any]]]
    typical: dict[str, Any] = field(default_factory=dict)
    bit_exact: bool = False
    # The for-loop implementation is torch's reference semantics; reference
    # packages beyond torch have only one.
    theirs_kwargs: dict[str, Any] = field(default_factory=lambda: {"foreach": False})
    # Attributes the reference keeps outside what torch pickles (so a copy of
    # it cannot step): the mirror restores them on its copies.
    theirs_unpickled: tuple[str, ...] = ()
    # What a training loop does to a new optimizer before stepping (Schedule-Free's train()).
    prepare: Callable[[Any], None] = lambda opt: None
    # The reference overwrites p.grad (schedulefree divides it in place), so a
    # gradient seen twice in one step (a parameter listed twice, two parameters
    # sharing one gradient) differs the second time; oxoptim leaves gradients
    # alone. Such cases compare with oxoptim's pure-torch statement of the
    # reference's maths (``ours._TORCH``, itself checked against the package).
    mutates_grad: bool = False
    # Whether the whole-group fast path (`_core.group_step`) takes its steps
    # (Adafactor's state layout differs between matrices and vectors: list path only).
    group_path: bool = True
    # Whether step_in_backward can step it (not Prodigy: its step needs every gradient first).
    in_backward: bool = True
    # Whether step_in_backward(release_rows=...) can update a weight row block by row block
    # (elementwise updates over parameter-shaped state; not Adafactor's factored moments).
    rows: bool = True
    # Whether groups may have different learning rates (prodigyopt: only the largest or 0).
    per_group_lr: bool = True
    # Whether the twin steps complex parameters (prodigyopt's estimate of d is a real number).
    complex_params: bool = True
    # Malformed-looking state entries the reference loads, and so does oxoptim, failing or not
    # on the next step as it does (prodigyopt re-creates an entry without 'step'; its 'step' is
    # an int it only increments).
    loads_like_reference: frozenset = frozenset()
    # Whether the reference steps a group holding a meta-device parameter (prodigyopt half-creates
    # its state: p.any() fails, its next step raises KeyError).
    meta_params: bool = True
    # Whether the twin (torch itself) can step a parameter of this shape.
    steps_shape: Callable[[tuple[int, ...]], bool] = lambda shape: True
    # Tolerances by dtype for twins that are not bit-exact (default: TOLERANCE).
    tolerance: Optional[dict] = None

    def make_ours(self, params, **kw):
        opt = self.ours(params, **kw)
        self.prepare(opt)
        return opt

    def make_theirs(self, params, **kw):
        opt = self.theirs(params, **self.theirs_kwargs, **kw)
        self.prepare(opt)
        return opt

    def make_semantics(self, params, **kw):
        """The reference for inputs that alias gradients (see ``mutates_grad``)."""
        if not self.mutates_grad:
            return self.make_theirs(params, **kw)
        opt = self.ours._TORCH(params, **kw)
        self.prepare(opt)
        return opt

    @property
    def torch_twin(self) -> bool:
        """Whether the twin is torch's own class (else a reference package's)."""
        return self.theirs.__module__.startswith("torch.")


def _sgd_hyper() -> st.SearchStrategy[dict[str, Any]]:
    def build(lr, momentum, dampening, weight_decay, nesterov, maximize):
        if nesterov:
            momentum, dampening = max(momentum, 0.1), 0.0
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)

    return st.builds(
        build,
        lr=st.sampled_from([1e-3, 0.01, 0.1]),
        momentum=st.sampled_from([0.0, 0.5, 0.9]),
        dampening=st.sampled_from([0.0, 0.1]),
        weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
        nesterov=st.booleans(),
        maximize=st.booleans(),
    )


def _adam_hyper(default_wd: float) -> Callable[[], st.SearchStrategy[dict[str, Any]]]:
    def strategy() -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {
                "lr": st.sampled_from([1e-3, 0.01, 0.1]),
                "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
                "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
                "weight_decay": st.sampled_from([0.0, default_wd, 0.1]),
                "amsgrad": st.booleans(),
                "maximize": st.booleans(),
            }
        )

    return strategy


def _adam_with_decoupled() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda d, dec: {**d, "decoupled_weight_decay": dec}, _adam_hyper(0.0)(), st.booleans())


def _rmsprop_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01]),
            "alpha": st.sampled_from([0.99, 0.9, 0.5]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "momentum": st.sampled_from([0.0, 0.5, 0.9]),
            "centered": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _adagrad_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01, 0.1]),
            "lr_decay": st.sampled_from([0.0, 0.01, 0.5]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "initial_accumulator_value": st.sampled_from([0.0, 0.1]),
            "eps": st.sampled_from([1e-10, 1e-3]),
            "maximize": st.booleans(),
        }
    )


def _adamax_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([2e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _nadam_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([2e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "momentum_decay": st.sampled_from([4e-3, 0.0, 0.1]),
            "decoupled_weight_decay": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _radam_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # beta2 = 0.999 or 0.9 rectifies from the 6th step on, 0.5 never.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.9), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "decoupled_weight_decay": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _adadelta_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1.0, 0.1]),
            "rho": st.sampled_from([0.9, 0.5]),
            "eps": st.sampled_from([1e-6, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _asgd_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # t0 = 3: averaging starts within the tests' steps (mu < 1 from step 5).
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([0.01, 0.1]),
            "lambd": st.sampled_from([1e-4, 0.1]),
            "alpha": st.sampled_from([0.75, 0.5]),
            "t0": st.sampled_from([1e6, 3.0]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _rprop_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # Tight step-size bounds make the clamp bite within the tests' steps.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([0.01, 0.1]),
            "etas": st.sampled_from([(0.5, 1.2), (0.3, 1.7)]),
            "step_sizes": st.sampled_from([(1e-6, 50.0), (0.005, 0.05)]),
            "maximize": st.booleans(),
        }
    )


def _adafactor_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # lr 0.1 and d 1.0 make rho_t = 1/sqrt(step) and clipping bite within the tests' steps.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([0.01, 0.1]),
            "beta2_decay": st.sampled_from([-0.8, -0.5]),
            "eps": st.sampled_from([(None, 1e-3), (1e-3, 1e-3), (1e-30, 0.1)]),
            "d": st.sampled_from([1.0, 2.0]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _nonempty(shape: tuple[int, ...]) -> bool:
    return math.prod(shape) > 0


def _lion_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-4, 1e-3, 0.01]),
            "betas": st.sampled_from([(0.9, 0.99), (0.95, 0.98), (0.3, 0.5)]),
            "weight_decay": st.sampled_from([0.0, 0.1, 1.0]),
        }
    )


def _schedule_free_hyper(first: dict[str, Any]) -> Callable[[], st.SearchStrategy[dict[str, Any]]]:
    def strategy() -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {
                **first,
                "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
                "warmup_steps": st.sampled_from([0, 2, 10]),
                "r": st.sampled_from([0.0, 1.0]),
                "weight_lr_power": st.sampled_from([2.0, 0.0]),
            }
        )

    return strategy


def _prodigy_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # d0 1e-2 and d_coef 2 make the estimate of d move within the tests' steps.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1.0, 0.5]),
            "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.99), (0.5, 0.9)]),
            "beta3": st.sampled_from([None, 0.9]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "decouple": st.booleans(),
            "use_bias_correction": st.booleans(),
            "safeguard_warmup": st.booleans(),
            "d0": st.sampled_from([1e-6, 1e-2]),
            "d_coef": st.sampled_from([1.0, 2.0]),
            "growth_rate": st.sampled_from([float("inf"), 1.02]),
        }
    )


def _train_mode(opt) -> None:
    opt.train()


TWINS = [
    Twin("sgd", oxoptim.SGD, torch.optim.SGD, _sgd_hyper, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), bit_exact=True),
    Twin("adam", oxoptim.Adam, torch.optim.Adam, _adam_with_decoupled, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    Twin("adamw", oxoptim.AdamW, torch.optim.AdamW, _adam_hyper(1e-2), dict(lr=0.01, amsgrad=True)),
    Twin("rmsprop", oxoptim.RMSprop, torch.optim.RMSprop, _rmsprop_hyper, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    Twin("adagrad", oxoptim.Adagrad, torch.optim.Adagrad, _adagrad_hyper, dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    Twin("adamax", oxoptim.Adamax, torch.optim.Adamax, _adamax_hyper, dict(lr=0.01, weight_decay=0.01), bit_exact=True),
    Twin("nadam", oxoptim.NAdam, torch.optim.NAdam, _nadam_hyper, dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)),
    Twin("radam", oxoptim.RAdam, torch.optim.RAdam, _radam_hyper, dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.01)),
    Twin("adadelta", oxoptim.Adadelta, torch.optim.Adadelta, _adadelta_hyper, dict(lr=0.5, weight_decay=0.01)),
    Twin("asgd", oxoptim.ASGD, torch.optim.ASGD, _asgd_hyper, dict(lr=0.05, lambd=0.01, t0=2.0, weight_decay=0.01), bit_exact=True),
    Twin("rprop", oxoptim.Rprop, torch.optim.Rprop, _rprop_hyper, dict(lr=0.01, step_sizes=(1e-4, 0.05)), bit_exact=True),
    # Adafactor: bit for bit, its reductions in the order of torch's CPU kernels
    # (rust/core/src/kernels/adafactor.rs). torch cannot step an empty
    # parameter (ZeroDivisionError in its RMS): those shapes are left out.
    Twin("adafactor", oxoptim.Adafactor, torch.optim.Adafactor, _adafactor_hyper, dict(lr=0.1, weight_decay=0.01, d=1.0), bit_exact=True,
         group_path=False, steps_shape=_nonempty, rows=False),
    # Beyond torch.optim: twins of their reference packages on PyPI.
    Twin("adamw_schedulefree", oxoptim.AdamWScheduleFree, schedulefree.AdamWScheduleFree,
         _schedule_free_hyper({"lr": st.sampled_from([1e-3, 0.01, 0.0025]), "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9)]), "eps": st.sampled_from([1e-8, 1e-3])}),
         dict(lr=0.01, weight_decay=0.01, warmup_steps=2), prepare=_train_mode, mutates_grad=True),
    Twin("sgd_schedulefree", oxoptim.SGDScheduleFree, schedulefree.SGDScheduleFree,
         _schedule_free_hyper({"lr": st.sampled_from([0.1, 1.0]), "momentum": st.sampled_from([0.9, 0.5])}),
         dict(lr=0.1, weight_decay=0.01, warmup_steps=2), bit_exact=True, prepare=_train_mode, mutates_grad=True),
    # Prodigy: each tensor's two sums of the estimate of d are reduced in a fixed order, not by
    # torch's dot/sum, so d (and through it every update) agrees to rounding; the reference adds
    # its coupled weight decay to p.grad in place.
    Twin("prodigy", oxoptim.Prodigy, prodigyopt.Prodigy, _prodigy_hyper, dict(weight_decay=0.01, decouple=False, d0=1e-2),
         theirs_kwargs={}, mutates_grad=True, in_backward=False, rows=False, per_group_lr=False, complex_params=False,
         meta_params=False,
         loads_like_reference=frozenset({"an entry without 'step'", "'step' not a number", "'step' two numbers"}),
         # To rounding only (each sum in a fixed order, not torch's dot): over many steps with lr 1,
         # d's last-bit difference grows in parameters whose second moment is tiny.
         tolerance={torch.float32: dict(rtol=1e-3, atol=1e-4), torch.float64: dict(rtol=1e-7, atol=1e-7)}),
    Twin("lion", oxoptim.Lion, lion_pytorch.Lion, _lion_hyper, dict(lr=1e-3, weight_decay=0.1), bit_exact=True, theirs_kwargs={}, theirs_unpickled=("_init_lr", "decoupled_wd", "update_fn")),
]
TWIN_IDS = [t.name for t in TWINS]

# Shapes: 0-d, empty, every vector-tail length class, odd 2-D, a larger one.
SHAPES = st.sampled_from(
    [(), (0,), (1,), (3,), (7,), (8,), (15,), (16,), (17,), (31,), (33,), (63,), (64,), (65,), (67,), (3, 5), (4, 0, 2), (2, 3, 7), (257, 9)]
)

# torch's own consistency tolerances (torch.testing defaults).
TOLERANCE = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}


def state_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> Any:
    """``p``'s state as plain values, None when it has none (Adagrad creates state up front)."""
    if p not in opt.state:
        return None
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(generator: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    """Gives every list the same fresh random gradients (each param its own tensor)."""
    for tensors in zip(*param_lists):
        g = torch.randn(tensors[0].shape, generator=generator, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = g.clone()


# Malformed state dicts, each (name, applies(state_dict), make(state_dict) -> the
# bad object), made from a good state dict of the optimizer that loads them.
def always(sd: dict) -> bool:
    return True


def _first_entry(sd: dict) -> dict:
    return next(e for e in sd["state"].values() if isinstance(e, dict) and e)


def _has_entry(sd: dict) -> bool:
    return any(isinstance(e, dict) and e for e in sd["state"].values())


def _has(key: str) -> Callable[[dict], bool]:
    return lambda sd: _has_entry(sd) and key in _first_entry(sd)


def _with(edit: Callable[[dict], Any]) -> Callable[[dict], dict]:
    """A copy of the state dict with ``edit`` applied (its return value ignored)."""

    def make(sd: dict) -> dict:
        sd = copy.deepcopy(sd)
        edit(sd)
        return sd

    return make


# torch's per-parameter state entries that are one number (0-d tensors), not
# tensors of the parameter's shape: the step counter, NAdam's mu_product, ASGD's eta and mu.
SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})


def _shaped_key(sd: dict) -> str:
    return next(k for k, v in _first_entry(sd).items() if isinstance(v, torch.Tensor) and k not in SCALAR_STATE)


def _has_shaped(sd: dict) -> bool:
    return _has_entry(sd) and any(isinstance(v, torch.Tensor) and k not in SCALAR_STATE for k, v in _first_entry(sd).items())


class InvalidLoad(NamedTuple):
    name: str
    applies: Callable[[dict], bool]
    make: Callable[[dict], Any]


INVALID_LOADS = [
    ("a list", always, lambda sd: [sd]),
    ("a string", always, lambda sd: "state"),
    ("None", always, lambda sd: None),
    ("no 'state'", always, _with(lambda sd: sd.pop("state"))),
    ("no 'param_groups'", always, _with(lambda sd: sd.pop("param_groups"))),
    ("one group too many", always, _with(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][-1])))),
    ("a group one parameter short", always, _with(lambda sd: sd["param_groups"][0]["params"].pop())),
    ("a group without 'params'", always, _with(lambda sd: sd["param_groups"][0].pop("params"))),
    ("'state' a list", always, _with(lambda sd: sd.__setitem__("state", list(sd["state"].values())))),
    ("an entry without 'step'", _has("step"), _with(lambda sd: _first_entry(sd).pop("step"))),
    ("'step' not a number", _has("step"), _with(lambda sd: _first_entry(sd).__setitem__("step", "x"))),
    ("'step' two numbers", _has("step"), _with(lambda sd: _first_entry(sd).__setitem__("step", torch.zeros(2)))),
    ("an entry that is a list", _has_entry, _with(lambda sd: sd["state"].__setitem__(next(k for k, e in sd["state"].items() if e), [1.0]))),
    # None is not a missing entry: torch's Adam raises TypeError on it at load (after replacing the state).
    ("an entry that is None", _has_entry, _with(lambda sd: sd["state"].__setitem__(next(k for k, e in sd["state"].items() if e), None))),
    # (Lion's exp_avg is its only entry: without it the entry is fresh state, not malformed.)
    ("a state tensor missing", lambda sd: _has("exp_avg")(sd) and len(_first_entry(sd)) > 1, _with(lambda sd: _first_entry(sd).pop("exp_avg"))),
    ("a state tensor of another shape", _has_shaped, _with(lambda sd: _first_entry(sd).__setitem__(_shaped_key(sd), torch.zeros(_first_entry(sd)[_shaped_key(sd)].numel() + 1)))),
    ("a state tensor that is a number", _has_shaped, _with(lambda sd: _first_entry(sd).__setitem__(_shaped_key(sd), 0.0))),
    ("'skipped_steps' negative", always, _with(lambda sd: sd.__setitem__("skipped_steps", -1))),
]
INVALID_LOADS = [InvalidLoad(*case) for case in INVALID_LOADS]
# Cases torch loads and oxoptim rejects (torch fails on them at its next step,
# or, for 'skipped_steps', does not read the entry): the exception oxoptim raises.
# Every other case torch rejects too, and oxoptim raises torch's exception type.
STRICTER = {
    "'step' two numbers": ValueError,
    "an entry that is a list": TypeError,  # torch's Adam rejects it too (TypeError); torch's SGD loads it
    "an entry that is None": TypeError,  # likewise
    "a state tensor missing": KeyError,
    "a state tensor of another shape": ValueError,
    "a state tensor that is a number": TypeError,
    "'skipped_steps' negative": ValueError,
}


@dataclass(frozen=True)
class Snapshot:
    params: list[torch.Tensor]
    state: dict[int, dict[str, Any]]
    settings: list[dict[str, Any]]
    skipped_steps: Any


def snapshot(opt: torch.optim.Optimizer) -> Snapshot:
    """Everything a rejected call must leave as it was: parameter values, state, settings, counters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return Snapshot(
        params=[p.detach().clone() for p in params],
        state={i: copy.deepcopy(opt.state[p]) for i, p in enumerate(params) if p in opt.state},
        settings=[copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        skipped_steps=getattr(opt, "skipped_steps", None),
    )


def changed_params(opt: torch.optim.Optimizer, before: Snapshot, allow_fresh_state: bool = False) -> list[int]:
    """Indices (over all groups) of the parameters whose value or state differs
    from ``before``. With ``allow_fresh_state``, a state entry that appeared all
    zeros is no change (torch's lazy initialisation runs before a step's checks)."""
    after = snapshot(opt)
    assert len(after.params) == len(before.params)
    changed = []
    for i, (a, b) in enumerate(zip(after.params, before.params)):
        same_param = same_setting(a, b)
        if i in before.state:
            same_state = i in after.state and same_setting(after.state[i], before.state[i])
        else:
            entry = after.state.get(i, {})
            same_state = not entry or (allow_fresh_state and all(not torch.is_tensor(v) or not v.count_nonzero() for v in entry.values()))
        if not (same_param and same_state):
            changed.append(i)
    return changed


def assert_unchanged(opt: torch.optim.Optimizer, before: Snapshot, allow_fresh_state: bool = False) -> None:
    """``opt`` is as ``before`` recorded it: parameters, state, group settings, ``skipped_steps``."""
    changed = changed_params(opt, before, allow_fresh_state)
    assert not changed, f"parameters {changed} (value or state) changed"
    after = snapshot(opt)
    assert len(after.settings) == len(before.settings) and all(map(same_setting, after.settings, before.settings)), "group settings changed"
    assert after.skipped_steps == before.skipped_steps, "skipped_steps changed"


def same_setting(a: Any, b: Any) -> bool:
    """Equal values: tensors of the same dtype, shape and values, tuples and
    dicts item by item, NaN equal to NaN."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and _equal_nan(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_setting(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


def assert_twin_matches(twin: Twin, actual: torch.Tensor, expected: torch.Tensor, equal_nan: bool = False) -> None:
    """``actual`` (oxoptim) against ``expected`` (torch) as closely as ``twin`` is claimed to match
    (``twin.bit_exact``: float32/float64 bit for bit). ``equal_nan``: NaN where torch has NaN is equal.
    A state entry that is a number (prodigyopt's ``step``) must be equal."""
    if not torch.is_tensor(expected):
        assert not torch.is_tensor(actual) and actual == expected, (actual, expected)
        return
    if twin.bit_exact and actual.dtype in (torch.float32, torch.float64):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        same = _equal_nan(actual, expected) if equal_nan else torch.equal(actual, expected)
        differ = int((actual != expected).sum()) if actual.numel() else 0
        assert same, f"{twin.name}: {differ} of {actual.numel()} elements differ from torch"
    else:
        # A twin matched to rounding may diverge with its reference (Prodigy at lr 1 over many
        # steps): NaN where the reference has NaN is the same result.
        torch.testing.assert_close(actual, expected, equal_nan=equal_nan or twin.tolerance is not None,
                                   **(twin.tolerance or TOLERANCE)[actual.dtype])


def forbid_torch_fallback(monkeypatch) -> None:
    """Makes oxoptim's use of torch's own step implementation an error, so that an equivalence
    test compares the Rust path with torch (and cannot pass by running torch against torch).
    The one documented exception: SGD's first momentum step, which creates the buffers
    (torch creates them lazily), runs torch's code for the parameters that lack one."""
    from oxoptim._twin import TorchTwin

    original = TorchTwin._torch_step

    def guarded(self, group):
        if isinstance(self, oxoptim.SGD) and group["momentum"] != 0 and any(
            p.grad is not None and self.state.get(p, {}).get("momentum_buffer") is None for p in group["params"]
        ):
            return original(self, group)
        raise AssertionError(f"{type(self).__name__} fell back to torch's implementation")

    monkeypatch.setattr(TorchTwin, "_torch_step", guarded)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """The float's bit pattern as an integer that counts representable values in order (±0 equal)."""
    bits = t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).long()
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def beyond_one_ulp_rate(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Fraction of elements more than one ulp (one representable step of their dtype) apart."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.numel() == 0:
        return 0.0
    return float(((_ordered(actual) - _ordered(expected)).abs() > 1).double().mean())
