"""Where torch defines the behaviour, oxoptim's is torch's: load_state_dict's
hooks and exception types, tensor hyper-parameters, SGD's numbers bit for bit;
and copies and checkpoints keep what oxoptim adds (``skipped_steps``, the
Subgradient counters) without breaking torch's loading."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oxoptim
from optimizers import INVALID_LOADS, SCALAR_STATE, STRICTER, TOLERANCE, TWIN_IDS, TWINS, Twin, assert_unchanged, clone_params, same_setting, set_grads, snapshot

# Errors raised by torch's own load_state_dict code, which oxoptim runs: same message too.
TORCH_RAISES_ITSELF = {"a list", "a string", "None", "no 'state'", "no 'param_groups'", "one group too many", "a group one parameter short", "a group without 'params'", "'state' a list"}


def _trained_pair(twin: Twin, steps: int = 3):
    """oxoptim's and torch's optimizer, stepped alike on two groups."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in [(4,), (2, 3), ()]]
    mine, ref = clone_params(base), clone_params(base)
    ours = twin.make_ours([{"params": mine[:2]}, {"params": mine[2:]}], **twin.typical)
    theirs = twin.make_theirs([{"params": ref[:2]}, {"params": ref[2:]}], **twin.typical)
    for _ in range(steps):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    return ours, theirs


def _raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller compares it
        return e
    return None


# -- load_state_dict: hooks first, then the checks, then the load ----------------


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_pre_hooks_run_before_the_checks_and_post_hooks_after_the_load(twin: Twin) -> None:
    ours, theirs = _trained_pair(twin)
    good = ours.state_dict()
    key = next(k for k in good["state"][0] if k not in SCALAR_STATE)  # a tensor of the parameter's shape
    broken = copy.deepcopy(good)
    broken["param_groups"].append(copy.deepcopy(broken["param_groups"][-1]))  # torch's own check rejects it
    broken["state"][0][key] = torch.zeros(5)  # oxoptim's shape check would reject it
    for opt in (ours, theirs):
        calls = []

        def repair(optimizer, state_dict, calls=calls):
            calls.append("pre")
            state_dict["param_groups"] = state_dict["param_groups"][:2]
            state_dict["state"][0][key] = good["state"][0][key].clone()

        opt.register_load_state_dict_pre_hook(repair)
        opt.register_load_state_dict_post_hook(lambda optimizer, calls=calls: calls.append("post"))
        opt.load_state_dict(copy.deepcopy(broken))
        assert calls == ["pre", "post"], type(opt)
        assert torch.equal(opt.state[opt.param_groups[0]["params"][0]][key], good["state"][0][key])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_a_pre_hook_can_break_a_good_dict_and_nothing_changes(twin: Twin) -> None:
    ours, _ = _trained_pair(twin)
    good = ours.state_dict()
    calls = []

    def break_shape(optimizer, state_dict):
        key = next(k for k in state_dict["state"][0] if k not in SCALAR_STATE)
        state_dict["state"][0] = {**state_dict["state"][0], key: torch.zeros(5)}

    ours.register_load_state_dict_pre_hook(break_shape)
    ours.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"state\[0\].* has shape \(5,\) but the parameter has shape \(4,\)"):
        ours.load_state_dict(good)
    assert_unchanged(ours, before)
    assert calls == []  # as torch: no post hook after a rejected load


# -- exception types ------------------------------------------------------------


# Malformed state torch loads and steps on without an error, because its update
# never reads the value: RMSprop, Adadelta and Rprop count steps but do not use the count.
# prodigyopt's step counter is a Python int it only increments.
TORCH_STEPS_ON = {(name, "'step' two numbers") for name in ("rmsprop", "adadelta", "rprop")}

# Each twin with the cases its state dicts allow (SGD's have no 'step' to edit).
_CASES = [(twin, case) for twin in TWINS for case in INVALID_LOADS if case.applies(_trained_pair(twin)[0].state_dict())]


@pytest.mark.parametrize("twin,case", _CASES, ids=[f"{t.name}-{c.name}" for t, c in _CASES])
def test_malformed_state_dicts_raise_torchs_exception_type_and_change_nothing(twin: Twin, case) -> None:
    ours, theirs = _trained_pair(twin)
    bad = case.make(ours.state_dict())
    torch_error = _raised(lambda: theirs.load_state_dict(copy.deepcopy(bad)))
    before = snapshot(ours)
    ours_error = _raised(lambda: ours.load_state_dict(bad))
    if case.name in twin.loads_like_reference:
        assert torch_error is None and ours_error is None, (ours_error, torch_error)
        for opt in (ours, theirs):
            for p in (p for g in opt.param_groups for p in g["params"]):
                p.grad = torch.ones_like(p)
        before = snapshot(ours)
        ours_error, torch_error = _raised(ours.step), _raised(theirs.step)
        assert type(ours_error) is type(torch_error), (ours_error, torch_error)
        if ours_error is not None:
            assert_unchanged(ours, before)  # refused before anything was written
        return
    assert_unchanged(ours, before)
    if torch_error is not None:
        assert type(ours_error) is type(torch_error), (ours_error, torch_error)
        if case.name in TORCH_RAISES_ITSELF:
            assert str(ours_error) == str(torch_error)
        return
    # torch loaded it: oxoptim is stricter, and torch fails on it at its next step
    # (but for 'skipped_steps', an entry torch does not read).
    assert case.name in STRICTER, f"torch loads {case.name!r}"
    assert type(ours_error) is STRICTER[case.name], ours_error
    if case.name == "'skipped_steps' negative":
        return
    for p in (p for g in theirs.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    if (twin.name, case.name) in TORCH_STEPS_ON:
        # torch's step only increments this counter (``step += 1`` works on any
        # tensor), so it steps and keeps the malformed counter: oxoptim refuses it up front.
        assert _raised(theirs.step) is None
        assert theirs.state[theirs.param_groups[0]["params"][0]]["step"].shape == (2,)
        return
    assert _raised(theirs.step) is not None


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_state_entries_torch_treats_as_fresh_state_load_as_in_torch(twin: Twin) -> None:
    """An empty entry (any optimizer) or an SGD entry without a momentum buffer:
    torch loads it and starts that state afresh, and so does oxoptim."""
    ours, theirs = _trained_pair(twin)
    sd = ours.state_dict()
    if twin.name == "sgd":
        sd["state"][0] = {"note": "no buffer"}
    sd["state"][1] = {}
    for opt in (ours, theirs):
        opt.load_state_dict(copy.deepcopy(sd))
    gen = torch.Generator().manual_seed(1)
    mine, ref = ([p for g in o.param_groups for p in g["params"]] for o in (ours, theirs))
    for _ in range(3):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


# -- tensor hyper-parameters -----------------------------------------------------

ADAM_TWINS = [t for t in TWINS if t.name in ("adam", "adamw")]


@pytest.mark.parametrize("twin", ADAM_TWINS, ids=[t.name for t in ADAM_TWINS])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, amsgrad=True, maximize=True)], ids=["plain", "decay", "decay-amsgrad-maximize"])
def test_adam_with_tensor_lr_and_betas_is_torchs_bit_for_bit(twin: Twin, param_dtype, hyper_dtype, options) -> None:
    """torch computes the bias corrections of tensor betas in the tensor's dtype;
    oxoptim hands such groups to torch's implementation, so the numbers are torch's."""

    def hyper():
        return dict(lr=torch.tensor(0.01, dtype=hyper_dtype), betas=(torch.tensor(0.8, dtype=hyper_dtype), torch.tensor(0.99, dtype=hyper_dtype)), **options)

    _assert_steps_like_torch_bit_for_bit(twin, hyper, param_dtype)


def _assert_steps_like_torch_bit_for_bit(twin: Twin, hyper, param_dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(s, generator=gen, dtype=param_dtype) for s in [(1000,), (7, 3), ()]]
    mine, ref = clone_params(base), clone_params(base)
    ours, theirs = twin.make_ours(mine, **hyper()), twin.make_theirs(ref, **hyper())
    for _ in range(5):
        set_grads(gen, mine, ref)
        torch_error = _raised(theirs.step)
        ours_error = _raised(ours.step)
        # torch rejects some settings at its step (Rprop's tensor etas of another dtype than the parameters).
        assert type(ours_error) is type(torch_error), (ours_error, torch_error)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOLERANCE[param_dtype])
        assert torch.equal(a, b)
    for a, b in zip(mine, ref):
        assert ours.state[a].keys() == theirs.state[b].keys()
        for key in theirs.state[b]:
            assert same_setting(ours.state[a][key], theirs.state[b][key]), key


def _float_hyper(twin: Twin) -> dict:
    """The twin's typical settings over torch's defaults: its float hyper-parameters (tuples of floats included)."""
    defaults = {**twin.make_theirs([torch.zeros(1, requires_grad=True)]).defaults, **twin.typical}
    arguments = inspect.signature(twin.ours).parameters  # not group state such as Schedule-Free's weight_sum
    floats = {k: v for k, v in defaults.items() if k in arguments and (isinstance(v, float) or (isinstance(v, tuple) and v and all(isinstance(x, float) for x in v)))}
    return {**twin.typical, **floats}


def _as_tensors(kw: dict, names, dtype) -> dict:
    def tensor(v):
        return tuple(torch.tensor(x, dtype=dtype) for x in v) if isinstance(v, tuple) else torch.tensor(v, dtype=dtype)

    return {k: tensor(v) if k in names else v for k, v in kw.items()}


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["lr", "every float"])
def test_tensor_hyper_parameters_are_torchs_bit_for_bit(twin: Twin, param_dtype, hyper_dtype, which) -> None:
    """Every optimizer with its own float hyper-parameters given as 0-d tensors
    (the lr alone, or all of them): torch computes with them in their dtype,
    and oxoptim's numbers and state are torch's exactly (the kernels take only
    the tensors torch reads as plain numbers, EXACT_TENSOR_HYPER; the rest run
    torch's implementation)."""
    kw = _float_hyper(twin)
    names = {"lr"} if which == "lr" else {k for k, v in kw.items() if isinstance(v, (float, tuple))}
    _assert_steps_like_torch_bit_for_bit(twin, lambda: _as_tensors(kw, names, hyper_dtype), param_dtype)


@pytest.mark.parametrize("names", [("lr",), ("weight_decay",), ("lr", "weight_decay"), ("momentum",), ("dampening",)])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper_dtype", [torch.float32, torch.float64])
def test_sgd_with_tensor_hyper_parameters_is_torchs_bit_for_bit(names, param_dtype, hyper_dtype) -> None:
    """A tensor lr or weight_decay, which torch only reads as a number, stays on
    the kernels; a tensor momentum or dampening (arithmetic in the tensor's dtype
    in torch) takes torch's implementation. 0-d parameters included: torch
    promotes their arithmetic with a 0-d hyper-parameter tensor."""
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)

    def hyper():
        return {k: torch.tensor(v, dtype=hyper_dtype) if k in names else v for k, v in kw.items()}

    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen, dtype=param_dtype) for s in [(65,), (3, 5), ()]]
    mine, ref = clone_params(base), clone_params(base)
    ours, theirs = oxoptim.SGD(mine, **hyper()), torch.optim.SGD(ref, foreach=False, **hyper())
    for _ in range(5):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])


def test_only_tensor_hyper_parameters_torch_computes_with_leave_the_kernels(monkeypatch) -> None:
    """Float settings (and SGD's tensor lr) run the kernels, not torch's implementation;
    other tensor hyper-parameters run torch's. The first step is left out: it
    creates state (SGD's momentum buffer in torch's own step)."""
    from oxoptim._twin import TorchTwin
    from oxoptim.prodigy import ProdigyReference

    ran = []
    original = TorchTwin._torch_step
    monkeypatch.setattr(TorchTwin, "_torch_step", lambda self, group: (ran.append(type(self).__name__), original(self, group))[1])
    # Prodigy's step is global: its torch path is its reference's first pass, group by group.
    first_pass = ProdigyReference._moments
    monkeypatch.setattr(ProdigyReference, "_moments", lambda self, group, *a: (ran.append(type(self).__name__), first_pass(self, group, *a))[1])
    cases = [
        (oxoptim.Adam, dict(lr=0.01), False),
        (oxoptim.SGD, dict(lr=torch.tensor(0.1), momentum=0.9), False),
        (oxoptim.SGD, dict(lr=torch.tensor(0.1), weight_decay=torch.tensor(0.01)), False),
        (oxoptim.Adam, dict(lr=torch.tensor(0.01)), True),
        (oxoptim.SGD, dict(lr=0.1, momentum=torch.tensor(0.9)), True),
    ]
    for twin in TWINS:
        kw = _float_hyper(twin)
        cases += [(twin.make_ours, kw, False)]
        if twin.name != "sgd":
            cases += [(twin.make_ours, _as_tensors(kw, {"lr"}, torch.float64), True)]
    for cls, kw, torchs in cases:
        p = torch.randn(5, requires_grad=True)
        opt = cls([p], **kw)
        p.grad = torch.randn(5)
        opt.step()
        ran.clear()
        for _ in range(2):
            p.grad = torch.randn(5)
            opt.step()
        assert ran == ([type(opt).__name__] * 2 if torchs else []), (type(opt).__name__, kw)


# -- SGD bit for bit (the README's claim) -----------------------------------------


@given(data=st.data())
def test_sgd_matches_torch_for_loop_and_foreach_bit_for_bit(data) -> None:
    """float32/float64 SGD equals torch's for-loop and foreach implementations
    exactly, state included (torch's fused kernel orders its arithmetic
    differently, and bfloat16/float16 are computed in float32 here)."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    kw = data.draw(next(t for t in TWINS if t.name == "sgd").hyper(), label="hyper")
    foreach = data.draw(st.booleans(), label="foreach")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in [(), (1,), (17,), (3, 5), (257, 9)]]
    mine, ref = clone_params(base), clone_params(base)
    ours, theirs = oxoptim.SGD(mine, **kw), torch.optim.SGD(ref, foreach=foreach, **kw)
    for _ in range(5):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)
        if kw["momentum"]:
            assert torch.equal(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])


# -- copies and checkpoints keep skipped_steps --------------------------------------


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
def test_copies_keep_skipped_steps(twin: Twin, copier) -> None:
    p = torch.randn(4, requires_grad=True)
    opt = twin.make_ours([p], skip_nonfinite=True, **twin.typical)
    for bad in (float("nan"), float("inf")):
        p.grad = torch.full((4,), bad)
        opt.step()
    clone = copier(opt)
    assert clone.skipped_steps == 2
    clone.param_groups[0]["params"][0].grad = torch.full((4,), float("nan"))
    clone.step()
    assert clone.skipped_steps == 3 and opt.skipped_steps == 2


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_state_dict_carries_skipped_steps_only_with_the_option_and_torch_loads_it(twin: Twin) -> None:
    p, q, r = (torch.randn(4, requires_grad=True) for _ in range(3))
    plain = twin.make_ours([p], **twin.typical)
    assert "skipped_steps" not in plain.state_dict()  # torch's layout exactly
    opt = twin.make_ours([q], skip_nonfinite=True, **twin.typical)
    q.grad = torch.ones(4)
    opt.step()
    q.grad = torch.full((4,), float("nan"))
    opt.step()
    sd = _torch_saved(opt.state_dict())
    assert sd["skipped_steps"] == 1
    theirs = twin.make_theirs([r], **twin.typical)
    theirs.load_state_dict(sd)  # torch ignores the entry
    resumed = twin.make_ours([torch.randn(4, requires_grad=True)], skip_nonfinite=True, **twin.typical)
    resumed.load_state_dict(sd)
    assert resumed.skipped_steps == 1
    # A torch state dict (no count, no flag) keeps this optimizer's count and option.
    torch_sd = twin.make_theirs([torch.randn(4, requires_grad=True)], **twin.typical).state_dict()
    assert "skip_nonfinite" not in torch_sd["param_groups"][0]
    resumed.load_state_dict(torch_sd)
    assert resumed.skipped_steps == 1 and resumed.param_groups[0]["skip_nonfinite"] is True
    with pytest.raises(ValueError, match="skipped_steps"):
        resumed.load_state_dict({**sd, "skipped_steps": 1.5})


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_subgradient_copies_keep_their_counters(copier) -> None:
    w = torch.ones(5, requires_grad=True)
    opt = oxoptim.Subgradient([w], lr=0.1, step_rule="sqrt", skip_nonfinite=True)
    w.grad = torch.ones(5)
    opt.step(closure=lambda: torch.tensor(3.0))
    w.grad = torch.full((5,), float("nan"))
    opt.step()
    opt.record_loss(2.0)
    clone = copier(opt)
    names = ("steps", "skipped_steps", "best_objective", "best_step", "last_objective", "_pending_loss")
    assert [getattr(clone, n) for n in names] == [getattr(opt, n) for n in names] == [1, 1, 3.0, 0, 3.0, 2.0]
    w2 = clone.param_groups[0]["params"][0]
    w2.grad = torch.ones(5)
    clone.step()
    opt.param_groups[0]["params"][0].grad = torch.ones(5)
    opt.step()
    assert torch.equal(w2, w) and clone.steps == opt.steps == 2
