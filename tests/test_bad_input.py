"""Bad input: torch's error (type and message) where torch has one, a clear
error where it has none, and never a partial update."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch

import oxoptim
from optimizers import TOLERANCE, TWIN_IDS, TWINS, Twin, assert_unchanged, clone_params, set_grads, snapshot, state_of

BAD_HYPER = {
    "sgd": [dict(lr=-1.0), dict(lr=math.nan), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0), dict(lr=0.1, nesterov=True), dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True)],
    "adam": [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1e-8), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(betas=(math.nan, 0.9)), dict(weight_decay=-0.1)],
}
BAD_HYPER["adamw"] = BAD_HYPER["adam"]
BAD_HYPER["adagrad"] = [dict(lr=-1.0), dict(lr=math.nan), dict(lr_decay=-1.0), dict(weight_decay=-1.0), dict(initial_accumulator_value=-1.0), dict(eps=-1.0)]
BAD_HYPER["adamax"] = [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0)]
BAD_HYPER["nadam"] = [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0), dict(momentum_decay=-1.0)]
BAD_HYPER["radam"] = [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0)]
BAD_HYPER["adadelta"] = [dict(lr=-1.0), dict(lr=math.nan), dict(rho=1.5), dict(rho=-0.1), dict(eps=-1.0), dict(weight_decay=-1.0)]
BAD_HYPER["asgd"] = [dict(lr=-1.0), dict(lr=math.nan), dict(weight_decay=-1.0)]
BAD_HYPER["adafactor"] = [dict(lr=-1.0), dict(lr=math.nan), dict(beta2_decay=0.5), dict(eps=(-1.0, 1e-3)), dict(eps=(None, -1.0)), dict(d=0.5), dict(weight_decay=-1.0)]
BAD_HYPER["rprop"] = [dict(lr=-1.0), dict(lr=math.nan), dict(etas=(1.5, 1.2)), dict(etas=(0.5, 0.9))]
BAD_HYPER["rmsprop"] = [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0), dict(momentum=-0.5), dict(weight_decay=-1.0), dict(alpha=-0.1)]
# Reference packages beyond torch: where they check (SGDScheduleFree), their errors; where they
# check with `assert` (lion-pytorch: AssertionError, gone under -O) or not at all (AdamWScheduleFree,
# lion-pytorch's weight_decay), torch's ValueError wording, a documented difference.
BAD_HYPER["lion"] = [dict(lr=-1.0), dict(lr=math.nan), dict(lr=0.0), dict(betas=(1.5, 0.9)), dict(betas=(0.9, -0.1)), dict(betas=(math.nan, 0.9)), dict(weight_decay=-1.0)]
BAD_HYPER["adamw_schedulefree"] = [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0)]
# prodigyopt's own checks, plus what oxoptim refuses and it accepts: fsdp_in_use=True (it all-reduces
# on CUDA) and a slice_p that is not a positive int.
BAD_HYPER["prodigy"] = [dict(lr=-1.0), dict(lr=0.0), dict(lr=math.nan), dict(eps=0.0), dict(eps=math.nan), dict(d0=0.0), dict(betas=(1.0, 0.9)),
                        dict(betas=(0.9, -0.1)), dict(betas=(math.nan, 0.9)), dict(fsdp_in_use=True), dict(slice_p=0)]  # fmt: skip
BAD_HYPER["sgd_schedulefree"] = [dict(lr=-1.0), dict(lr=math.nan), dict(momentum=0.0), dict(momentum=1.0), dict(weight_decay=-1.0)]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_invalid_hyper_parameters_raise_torchs_errors(twin: Twin) -> None:
    for kw in BAD_HYPER[twin.name]:
        if twin.name == "sgd" and any(isinstance(v, float) and math.isnan(v) for v in kw.values()):
            continue  # torch.optim.SGD accepts NaN; see the next test
        errors = []
        for cls in (twin.ours, twin.theirs):
            try:
                cls([torch.randn(2, requires_grad=True)], **kw)
                errors.append(None)
            except Exception as e:  # noqa: BLE001
                errors.append((type(e), str(e)))
        assert errors[0] is not None, f"{kw} accepted"
        if errors[1] is None or errors[1][0] is AssertionError:
            # A reference package that accepts it or checks with `assert`: oxoptim raises torch's ValueError.
            assert not twin.torch_twin and errors[0][0] is ValueError, (kw, errors)
        else:
            assert errors[0] == errors[1], kw


@pytest.mark.parametrize("kw", [dict(lr=math.nan), dict(lr=0.1, momentum=math.nan), dict(lr=0.1, weight_decay=math.nan), dict(lr=0.1, dampening=math.nan)])
def test_nan_hyper_parameters_are_rejected_even_where_torch_accepts_them(kw) -> None:
    name = next(k for k, v in kw.items() if math.isnan(v))
    with pytest.raises(ValueError, match=f"Invalid .*{'learning rate' if name == 'lr' else name}.*nan"):
        oxoptim.SGD([torch.randn(2, requires_grad=True)], **kw)


def _trained(twin: Twin):
    gen = torch.Generator().manual_seed(0)
    params = clone_params([torch.randn(s, generator=gen) for s in [(4,), (2, 3)]])
    opt = twin.make_ours(params, **twin.typical)
    for _ in range(3):
        set_grads(gen, params)
        opt.step()
    return opt, params


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_rejected_load_state_dict_says_why_and_changes_nothing(twin: Twin) -> None:
    """Exception types are torch's (tests/test_torch_parity.py); the messages name the fault."""
    opt, params = _trained(twin)
    good = opt.state_dict()
    key = twin.ours.PARAM_SHAPED[0]

    def edited(fn):
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    cases = [
        (edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), ValueError, "different number of parameter groups"),
        (edited(lambda sd: sd["param_groups"][0]["params"].pop()), ValueError, "doesn't match the size"),
        (edited(lambda sd: sd["state"][1].__setitem__(key, torch.zeros(3, 2))), ValueError, rf"state\[1\]\['{key}'\] has shape \(3, 2\) but the parameter has shape \(2, 3\)"),
        (edited(lambda sd: sd["state"][1].__setitem__(key, [0.0] * 6)), TypeError, rf"state\[1\]\['{key}'\] must be a tensor, got list"),
        (edited(lambda sd: sd["state"].__setitem__(1, (1, 2))), TypeError, r"state\[1\] must be a dict, got tuple"),
        (edited(lambda sd: sd.pop("state")), KeyError, "state"),
        (edited(lambda sd: sd.__setitem__("skipped_steps", "3")), ValueError, "'skipped_steps' must be a non-negative int"),
    ]
    scalars = twin.ours.SCALAR_STATE
    arrays = [k for k in opt.required_state(opt.param_groups[0]) if k not in scalars]
    if arrays and (len(arrays) > 1 or scalars):  # an entry without its only tensor is fresh state
        missing = arrays[-1]
        cases.append((edited(lambda sd: sd["state"][1].pop(missing)), KeyError, rf"state\[1\] has no '{missing}' entry"))
    if "step" in scalars:
        cases += [
            (edited(lambda sd: sd["state"][0].pop("step")), KeyError, r"state\[0\] has no 'step' entry"),
            (edited(lambda sd: sd["state"][0].__setitem__("step", torch.zeros(3))), ValueError, r"state\[0\]\['step'\] must be a single real number"),
        ]
    before = snapshot(opt)
    for sd, error, message in cases:
        with pytest.raises(error, match=message):
            opt.load_state_dict(sd)
        assert_unchanged(opt, before)
    opt.load_state_dict(good)  # and the good one still loads


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_an_empty_first_state_entry_loads_or_fails_as_torch_and_a_failure_changes_nothing(twin: Twin) -> None:
    """torch's Adagrad reads the first entry's ``step`` after replacing its state: ours fails first."""
    opt, _ = _trained(twin)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {}
    theirs = twin.make_theirs(clone_params([torch.randn(4), torch.randn(2, 3)]), **twin.typical)
    try:
        theirs.load_state_dict(copy.deepcopy(sd))
    except Exception as e:
        before = snapshot(opt)
        with pytest.raises(type(e), match=re.escape(str(e))):
            opt.load_state_dict(sd)
        assert_unchanged(opt, before)
    else:
        opt.load_state_dict(sd)
        assert opt.state_dict()["state"].get(0, {}) == {}


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_integer_state_tensors_are_cast_to_the_parameter_dtype_as_torch_does(twin: Twin) -> None:
    key = twin.ours.PARAM_SHAPED[0]
    ours, _ = _trained(twin)
    theirs = twin.make_theirs(clone_params([torch.randn(4), torch.randn(2, 3)]), **twin.typical)
    sd = copy.deepcopy(ours.state_dict())
    sd["state"][0][key] = torch.arange(4)
    loaded = []
    for opt in (ours, theirs):
        opt.load_state_dict(copy.deepcopy(sd))
        loaded.append(opt.state[opt.param_groups[0]["params"][0]][key])
    assert loaded[0].dtype == loaded[1].dtype == torch.float32 and torch.equal(loaded[0], loaded[1])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_duplicate_parameter_in_a_group_behaves_like_torch(twin: Twin) -> None:
    results = []
    for make in (twin.make_ours, twin.make_semantics):
        p = torch.linspace(-1, 1, 7).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make([p, p], **twin.typical)
        for _ in range(3):
            p.grad = torch.ones(7)
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_overlapping_views_as_parameters_behave_like_torch(twin: Twin) -> None:
    results = []
    for make in (twin.make_ours, twin.make_theirs):
        base = torch.linspace(-1, 1, 10)
        a, b = base[:6].clone().requires_grad_(), None
        # Two leaf parameters sharing one storage, overlapping in elements 3..6.
        storage = torch.linspace(-1, 1, 10)
        a = torch.as_strided(storage, (6,), (1,), 0).detach().requires_grad_()
        b = torch.as_strided(storage, (6,), (1,), 3).detach().requires_grad_()
        opt = make([a, b], **twin.typical)
        for _ in range(3):
            a.grad, b.grad = torch.ones(6), torch.full((6,), 0.5)
            opt.step()
        results.append(storage.clone())
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_mixed_dtypes_in_one_group(twin: Twin) -> None:
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(5, generator=gen, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32)]
    mine, ref = clone_params(params), clone_params(params)
    ours, theirs = twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
    for _ in range(5):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOLERANCE[a.dtype])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_mixed_devices_in_one_group_use_torchs_path(twin: Twin) -> None:
    """A group holding a CPU and a meta-device tensor falls back to torch as a
    whole: the same result, or the same error where torch cannot step meta
    tensors (ASGD reads its ``eta`` with ``.item()``)."""
    gen = torch.Generator().manual_seed(2)
    cpu = [torch.randn(5, generator=gen)]
    mine, ref = clone_params(cpu), clone_params(cpu)
    meta_a, meta_b = torch.empty(3, device="meta", requires_grad=True), torch.empty(3, device="meta", requires_grad=True)
    ours, theirs = twin.make_ours(mine + [meta_a], **twin.typical), twin.make_theirs(ref + [meta_b], **twin.typical)
    # prodigyopt half-creates its state on the first (failing) step, so its later steps fail
    # otherwise (KeyError) than ours, which writes nothing: compare its first step only.
    for _ in range(3 if twin.meta_params else 1):
        set_grads(gen, mine, ref)
        meta_a.grad, meta_b.grad = torch.empty(3, device="meta"), torch.empty(3, device="meta")
        errors = []
        for opt in (ours, theirs):
            try:
                opt.step()
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        assert errors[0] == errors[1]
    torch.testing.assert_close(mine[0], ref[0], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_params_without_requires_grad_are_left_alone(twin: Twin) -> None:
    frozen = torch.ones(3)
    live = torch.ones(3, requires_grad=True)
    opt = twin.make_ours([frozen, live], **twin.typical)
    initial = state_of(opt, frozen)
    live.grad = torch.ones(3)
    opt.step()
    assert torch.equal(frozen, torch.ones(3)) and state_of(opt, frozen) == initial


def test_two_threads_stepping_two_optimizers_at_once() -> None:
    import threading

    gen = torch.Generator().manual_seed(3)
    sets = [clone_params([torch.randn(50_000, generator=gen) for _ in range(8)]) for _ in range(2)]
    refs = [clone_params(s) for s in sets]
    grads = [[torch.randn(50_000, generator=gen) for _ in range(8)] for _ in range(2)]

    def train(params, cls, g, steps=20):
        opt = cls(params, lr=0.01)
        for _ in range(steps):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    threads = [threading.Thread(target=train, args=(sets[i], oxoptim.AdamW, grads[i])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        train(refs[i], torch.optim.AdamW, grads[i])
        for a, b in zip(sets[i], refs[i]):
            torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


def test_adafactor_state_of_another_shape_raises_like_torch() -> None:
    """``p.data`` re-pointed to the transposed shape after a step: its factors no
    longer fit (torch's lerp_ raises); the kernel, which reads a matrix's shape
    from its factors' lengths, must not step it as the old shape."""
    outcomes = []
    for cls in (oxoptim.Adafactor, torch.optim.Adafactor):
        p = torch.linspace(-1, 1, 15).reshape(3, 5).requires_grad_()
        opt = cls([p], lr=0.1)
        p.grad = torch.ones(3, 5)
        opt.step()
        p.data = p.data.t().contiguous()
        p.grad = torch.ones(5, 3)
        with pytest.raises(RuntimeError) as info:
            opt.step()
        outcomes.append((type(info.value), p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert outcomes[0][0] is outcomes[1][0]
    assert torch.equal(outcomes[0][1], outcomes[1][1])
    assert all(torch.equal(outcomes[0][2][k], outcomes[1][2][k]) for k in outcomes[1][2])


# Settings torch accepts (or that are set after construction, where torch checks nothing) whose step
# arithmetic torch does in Python floats, which raise: (class, constructor arguments, settings set
# after one good step or None to fail on the first step, the error).
def python_error(arithmetic) -> BaseException:
    """The error this interpreter's float arithmetic raises (its wording is the platform's)."""
    try:
        arithmetic()
    except ArithmeticError as e:
        return e
    raise AssertionError("no error")


DIVISION_BY_ZERO = python_error(lambda: 1.0 / 0.0)
POWER_OUT_OF_RANGE = python_error(lambda: 1e308 ** 2.0)
ZERO_TO_NEGATIVE_POWER = python_error(lambda: 0.0 ** -1.0)

PYTHON_ARITHMETIC_ERRORS = [
    ("Adagrad", dict(lr=0.1), dict(lr_decay=-1.0), DIVISION_BY_ZERO),
    ("Adagrad", dict(lr=0.1), dict(lr_decay=-0.5, initial_accumulator_value=0.0), None),  # fails a step later
    ("ASGD", dict(lr=0.1, alpha=1e308), None, POWER_OUT_OF_RANGE),
    ("ASGD", dict(lr=0.1), dict(alpha=-1e308), DIVISION_BY_ZERO),
    ("ASGD", dict(lr=0.1), dict(alpha=1e308), POWER_OUT_OF_RANGE),
    ("Adafactor", dict(lr=0.1), dict(d=0.0), DIVISION_BY_ZERO),
    ("Adafactor", dict(lr=0.1), dict(beta2_decay=1100.0), POWER_OUT_OF_RANGE),  # 2 ** 1100
    ("Adafactor", dict(lr=0.1), dict(beta2_decay=1100.0, d=0.0), POWER_OUT_OF_RANGE),  # the power comes first
    ("Adamax", dict(lr=0.1), dict(betas=(1.0, 0.999)), DIVISION_BY_ZERO),  # lr / (1 - beta1 ** step)
    ("RAdam", dict(lr=0.1), dict(betas=(0.9, 1.0)), DIVISION_BY_ZERO),  # 2 / (1 - beta2)
    ("RAdam", dict(lr=0.1), dict(betas=(0.9, -1.0)), DIVISION_BY_ZERO),  # 1 - (-1) ** 2 = 0
    ("NAdam", dict(lr=0.1), dict(momentum_decay=-1e6), POWER_OUT_OF_RANGE),  # 0.96 ** (-2e6)
    ("NAdam", dict(lr=0.1), dict(betas=(0.9, 1e308)), POWER_OUT_OF_RANGE),  # beta2 ** 2
]


@pytest.mark.parametrize("name, kwargs, later, error", PYTHON_ARITHMETIC_ERRORS, ids=[f"{c[0]}-{c[2] or c[1]}" for c in PYTHON_ARITHMETIC_ERRORS])
def test_step_arithmetic_torch_refuses_raises_its_error_and_changes_nothing(name, kwargs, later, error) -> None:
    """torch raises part way through its per-parameter loop (earlier parameters stepped); oxoptim
    raises the same error before anything is written, on the fast and the first-step paths."""
    if error is None:  # Adagrad's divisor 1 + (step - 1) * lr_decay reaches 0 at step 3
        error, failing_step = DIVISION_BY_ZERO, 3
    else:
        failing_step = 1 if later is None else 2
    raised = []
    for cls in (getattr(torch.optim, name), getattr(oxoptim, name)):
        params = [torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_(), torch.linspace(0, 1, 7).requires_grad_()]
        opt = cls(params, **kwargs)
        for step in range(1, failing_step + 1):
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            if step == 2 and later is not None:
                opt.param_groups[0].update(later)
            if step < failing_step:
                opt.step()
        before = snapshot(opt)
        with pytest.raises(type(error)) as info:
            opt.step()
        raised.append((type(info.value), info.value.args))
        if cls is getattr(oxoptim, name):
            assert_unchanged(opt, before)
    assert raised == [(type(error), error.args)] * 2


HUGE_SETTINGS = ("lr", "weight_decay", "momentum", "alpha", "lambd", "rho", "lr_decay", "step_sizes", "betas")


def _huge_cases() -> list:
    cases = []
    for twin in TWINS:
        group = twin.make_ours([torch.zeros(2, requires_grad=True)], **twin.typical).param_groups[0]
        for key in HUGE_SETTINGS:
            value = group.get(key)
            if isinstance(value, tuple):  # the last entry: Rprop's largest step size, beta2
                cases += [pytest.param(twin, key, (*value[:-1], v), id=f"{twin.name}-{key}-{v:g}") for v in (1e39, -1e39, 1e25)]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cases += [pytest.param(twin, key, v, id=f"{twin.name}-{key}-{v:g}") for v in (1e39, -1e39, 1e25)]
    return cases


@pytest.mark.parametrize("twin, key, value", _huge_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hyper_parameters_beyond_float32_raise_or_step_as_the_twin_and_a_failure_changes_nothing(twin: Twin, key, value, dtype) -> None:
    """torch converts some scalars to float32 with an overflow check ("value cannot be converted to
    type float without overflow") and raises part-way through its step; oxoptim runs the
    reference for such a group, so it raises the same error or steps to the same numbers, and
    puts back whatever the reference changed before raising."""
    outcomes = []
    for make in (twin.make_semantics, twin.make_ours):
        params = [torch.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4).requires_grad_(), torch.linspace(0, 1, 7, dtype=dtype).requires_grad_()]
        opt = make(params, **twin.typical)
        opt.param_groups[0][key] = value
        outcome: list = []
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 - step)
            before = snapshot(opt)
            try:
                opt.step()
            except Exception as e:  # noqa: BLE001 - the reference's error, whatever it is
                outcome.append((type(e), str(e)))
                if make == twin.make_ours:
                    assert_unchanged(opt, before)
                break
            outcome.append([p.detach().clone() for p in params])
        outcomes.append(outcome)
    theirs, ours = outcomes
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, tuple):
            assert a == b
        else:
            assert all(torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0)) and torch.equal(x.isnan(), y.isnan()) for x, y in zip(a, b))


def test_hyper_parameters_below_two_to_the_64_stay_on_the_kernels(monkeypatch) -> None:
    from optimizers import forbid_torch_fallback

    forbid_torch_fallback(monkeypatch)
    below = math.nextafter(oxoptim._native.HUGE_HYPER, 0.0)
    p = torch.linspace(-1, 1, 10, dtype=torch.float64).requires_grad_()
    p.grad = torch.ones_like(p)
    opt = oxoptim.Adam([p], lr=below, weight_decay=below)
    opt.step()
    opt.param_groups[0]["lr"] = oxoptim._native.HUGE_HYPER
    with pytest.raises(AssertionError, match="fell back"):
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999), (0.9, 0.0)], ids=str)
@pytest.mark.parametrize("counter", [-1.0, -5.0, -2.5, -1e30])
def test_adam_step_counter_out_of_range_raises_torchs_error_and_changes_nothing(name, dtype, betas, counter) -> None:
    """A step counter set to make the next step 0 or negative (or ``beta ** step`` overflow):
    torch's Python bias corrections raise (``lr / 0``, ``0.0 ** negative``, overflow) or turn
    complex (``(1 - beta2 ** step) ** 0.5`` of a negative number), which its tensor ops then
    refuse, having written the moments and the counter; oxoptim raises the same error first,
    changing nothing, on the whole-group path and the list path."""
    raised = []
    for cls in (getattr(torch.optim, name), getattr(oxoptim, name)):
        params = [torch.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4).requires_grad_(),
                  torch.linspace(0, 1, 7, dtype=dtype).requires_grad_()]
        opt = cls(params, lr=0.1, betas=betas)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        for p in params:
            opt.state[p]["step"].fill_(counter)
        for path in ("group", "list"):
            if path == "list" and cls is not getattr(oxoptim, name):
                break
            before = snapshot(opt)
            with warnings.catch_warnings(), pytest.raises(Exception) as info:
                warnings.simplefilter("ignore")  # torch: complex half types are experimental
                if path == "list":  # the list path: the call torch's first step would make
                    assert opt._list_step(opt.param_groups[0], params, [p.grad for p in params])
                else:
                    opt.step()
            raised.append((path, type(info.value), info.value.args))
            if cls is getattr(oxoptim, name):
                assert_unchanged(opt, before)
    (_, want_type, want), *ours = raised
    assert want_type is not AssertionError
    assert [(t, m) for _, t, m in ours] == [(want_type, want)] * 2


def test_adafactor_group_torch_fails_part_way_is_not_half_stepped() -> None:
    """A vector whose state stayed float32 after ``model.double()`` makes torch raise at that
    vector; a matrix after it in the group (fresh state) must not have been stepped by the
    kernel's first (matrices) call before the refusal."""
    outcomes = []
    for cls in (oxoptim.Adafactor, torch.optim.Adafactor):
        v, m = torch.linspace(-1, 1, 3).requires_grad_(), torch.linspace(-1, 1, 6).reshape(2, 3).requires_grad_()
        opt = cls([v, m], lr=0.1)
        v.grad = torch.full((3,), 0.5)
        opt.step()  # state for v only, float32
        for p in (v, m):
            p.data = p.data.double()
        v.grad, m.grad = torch.full((3,), 0.5, dtype=torch.float64), torch.full((2, 3), 0.5, dtype=torch.float64)
        before = m.detach().clone()
        with pytest.raises(RuntimeError) as info:
            opt.step()
        outcomes.append((str(info.value), v.detach().clone(), m.detach().clone()))
        assert torch.equal(m.detach(), before), cls
    assert outcomes[0][0] == outcomes[1][0]
    assert torch.equal(outcomes[0][1], outcomes[1][1]) and torch.equal(outcomes[0][2], outcomes[1][2])


@pytest.mark.parametrize(
    "cls, kwargs, error",
    [
        (oxoptim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1), "add(sparse, dense) is not supported"),
        (oxoptim.Adagrad, dict(weight_decay=0.1), "weight_decay option is not compatible with sparse gradients"),
        (oxoptim.AdamWScheduleFree, dict(), "Could not run 'aten::addcmul_'"),
        (oxoptim.SGDScheduleFree, dict(weight_decay=0.1), "add(sparse, dense) is not supported"),
    ],
    ids=["SGD", "Adagrad", "AdamWScheduleFree", "SGDScheduleFree"],
)
def test_a_sparse_gradient_the_reference_refuses_part_way_changes_nothing(cls, kwargs, error) -> None:
    """A group whose second parameter has a sparse gradient the reference cannot take (with weight
    decay; Schedule-Free's in-place ops): the reference raises when it reaches it, after stepping
    the first parameter (Adagrad: after counting its step; Schedule-Free: without moving the
    schedule on). oxoptim raises the same error with parameters, state and group as they were."""
    dense, sparse = torch.linspace(-1, 1, 5).requires_grad_(), torch.linspace(-1, 1, 12).reshape(4, 3).requires_grad_()
    opt = cls([dense, sparse], **kwargs)
    getattr(opt, "train", lambda: None)()
    dense.grad, sparse.grad = torch.full((5,), 0.5), torch.full((4, 3), 0.5)
    opt.step()  # state exists
    dense.grad, sparse.grad = torch.full((5,), 0.25), torch.eye(4, 3).to_sparse()
    before = snapshot(opt)
    with pytest.raises((RuntimeError, NotImplementedError), match=re.escape(error)):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("step", [-3.0, -1.0])
def test_adafactor_step_counter_torch_cannot_raise_to_a_power_raises_torchs_error(step: float) -> None:
    """A loaded counter that is -1 or below: torch's Adafactor raises (a complex ``step ** 0.5``, or
    ``0.0 ** beta2_decay``) and does not write NaN weights; oxoptim must not either."""
    outcomes = []
    for cls in (oxoptim.Adafactor, torch.optim.Adafactor):
        m, v = torch.linspace(-1, 1, 6).reshape(2, 3).requires_grad_(), torch.linspace(-1, 1, 3).requires_grad_()
        opt = cls([m, v], lr=0.1)
        m.grad, v.grad = torch.full((2, 3), 0.5), torch.full((3,), 0.5)
        opt.step()
        sd = opt.state_dict()
        for entry in sd["state"].values():
            entry["step"] = torch.tensor(step)
        opt.load_state_dict(sd)
        with pytest.raises(Exception) as info:
            opt.step()
        outcomes.append((type(info.value), m.detach().clone(), v.detach().clone()))
    assert outcomes[0][0] is outcomes[1][0]
    assert torch.equal(outcomes[0][1], outcomes[1][1]) and torch.equal(outcomes[0][2], outcomes[1][2])


def _reshape_state(opt, p, key) -> None:
    opt.state[p][key] = opt.state[p][key].reshape(8, 2).clone()


def _repoint_state(opt, p, key) -> None:
    opt.state[p][key].data = opt.state[p][key].data.view(8, 2)


def _repoint_param(opt, p, key) -> None:
    p.data = p.data.view(8, 2)


# A parameter of shape (2, 8) and a parameter-shaped state tensor whose shape no longer matches
# it, with the same number of elements (which is all that was checked).
SHAPE_MISMATCHES = {
    "state replaced by one of another shape": _reshape_state,
    "state re-pointed to another shape": _repoint_state,
    "parameter re-pointed to another shape": _repoint_param,
}
GROUP_TWINS = [t for t in TWINS if t.group_path]


@pytest.mark.parametrize("twin", GROUP_TWINS, ids=[t.name for t in GROUP_TWINS])
@pytest.mark.parametrize("case", list(SHAPE_MISMATCHES))
def test_state_of_another_shape_than_its_parameter_takes_torchs_path(twin: Twin, case: str) -> None:
    """torch's in-place ops between a (2, 8) and an (8, 2) tensor raise its size error; the
    native path must not step them as flat arrays of 16 elements (first and cached steps)."""
    key = twin.ours.PARAM_SHAPED[0]
    outcomes = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        p = torch.linspace(-1, 1, 16).reshape(2, 8).requires_grad_()
        opt = make_opt([p], **twin.typical)
        error = None
        for step in range(4):
            if step == 3:  # the state exists and its description is cached
                SHAPE_MISMATCHES[case](opt, p, key)
            p.grad = torch.linspace(0.5, -0.3, 16).reshape(p.shape) * (step + 1)
            try:
                opt.step()
            except RuntimeError as e:
                error = str(e)
                break
        outcomes.append((error, p.detach().clone(), opt.state[p][key].clone()))
    (error, p_ours, s_ours), (want, p_ref, s_ref) = outcomes
    assert want is not None and "must match the size" in want
    assert error == want
    assert p_ours.shape == p_ref.shape and s_ours.shape == s_ref.shape
    torch.testing.assert_close(p_ours, p_ref, **(twin.tolerance or TOLERANCE)[torch.float32])
    torch.testing.assert_close(s_ours, s_ref, **(twin.tolerance or TOLERANCE)[torch.float32])


KAHAN_TWINS = [t for t in TWINS if hasattr(t.ours, "_check_native") and "step" in t.ours.SCALAR_STATE]


@pytest.mark.parametrize("twin", KAHAN_TWINS, ids=[t.name for t in KAHAN_TWINS])
def test_a_step_counter_inside_the_kahan_compensation_is_refused(twin: Twin) -> None:
    """The compensation buffer is checked for shared memory like every other array: a step
    counter re-pointed into it (the kernel would write both) gets the option's native-only
    error and nothing changes, on the first-step and the cached path."""
    for warm in (False, True):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(64, generator=gen).bfloat16().requires_grad_()
        opt = twin.make_ours([p], **twin.typical, kahan_sum=True)
        for _ in range(2 if warm else 1):
            p.grad = torch.randn(64, generator=gen).bfloat16()
            opt.step()
        entry = opt.state[p]
        cell = entry["kahan_comp"].view(torch.float32)[0]
        cell.fill_(entry["step"].item())
        entry["step"] = cell
        p.grad = torch.randn(64, generator=gen).bfloat16()
        before = snapshot(opt)
        with pytest.raises(ValueError, match="kahan_sum=True runs on the native path only"):
            opt.step()
        assert_unchanged(opt, before)


def _inference_copy(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


# Tensors a step writes, made under torch.inference_mode() (state built or loaded there):
# torch refuses to update them in place outside it.
INFERENCE = {
    "state": lambda opt, p, key: opt.state[p].__setitem__(key, _inference_copy(opt.state[p][key])),
    "step counter": lambda opt, p, key: opt.state[p].__setitem__("step", _inference_copy(opt.state[p]["step"])),
}


def _native_writes(call: str, inference_role: int) -> bool:
    """Whether ``_core.<call>`` takes a batch whose role ``inference_role`` holds an inference tensor."""
    from oxoptim import _core

    lists = [[torch.linspace(-1, 1, 8)], [torch.linspace(1, 2, 8)]]
    lists[inference_role] = [_inference_copy(lists[inference_role][0])]
    calls = {
        "accumulate_mean": lambda a, b: _core.accumulate_mean(a, b, weight=0.5, first=False),
        "accumulate_mean, grads kept": lambda a, b: _core.accumulate_mean(a, b, weight=0.5, first=False, clear_grad=False),
        "lerp_average": lambda a, b: _core.lerp_average(a, b, weight=0.5),
        "copy_scaled": lambda a, b: _core.copy_scaled(a, b, scale=2.0),
        "scale_": lambda a, b: _core.scale_(a, scale=2.0),
        "subgradient_step": lambda a, b: _core.subgradient_step(a, b, step=0.1, l1=0.0, weight_decay=0.0, maximize=False),
        "tensor_norm": lambda a, b: _core.tensor_norm(a, 2.0) is not None,
        "quantize_blockwise": lambda a, b: _core.quantize_blockwise(
            a, [torch.zeros(8, dtype=torch.uint8)], [torch.zeros(1)], signed=True),
    }
    return calls[call](*lists)


@pytest.mark.parametrize("call, role, native", [
    ("accumulate_mean", 0, False), ("accumulate_mean", 1, False), ("accumulate_mean, grads kept", 1, True),
    ("lerp_average", 0, False), ("lerp_average", 1, True), ("copy_scaled", 0, False), ("copy_scaled", 1, True),
    ("scale_", 0, False), ("subgradient_step", 0, False), ("subgradient_step", 1, True), ("tensor_norm", 0, True),
    ("quantize_blockwise", 0, True),
])
def test_native_calls_leave_an_inference_tensor_they_would_write_to_torch(call: str, role: int, native: bool) -> None:
    """The averaging, clipping and subgradient entry points decline (torch's path, which refuses an
    in-place update of an inference tensor) when a tensor they write was made under
    ``torch.inference_mode()``; one they only read is fine."""
    assert _native_writes(call, role) is native


def test_clip_and_subgradient_on_inference_tensors_raise_torchs_error() -> None:
    """``clip_grad_norm_`` scales an inference-mode gradient and ``Subgradient`` updates an
    inference-mode parameter: torch's error, as ``torch.nn.utils.clip_grad_norm_`` and
    ``torch.optim.SGD`` raise it (they were updated silently)."""
    for clip in (torch.nn.utils.clip_grad_norm_, oxoptim.clip_grad_norm_):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = _inference_copy(torch.full((4,), 3.0))
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            clip([p], 1.0)
    for make in (lambda w: torch.optim.SGD([w], lr=0.1), lambda w: oxoptim.Subgradient([w], lr=0.1)):
        w = _inference_copy(torch.ones(4))
        w.grad = torch.ones(4)
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            make(w).step()


@pytest.mark.parametrize(
    "twin,made",
    [(t, made) for made in ["parameter", *INFERENCE] for t in GROUP_TWINS if made != "step counter" or "step" in t.ours.SCALAR_STATE],
    ids=lambda v: v.name if isinstance(v, Twin) else v,
)
def test_inference_tensors_the_step_writes_raise_torchs_error(twin: Twin, made: str) -> None:
    """An inference tensor (``is_inference()``) the step would update in place takes torch's
    path, which refuses it, on the first step (list path) and when its entry was replaced."""
    key = twin.ours.PARAM_SHAPED[0]
    outcomes = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        p = torch.linspace(-1, 1, 12).reshape(3, 4)
        if made == "parameter":  # stepped from the first step (the list path), then cached
            p = _inference_copy(p)
        opt = make_opt([p], **twin.typical)
        error = None
        for step in range(4):
            if step == 3 and made != "parameter":
                INFERENCE[made](opt, p, key)
            p.grad = torch.full((3, 4), 0.25 * (step + 1))
            try:
                opt.step()
            except RuntimeError as e:
                error = str(e)
                break
        outcomes.append((error, p.clone(), opt.state[p][key].clone() if key in opt.state[p] else None))
    (error, p_ours, s_ours), (want, p_ref, s_ref) = outcomes
    if twin.torch_twin:  # (prodigyopt updates p.data, which torch lets through)
        assert want is not None and "Inplace update to inference tensor outside InferenceMode" in want
    assert error == want
    if error is not None and not twin.torch_twin:
        return  # lion-pytorch has updated p.data (weight decay) before it raises; oxoptim's reference has not
    torch.testing.assert_close(p_ours, p_ref, **(twin.tolerance or TOLERANCE)[torch.float32])
    if s_ref is not None:
        torch.testing.assert_close(s_ours, s_ref, **(twin.tolerance or TOLERANCE)[torch.float32])


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("make_lr", [lambda: __import__("numpy").float64(1e39), lambda: torch.tensor(1e39, dtype=torch.float64)],
                         ids=["numpy-float64", "tensor-float64"])
def test_a_huge_hyper_parameter_of_another_number_type_takes_the_reference_too(name, make_lr) -> None:
    """The kernels take NumPy float64 and one-element tensors as numbers: a huge one is declined
    all the same, so torch's error comes, with nothing changed."""
    raised = []
    for cls in (getattr(torch.optim, name), getattr(oxoptim, name)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 8))
        p.grad = torch.ones(8)
        opt = cls([p], lr=0.1, foreach=False)
        opt.param_groups[0]["lr"] = make_lr()
        before = snapshot(opt)
        with pytest.raises(RuntimeError) as info:
            opt.step()
        raised.append(str(info.value))
        if cls is getattr(oxoptim, name):
            assert_unchanged(opt, before)
    assert raised[0] == raised[1] == "value cannot be converted to type float without overflow"
