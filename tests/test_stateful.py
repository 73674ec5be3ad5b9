"""Stateful differential test: random sequences of calls mirrored on an oxoptim
optimizer and its torch twin, for every optimizer in ``optimizers.TWINS``.

After every rule the parameters, the optimizer state, the group settings and
``skipped_steps`` must agree with torch's: dtypes and shapes exactly, values
bit for bit for a ``bit_exact`` twin (SGD) and within torch's own tolerances
otherwise. Deliberate differences, each checked
where it happens:

* ``skip_nonfinite`` has no torch counterpart: torch's twin is stepped with the
  groups oxoptim skips set aside.
* A step both reject must raise the same exception type. Where oxoptim's own
  checks reject it, its parameters and state are left as they were (torch's
  may half-update), and torch's twin is given oxoptim's values again; where the
  group ran torch's implementation (a tensor or setting the kernels do not
  take), it fails half-way exactly as torch's twin does.
* oxoptim's ``load_state_dict`` rejects some malformed state that torch loads
  and then fails on at its next step (``STRICTER`` below).
* The ``foreach`` setting (torch's twin runs its for-loop reference) and the
  ``skip_nonfinite`` flag are not compared.

Differences below torch's tolerances (Adam's float32 tensor ``betas``) are
checked bit for bit in tests/test_torch_parity.py. Shrinking a failure takes
minutes, so it is off unless OXOPTIM_SHRINK=1.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
from typing import Any

import pytest
import torch
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

import oxoptim
from optimizers import INVALID_LOADS, SCALAR_STATE, STRICTER, TOLERANCE, TWIN_IDS, TWINS, Twin, always, assert_unchanged, changed_params, same_setting, snapshot

SHAPES = [(), (7,), (17,), (3, 5), (2, 3, 4)]  # few, so that gradients can be shared
MAX_GROUPS = 3
# How a step's gradients come: new, none, the previous one, the very tensor
# another parameter got, a non-contiguous one.
GRAD_KINDS = ("fresh", "fresh", "none", "keep", "share", "strided")
# Hyper-parameters the machine changes between steps, where the twin has them.
MUTABLE = ("lr", "momentum", "betas", "weight_decay")
# Settings torch's twin may hold differently: the implementation choice and oxoptim's own option.
UNCOMPARED_SETTINGS = {"params", "foreach", "skip_nonfinite"}


def _all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _serialised(obj: Any) -> Any:
    """``obj`` through torch.save / torch.load, as a checkpoint would carry it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _as_hyper(value: Any, as_tensor: bool, dtype: torch.dtype) -> Any:
    if not as_tensor or isinstance(value, bool):
        return value
    if isinstance(value, tuple):
        return tuple(torch.tensor(v, dtype=dtype) for v in value)
    return torch.tensor(value, dtype=dtype)


def _copy_hyper(value: Any) -> Any:
    """The same setting for torch's twin, tensors not shared."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copy_hyper(v) for v in value)
    return value


def _assert_close(ours: Any, theirs: Any, what: str, exact: bool, tolerance: Any = None) -> None:
    if not isinstance(ours, torch.Tensor):
        assert float(ours) == float(theirs), what
        return
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, f"{what}: {ours.dtype}{tuple(ours.shape)} vs torch's {theirs.dtype}{tuple(theirs.shape)}"
    table = tolerance or TOLERANCE
    tol = dict(rtol=0, atol=0) if exact else table.get(ours.dtype, table[torch.float32])
    torch.testing.assert_close(ours.detach(), theirs.detach(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)




def _mirror(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (``clone`` makes a strided view contiguous):
    torch's own reductions (Adafactor's norms) round differently on another layout."""
    if t.is_contiguous() or t._base is None:
        return t.clone()
    return t._base.clone().as_strided(t.size(), t.stride(), t.storage_offset())

def _misshaped(opt, key: str, value: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``opt`` refuses to load state ``key`` of ``param`` for its shape."""
    try:
        opt._check_entry("", key, value, param)
    except ValueError:
        return True
    return False

class OptimizerMirror(RuleBasedStateMachine):
    """One oxoptim optimizer and its torch twin, driven by the same calls."""

    twin: Twin

    @initialize(data=st.data())
    def build(self, data) -> None:
        self.hyper = data.draw(self.twin.hyper(), label="hyper")
        self.skip = data.draw(st.booleans(), label="skip_nonfinite")
        self.gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        self.skipped = 0  # what oxoptim's skipped_steps must read
        groups_ours, groups_theirs = [], []
        for _ in range(data.draw(st.integers(1, 2), label="groups")):
            mine, ref = self._new_params(data)
            groups_ours.append({"params": mine})
            groups_theirs.append({"params": ref})
        self.ours = self.twin.make_ours(groups_ours, skip_nonfinite=self.skip, **self.hyper)
        self.theirs = self.twin.make_semantics(groups_theirs, **self.hyper)  # (gradients are reused and aliased here)

    def _new_params(self, data) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3), label="shapes")
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        values = [torch.randn(s, generator=self.gen, dtype=dtype) for s in shapes]
        return [v.clone().requires_grad_() for v in values], [v.clone().requires_grad_() for v in values]

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(_all_params(self.ours), _all_params(self.theirs)))

    # -- gradients and steps ------------------------------------------------

    def _set_grads(self, data) -> None:
        """Gives each parameter pair the same new gradient, none, the one it had,
        the very tensor another one got (shared), or a non-contiguous one."""
        given: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for p, q in self._pairs():
            how = data.draw(st.sampled_from(GRAD_KINDS), label="grad")
            key = (p.shape, p.dtype)
            if how == "none":
                p.grad = q.grad = None
            elif how == "share" and key in given:
                p.grad, q.grad = given[key]
            elif how != "keep" or p.grad is None:
                g = self._random_like(p, strided=how == "strided")
                p.grad, q.grad = g, _mirror(g)
                given[key] = (p.grad, q.grad)

    def _random_like(self, p: torch.Tensor, strided: bool) -> torch.Tensor:
        g = torch.randn(p.shape, generator=self.gen, dtype=p.dtype)
        if strided and p.dim() >= 1:
            wide = torch.zeros(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)
            wide[..., ::2] = g
            return wide[..., ::2]
        return g

    def _step_both(self) -> None:
        self._step_both_unchecked()
        for p, q in self._pairs():
            self._drop_misshaped_state(p, q)

    def _drop_misshaped_state(self, p: torch.Tensor, q: torch.Tensor) -> None:
        misshaped = [k for k, v in self.ours.state.get(p, {}).items() if torch.is_tensor(v) and k not in SCALAR_STATE and _misshaped(self.ours, k, v, p)]
        if misshaped:
            # torch's Rprop creates ``step_size`` like the gradient (``full_like(grad)``),
            # torch's Adafactor ``row_var``/``col_var`` from the gradient's shape,
            # before its step fails on this gradient; oxoptim, running torch's
            # ``_init_group``, holds the same state (compared by mirrors_torch), on
            # which torch fails at every later step. Deliberately stricter
            # (python/oxoptim/_state.py), oxoptim refuses to load (and copy)
            # a state tensor whose shape is not its parameter's, where torch loads
            # it (casting its state to the parameters' dtypes, so it is not loaded
            # here: the twins would part); checked here, then the poisoned entry is dropped in both,
            # as a user would have to, so that the machine goes on.
            assert (self.twin.name, misshaped) in [("rprop", ["step_size"]), ("adafactor", ["row_var", "col_var"])], misshaped
            before = snapshot(self.ours)
            with pytest.raises(ValueError, match="but the parameter"):
                self.ours.load_state_dict(_serialised(self.ours.state_dict()))
            assert_unchanged(self.ours, before)
            del self.ours.state[p], self.theirs.state[q]

    def _step_both_unchecked(self) -> None:
        skipped = [i for i, g in enumerate(self.ours.param_groups) if g.get("skip_nonfinite") and _nonfinite(g)]
        before = snapshot(self.ours)
        errors = []
        try:
            self.ours.step()
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - compared with torch's below
            errors.append(e)
        # torch's twin steps without the groups oxoptim skips (their parameter lists set aside).
        # A skipped group is untouched, its group-level state (Schedule-Free's step count) included;
        # except Prodigy's, whose one estimate of d every group stores: a skipped group is a group
        # without gradients, which the reference's step updates too.
        shared_estimate = isinstance(self.ours, oxoptim.Prodigy)
        set_aside = [(self.theirs.param_groups[i], dict(self.theirs.param_groups[i])) for i in skipped]
        for group, _ in set_aside:
            group["params"] = []
        try:
            self.theirs.step()
            errors.append(None)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            for group, saved in set_aside:
                if shared_estimate:
                    group["params"] = saved["params"]
                else:
                    group.clear()
                    group.update(saved)
        ours_error, torch_error = errors
        event(f"step: {type(torch_error).__name__ if torch_error else 'ok'}")
        assert type(ours_error) is type(torch_error), f"step: oxoptim raised {ours_error!r}, torch raised {torch_error!r}"
        if ours_error is None:
            self.skipped += len(skipped)
            return
        # Groups skipped before the one that failed are counted.
        counted = self.ours.skipped_steps - self.skipped
        assert 0 <= counted <= len(skipped), f"skipped_steps moved by {counted} in a failed step skipping at most {len(skipped)} groups"
        self.skipped += counted
        if str(ours_error) != str(torch_error):
            self._after_rejected_step(before)
        # else the group ran torch's own implementation (a tensor or setting the
        # kernels do not take) and failed half-way exactly as torch's twin did.

    def _after_rejected_step(self, before) -> None:
        """oxoptim's own check rejected a group. Groups are stepped in order and
        each is all or nothing, so the groups up to the last one that changed
        were stepped (compared with torch's as usual: a half-stepped group would
        differ) and those after it are untouched; torch's twin, which may have
        half-updated them, is given oxoptim's values there."""
        group_of = [i for i, g in enumerate(self.ours.param_groups) for _ in g["params"]]
        changed = changed_params(self.ours, before, allow_fresh_state=True)
        first_untouched = max((group_of[k] for k in changed), default=-1) + 1
        self._give_torch_our_values([k for k, g in enumerate(group_of) if g >= first_untouched])

    def _give_torch_our_values(self, indices: list[int]) -> None:
        """Copies oxoptim's parameter values and state at ``indices`` to torch's twin."""
        pairs = self._pairs()
        with torch.no_grad():
            for p, q in (pairs[k] for k in indices):
                q.copy_(p)
                if p in self.ours.state:
                    self.theirs.state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.ours.state[p].items()}
                else:
                    self.theirs.state.pop(q, None)

    @rule(data=st.data())
    def backward(self, data) -> None:
        """New gradients without a step (the next rule may re-point ``.data``)."""
        self._set_grads(data)

    @rule(data=st.data())
    def step(self, data) -> None:
        if data.draw(st.booleans(), label="new gradients"):
            self._set_grads(data)
        self._step_both()

    @precondition(lambda self: any(g.get("skip_nonfinite") for g in self.ours.param_groups))
    @rule(data=st.data())
    def step_with_a_nonfinite_gradient(self, data) -> None:
        self._set_grads(data)
        skipping = [i for i, g in enumerate(self.ours.param_groups) if g.get("skip_nonfinite")]
        index = data.draw(st.sampled_from(skipping), label="group")
        pairs = list(zip(self.ours.param_groups[index]["params"], self.theirs.param_groups[index]["params"]))
        p, q = pairs[data.draw(st.sampled_from(range(len(pairs))), label="param")]
        bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
        g = self._random_like(p, strided=False)
        g.view(-1)[data.draw(st.integers(0, p.numel() - 1), label="at")] = bad
        p.grad, q.grad = g, g.clone()
        self._step_both()

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none: bool) -> None:
        self.ours.zero_grad(set_to_none=set_to_none)
        self.theirs.zero_grad(set_to_none=set_to_none)

    # -- groups and settings --------------------------------------------------

    @precondition(lambda self: len(self.ours.param_groups) < MAX_GROUPS)
    @rule(data=st.data())
    def add_param_group(self, data) -> None:
        mine, ref = self._new_params(data)
        drawn = data.draw(self.twin.hyper(), label="group hyper")
        keys = data.draw(st.lists(st.sampled_from(sorted(k for k in MUTABLE if k in drawn)), unique=True), label="overrides")
        extra = {k: drawn[k] for k in keys}
        if self.skip:
            flag = data.draw(st.sampled_from([None, True, False]), label="group skip_nonfinite")
            if flag is not None:
                extra["skip_nonfinite"] = flag
        self.ours.add_param_group({"params": mine, **extra})
        self.theirs.add_param_group({"params": ref, **{k: _copy_hyper(v) for k, v in extra.items()}})

    @rule(data=st.data())
    def change_hyper_parameter(self, data) -> None:
        drawn = data.draw(self.twin.hyper(), label="hyper")
        name = data.draw(st.sampled_from(sorted(k for k in MUTABLE if k in drawn)), label="name")
        as_tensor = data.draw(st.booleans(), label="as tensor")
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="tensor dtype")
        value = _as_hyper(drawn[name], as_tensor, dtype)
        index = data.draw(st.sampled_from(range(len(self.ours.param_groups))), label="group")
        self.ours.param_groups[index][name] = value
        self.theirs.param_groups[index][name] = _copy_hyper(value)

    # -- state dicts, copies, parameter data ---------------------------------

    @rule(source=st.sampled_from(["oxoptim", "torch"]))
    def state_dict_round_trip(self, source: str) -> None:
        """Both load the state dict one of them saved (through torch.save)."""
        sd = (self.ours if source == "oxoptim" else self.theirs).state_dict()
        if self._lacks_required_state():
            # A setting changed after the state was made (RMSprop's momentum from 0):
            # torch loads such state and raises KeyError at its next step (as
            # the step rule checks); oxoptim, deliberately stricter
            # (python/oxoptim/_state.py), raises it at load and changes nothing.
            before = snapshot(self.ours)
            with pytest.raises(KeyError, match="has no"):
                self.ours.load_state_dict(_serialised(sd))
            assert_unchanged(self.ours, before)
            # torch's would load it (casting it to parameters made float64 since, say), and
            # both raise at the next step: both keep the state they had.
            return
        self.ours.load_state_dict(_serialised(sd))
        self.theirs.load_state_dict(_serialised(sd))
        if isinstance(sd.get("skipped_steps"), int):
            self.skipped = sd["skipped_steps"]

    def _lacks_required_state(self) -> bool:
        """Whether a non-empty state entry lacks one the group's current settings need."""
        return any(
            self.ours.state.get(p) and any(k not in self.ours.state[p] for k in self.ours.required_state(g))
            for g in self.ours.param_groups
            for p in g["params"]
        )

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def copy_both(self, how: str) -> None:
        clone = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
        copies, errors = [], []
        for opt in (self.ours, self.theirs):
            try:
                copies.append(clone(opt))
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - torch's deepcopy of a parameter whose stale gradient no longer fits
                errors.append(e)
        if errors[1] is None and self._lacks_required_state():
            # Copies pass the load checks: the KeyError of state_dict_round_trip.
            assert isinstance(errors[0], KeyError), errors[0]
            return
        assert type(errors[0]) is type(errors[1]), f"{how}: oxoptim raised {errors[0]!r}, torch raised {errors[1]!r}"
        if errors[0] is None:
            for name in self.twin.theirs_unpickled:  # oxoptim's copies keep them (asserted by stepping on)
                setattr(copies[1], name, getattr(self.theirs, name))
            self.ours, self.theirs = copies
            assert type(self.ours) is self.twin.ours

    @rule(data=st.data())
    def swap_data(self, data) -> None:
        """``p.data = ...`` on a parameter pair: new values, or a non-contiguous layout."""
        pairs = self._pairs()
        p, q = pairs[data.draw(st.sampled_from(range(len(pairs))), label="param")]
        strided = data.draw(st.booleans(), label="strided")
        new = self._random_like(p, strided=strided)
        p.data = new
        q.data = _mirror(new)

    @precondition(lambda self: any(p.dtype == torch.float32 for p in _all_params(self.ours)))
    @rule()
    def model_double(self) -> None:
        """What ``model.double()`` does: every parameter's ``.data`` and its gradient's
        ``.data`` become float64; the optimizer state stays as it is."""
        for opt in (self.ours, self.theirs):
            grads = {id(p.grad): p.grad for p in _all_params(opt) if p.grad is not None}
            for p in _all_params(opt):
                p.data = p.data.double()
            for g in grads.values():
                g.data = g.data.double()

    @precondition(lambda self: any(p.dim() >= 2 and p not in self.ours.state for p in _all_params(self.ours)))
    @rule(data=st.data())
    def step_after_transposing_a_parameter(self, data) -> None:
        """backward(), then ``p.data`` of a stateless parameter re-pointed to a
        transposed shape, then step(): its gradient has the right size but not
        the parameter's shape."""
        pairs = [(p, q) for p, q in self._pairs() if p.dim() >= 2 and p not in self.ours.state]
        p, q = pairs[data.draw(st.sampled_from(range(len(pairs))), label="param")]
        self._set_grads(data)
        g = self._random_like(p, strided=False)
        p.grad, q.grad = g, g.clone()
        new = torch.randn(tuple(reversed(p.shape)), generator=self.gen, dtype=p.dtype)
        p.data = new
        q.data = new.clone()
        self._step_both()

    # A state already missing an entry its settings need (RMSprop's momentum set after its first
    # step) is itself refused at load (state_dict_round_trip): one fault per invalid load.
    @precondition(lambda self: not self._lacks_required_state())
    @rule(data=st.data())
    def invalid_load(self, data) -> None:
        """A malformed state dict: oxoptim raises torch's exception type (or its
        documented stricter one) and changes nothing."""
        good = self.ours.state_dict()
        # (Entries the reference loads too, and so oxoptim: tests/test_torch_parity.py.)
        applicable = [c for c in INVALID_LOADS if c.applies(good) and c.name not in self.twin.loads_like_reference]
        about_state = [c for c in applicable if c.applies is not always]  # rarer: only once a step made state
        if about_state and data.draw(st.booleans(), label="about the state"):
            applicable = about_state
        case = data.draw(st.sampled_from(applicable), label="case")
        name = case.name
        event(f"invalid load: {name}")
        bad = case.make(good)
        probe = _copy_without_grads(self.theirs)
        try:
            probe.load_state_dict(copy.deepcopy(bad))
            expected: type = STRICTER[name] if name in STRICTER else AssertionError
        except Exception as e:  # noqa: BLE001
            expected = type(e)
        assert expected is not AssertionError, f"torch loads {name!r}: not an invalid case"
        before = snapshot(self.ours)
        with pytest.raises(expected):
            self.ours.load_state_dict(bad)
        assert_unchanged(self.ours, before)

    # -- the comparison ---------------------------------------------------------

    @invariant()
    def mirrors_torch(self) -> None:
        ours, theirs = self.ours, self.theirs
        assert ours.skipped_steps == self.skipped
        assert len(ours.param_groups) == len(theirs.param_groups)
        for i, (g, h) in enumerate(zip(ours.param_groups, theirs.param_groups)):
            assert len(g["params"]) == len(h["params"])
            for key in (g.keys() | h.keys()) - UNCOMPARED_SETTINGS:
                a, b = g.get(key), h.get(key)
                if not self.twin.bit_exact and type(a) is float and type(b) is float:
                    # Settings a step computes (Prodigy's d, d_max, d_numerator...): to rounding.
                    assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12), f"group {i} {key}: {a!r} vs torch's {b!r}"
                    continue
                assert same_setting(a, b), f"group {i} {key}: {a!r} vs torch's {b!r}"
        exact = self.twin.bit_exact
        for i, (p, q) in enumerate(self._pairs()):
            _assert_close(p, q, f"param {i}", exact, self.twin.tolerance)
            s, t = ours.state.get(p, {}), theirs.state.get(q, {})
            assert s.keys() == t.keys(), f"state {i}: {sorted(s)} vs torch's {sorted(t)}"
            for key in s:
                _assert_close(s[key], t[key], f"state {i} {key!r}", exact, self.twin.tolerance)


def _copy_without_grads(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A deep copy to probe with, its parameters without gradients (deepcopy
    of a parameter whose stale gradient no longer fits its shape fails)."""
    memo = {id(p): p.detach().clone().requires_grad_(p.requires_grad) for p in _all_params(opt)}
    return copy.deepcopy(opt, memo)


def _nonfinite(group: dict) -> bool:
    return any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in group["params"])


def _machine(twin: Twin) -> type:
    return type(f"{twin.name.capitalize()}Mirror", (OptimizerMirror,), {"twin": twin})


PHASES = list(Phase) if os.environ.get("OXOPTIM_SHRINK") else [Phase.explicit, Phase.reuse, Phase.generate]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_random_call_sequences_mirror_torch(twin: Twin) -> None:
    budget = settings(settings.default, phases=PHASES, max_examples=max(10, settings.default.max_examples // 2), stateful_step_count=20, deadline=None)
    run_state_machine_as_test(_machine(twin), settings=budget)
