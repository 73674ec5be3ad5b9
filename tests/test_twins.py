"""Table-driven checks of every torch twin through the generic entry points
(`_core.step`, `_core.group_step`): SIMD backends agree bit for bit, bad calls
get clear errors and change nothing, tensors that do not match their
parameter go to torch's path, and half precision follows float32 math."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import oxoptim
from oxoptim import _core
from optimizers import TWIN_IDS, TWINS, Twin, assert_twin_matches, clone_params, set_grads


def _stepped_once(twin: Twin, shapes=((67,), (1000,), (3, 5)), dtype=torch.float32):
    """An optimizer of ours after one step (its state exists), and fresh grads."""
    gen = torch.Generator().manual_seed(3)
    params = clone_params([torch.randn(s, generator=gen, dtype=dtype) for s in shapes])
    opt = twin.make_ours(params, **twin.typical)
    set_grads(gen, params)
    opt.step()
    set_grads(gen, params)
    return opt, params


def _calls(opt, params):
    """The list-path arguments of each kernel call that steps `params` of `opt`'s
    first group (one, unless the state layout differs between parameters, as
    Adafactor's): copies of params and state."""
    calls = []
    for hyper, part in opt._kernel_calls(opt.param_groups[0], params):
        arrays, scalars = _core.layout(opt.KIND, hyper)
        new = [p.detach().clone() for p in part]
        state = [[opt.state[p][k].clone() for p in part] for k in arrays]
        cells = [[opt.state[p][k].clone() for p in part] for k in scalars]
        calls.append((new, [p.grad for p in part], state, cells, hyper))
    return calls


def _lists(opt, params):
    """The arguments of the one kernel call that steps `params` (twins with a group path)."""
    (call,) = _calls(opt, params)
    return call


GROUP_PATH_TWINS = [t for t in TWINS if t.group_path]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_every_simd_backend_is_bit_identical(twin: Twin) -> None:
    """The Python-visible kernels agree bit for bit across backends (scalar included)."""
    opt, params = _stepped_once(twin)
    results = {}
    for backend in oxoptim.supported_backends():
        results[backend] = []
        for new, grads, state, cells, hyper in _calls(opt, params):
            for _ in range(3):
                assert _core.step(opt.KIND, new, grads, state, cells, hyper, backend=backend)
            results[backend] += [*new, *(t for col in state + cells for t in col)]
    for backend, tensors in results.items():
        for a, b in zip(tensors, results["scalar"]):
            assert torch.equal(a, b), backend


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=[t.name for t in GROUP_PATH_TWINS])
def test_list_path_equals_group_path(twin: Twin) -> None:
    opt, params = _stepped_once(twin)
    new, grads, state, cells, hyper = _lists(opt, params)
    assert _core.step(opt.KIND, new, grads, state, cells, hyper)
    cache = _core.TensorCache()
    assert _core.group_step(opt.KIND, opt.param_groups[0]["params"], opt.state, cache, hyper)
    arrays, scalars = _core.layout(opt.KIND, hyper)
    for i, p in enumerate(params):
        assert torch.equal(new[i], p.detach())
        for column, key in zip(state + cells, arrays + scalars):
            assert torch.equal(column[i], opt.state[p][key]), key


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_bad_calls_raise_clear_errors_and_change_nothing(twin: Twin) -> None:
    opt, params = _stepped_once(twin)
    new, grads, state, cells, hyper = _calls(opt, params)[0]
    before = copy.deepcopy((new, state, cells))
    kind = opt.KIND
    some_key = next(iter(hyper))
    cases = [
        ((("no_such_optimizer", new, grads, state, cells, hyper)), "unknown optimizer"),
        (((kind, new, grads, state, cells, {k: v for k, v in hyper.items() if k != some_key})), f"missing hyper-parameter '{some_key}'|missing hyper-parameter \"{some_key}\""),
        (((kind, new, grads, state, cells, {**hyper, "lr_typo": 0.1})), 'unexpected hyper-parameter.*"lr_typo"'),
        (((kind, new, grads, state + [state[0]] if state else [[p.clone() for p in new]], cells, hyper)), "takes state"),
        (((kind, new, grads[:-1], state, cells, hyper)), f"expected {len(new)} tensors"),
    ]
    if cells:
        cases.append((((kind, new, grads, state, [], hyper)), "takes scalar state"))
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _core.step(*args)
        for a, b in zip(before[0] + [t for c in before[1] + before[2] for t in c], new + [t for c in state + cells for t in c]):
            assert torch.equal(a, b)


#: Values where the kernels take a number: torch uses some (``dampening=None`` without momentum,
#: ``step_sizes=(None, 50)``) and raises its own error on others (a bool ``weight_decay``, 10**400).
NOT_FLOAT64 = ("fast", None, True, 10**400)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_a_hyper_parameter_the_kernels_cannot_take_leaves_the_step_to_torch(twin: Twin) -> None:
    """The kernels decline it (``_core.step`` returns False, nothing written; the state layout,
    decided by flags, is still known), and the optimizer's step is torch's: the same result, or
    the same error with nothing changed."""
    opt, params = _stepped_once(twin)
    new, grads, state, cells, hyper = _calls(opt, params)[0]
    before = copy.deepcopy((new, state, cells))
    checked = 0
    for key, value in hyper.items():
        if isinstance(value, bool):
            continue
        wrongs = [(value[0], w) for w in NOT_FLOAT64] + [(w, value[1]) for w in NOT_FLOAT64] if isinstance(value, tuple) else NOT_FLOAT64
        for wrong in wrongs:
            _core.layout(opt.KIND, {**hyper, key: wrong})
            assert _core.step(opt.KIND, new, grads, state, cells, {**hyper, key: wrong}) is False, (key, wrong)
            for a, b in zip(before[0] + [t for c in before[1] + before[2] for t in c], new + [t for c in state + cells for t in c]):
                assert torch.equal(a, b)
            if key in opt.param_groups[0]:
                ours, theirs = _outcome(twin.make_ours, twin, key, wrong), _outcome(twin.make_theirs, twin, key, wrong)
                if isinstance(theirs, list):
                    assert isinstance(ours, list), (key, wrong, ours)
                    for a, b in zip(ours, theirs):
                        assert_twin_matches(twin, a, b, equal_nan=True)
                else:
                    # torch's message where torch is the reference; a reference package's own code
                    # words its errors otherwise. Where torch raises having changed the weights
                    # (10**400 as a beta, after the first parameter), oxoptim puts them back.
                    same = ours[:2] == theirs[:2] if twin.theirs.__module__.startswith("torch.optim") else ours[0] == theirs[0]
                    assert same and (ours[2] or not theirs[2]), (key, wrong, ours, theirs)
                checked += 1
    assert checked


def _outcome(make, twin: Twin, key: str, value) -> object:
    """One step with ``group[key] = value`` after an ordinary one: the parameters, or the error's
    type and message and whether nothing changed."""
    gen = torch.Generator().manual_seed(5)
    params = clone_params([torch.randn(s, generator=gen) for s in [(9,), (2, 3)]])
    opt = make(params, **twin.typical)
    set_grads(gen, params)
    opt.step()
    opt.param_groups[0][key] = value
    set_grads(gen, params)
    weights = [p.detach().clone() for p in params]
    try:
        opt.step()
    except Exception as e:
        return type(e), str(e), all(torch.equal(w, p) for w, p in zip(weights, params))
    return [p.detach().clone() for p in params]


def _grad_dtype(new, grads, state, cells):
    grads[0] = grads[0].double()


def _matrix(grads) -> int:
    return next(i for i, g in enumerate(grads) if g.dim() == 2)


def _grad_shape(new, grads, state, cells):
    grads[_matrix(grads)] = grads[_matrix(grads)].reshape(5, 3)  # same numel as the (3, 5) parameter


def _grad_not_contiguous(new, grads, state, cells):
    grads[_matrix(grads)] = grads[_matrix(grads)].t().contiguous().t()


def _state_dtype(new, grads, state, cells):
    state[0][0] = state[0][0].double()


def _state_length(new, grads, state, cells):
    state[0][0] = state[0][0][:-1]


def _scalar_dtype(new, grads, state, cells):
    cells[0][0] = cells[0][0].to(torch.bfloat16)


# Each edit makes one tensor unlike its parameter (state edits need state).
MISMATCHES = [_grad_dtype, _grad_shape, _grad_not_contiguous, _state_dtype, _state_length, _scalar_dtype]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_tensors_unlike_their_parameter_are_left_to_torch(twin: Twin) -> None:
    """A gradient or state entry with another dtype, shape or length: both paths
    return False (torch's path raises or promotes) and write nothing."""
    opt, params = _stepped_once(twin)
    for edit, call in ((e, c) for e in MISMATCHES for c in range(len(_calls(opt, params)))):
        new, grads, state, cells, hyper = _calls(opt, params)[call]
        if (edit in (_state_dtype, _state_length) and not state) or (edit is _scalar_dtype and not cells):
            continue
        if edit in (_grad_shape, _grad_not_contiguous) and all(g.dim() != 2 for g in grads):
            continue
        edit(new, grads, state, cells)
        before = copy.deepcopy((new, state, cells))
        assert not _core.step(opt.KIND, new, grads, state, cells, hyper), edit.__name__
        assert all(torch.equal(a, b) for a, b in zip(before[0], new)), edit.__name__
        if not twin.group_path:
            continue
        # The same tensors reached through a parameter group and its state.
        holders = [p.detach().clone().requires_grad_() for p in new]
        for h, g in zip(holders, grads):
            h.grad = torch.zeros_like(h)
            h.grad.data = g  # bypasses the grad setter's dtype and shape checks
        arrays, scalars = _core.layout(opt.KIND, hyper)
        st = {h: {**{k: state[j][i] for j, k in enumerate(arrays)}, **{k: cells[j][i] for j, k in enumerate(scalars)}} for i, h in enumerate(holders)}
        assert not _core.group_step(opt.KIND, holders, st, _core.TensorCache(), hyper), edit.__name__
        assert all(torch.equal(h.detach(), b) for h, b in zip(holders, before[0])), edit.__name__


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_gradient_of_another_shape_raises_like_torch(twin: Twin) -> None:
    """Not stepped as if it fit: torch's path runs and raises (after what torch
    itself writes first, e.g. AdamW's decay), as torch does."""
    outcomes = []
    for make in (twin.make_ours, twin.make_theirs):
        p = torch.linspace(-1, 1, 15).reshape(3, 5).requires_grad_()
        opt = make([p], **twin.typical)
        p.grad = torch.ones(3, 5)
        opt.step()
        p.grad.data = torch.ones(5, 3)  # same numel; the grad setter's shape check is bypassed
        with pytest.raises(RuntimeError) as info:
            opt.step()
        outcomes.append((type(info.value), p.detach().clone()))
    assert outcomes[0][0] is outcomes[1][0]
    torch.testing.assert_close(outcomes[0][1], outcomes[1][1])


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers ordered like their values (adjacent values differ by 1)."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_float32_math_rounded_to_storage(twin: Twin, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters: float32 math, parameters and state stored in the
    parameter dtype (torch's fused semantics), against torch's float32 step
    whose results are rounded to the storage dtype after every step."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen).to(dtype) for s in [(67,), (33, 3), (1,), (4096,)]]
    mine, ref = clone_params(base), clone_params([p.float() for p in base])
    ours, theirs = twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
    for _ in range(20):
        for p, q in zip(mine, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g, g.float()
        ours.step()
        theirs.step()
        with torch.no_grad():
            for q in ref:
                q.copy_(q.to(dtype))
                for key in twin.ours.PARAM_SHAPED:
                    if key in theirs.state[q]:
                        theirs.state[q][key].copy_(theirs.state[q][key].to(dtype))
    compared = off = 0
    for p, q in zip(mine, ref):
        pairs = [(p.detach(), q.detach().to(dtype))]
        pairs += [(ours.state[p][k], theirs.state[q][k].to(dtype)) for k in twin.ours.PARAM_SHAPED if k in ours.state[p]]
        for a, b in pairs:
            assert a.dtype == dtype
            compared += a.numel()
            off += int(((_ordered(a) - _ordered(b)).abs() > 1).sum())
    assert off <= 0.01 * compared, f"{off} of {compared} elements off by more than one ulp"


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_native_paths_run_and_torch_only_where_documented(twin: Twin) -> None:
    """The kernels really run: the list path on a first step (torch's only for
    state torch creates lazily: SGD's momentum buffer when dampening is not 0),
    then the fast path."""
    gen = torch.Generator().manual_seed(6)
    params = clone_params([torch.randn(s, generator=gen) for s in [(9,), (4, 3)]])
    opt = twin.make_ours(params, **twin.typical)
    torch_steps = []
    opt._torch_step = torch_steps.append  # instance attribute: shadows the method
    fast, slow = opt._fast_step, opt._list_step
    paths = []
    opt._fast_step = lambda group, cache: paths.append("fast") or fast(group, cache)
    opt._list_step = lambda group, ps, gs: paths.append("list") or slow(group, ps, gs)
    set_grads(gen, params)
    opt.step()
    lazy = twin.name == "sgd" and twin.typical.get("dampening", 0) != 0
    assert len(torch_steps) == (1 if lazy else 0)
    if lazy:
        del opt._torch_step  # let torch create the momentum buffers
        opt.step()
        opt._torch_step = torch_steps.append
    paths.clear()
    for _ in range(3):
        set_grads(gen, params)
        opt.step()
    # Without a group path (Adafactor), every step takes the list path, never torch's.
    assert paths == (["fast"] if twin.group_path else ["fast", "list"]) * 3 and len(torch_steps) == (1 if lazy else 0)


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("twin", [t for t in TWINS if t.ours.SCALAR_STATE], ids=[t.name for t in TWINS if t.ours.SCALAR_STATE])
def test_scalar_state_follows_the_default_dtype(twin: Twin, default: torch.dtype) -> None:
    """torch keeps step (and NAdam's mu_product, ASGD's eta and mu) in float64 under a float64
    default dtype, else float32: float64 cells are read and written as float64. ASGD rounds each
    new eta and mu to the default dtype first, a half-precision one too."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    cells = torch.float64 if default == torch.float64 else torch.float32
    try:
        gen = torch.Generator().manual_seed(7)
        params = [torch.randn(s, generator=gen, dtype=cells) for s in [(33,), (2, 5)]]
        mine, ref = clone_params(params), clone_params(params)
        ours, theirs = twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
        for _ in range(8):
            set_grads(gen, mine, ref)
            ours.step()
            theirs.step()
    finally:
        torch.set_default_dtype(before)
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-7)
        for key in twin.ours.SCALAR_STATE:
            assert ours.state[p][key].dtype == theirs.state[q][key].dtype == cells
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key


@pytest.mark.parametrize("twin", [t for t in TWINS if t.ours.SCALAR_STATE], ids=[t.name for t in TWINS if t.ours.SCALAR_STATE])
def test_scalar_state_is_torchs_bit_for_bit(twin: Twin) -> None:
    """step (and mu_product, eta, mu) come out exactly as torch's float32 0-d tensors."""
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(s, generator=gen) for s in [(17,), (3, 2)]]
    mine, ref = clone_params(params), clone_params(params)
    ours, theirs = twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
    for step in range(12):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
        # Every step: a one-ulp slip in mu_product can round away again later.
        for p, q in zip(mine, ref):
            for key in twin.ours.SCALAR_STATE:
                assert torch.equal(ours.state[p][key], theirs.state[q][key]), (step, key)


def test_sgd_without_momentum_needs_no_state_and_takes_the_fast_path() -> None:
    params = clone_params([torch.randn(5), torch.randn(2, 3)])
    opt = oxoptim.SGD(params, lr=0.1)
    opt._general_step = lambda group, native: pytest.fail("general path taken")
    for _ in range(3):
        set_grads(torch.Generator().manual_seed(0), params)
        opt.step()
    assert len(opt.state) == 0


CAPTURABLE = [t for t in TWINS if "capturable" in inspect.signature(t.theirs).parameters]


@pytest.mark.parametrize("twin", CAPTURABLE, ids=[t.name for t in CAPTURABLE])
def test_capturable_runs_torchs_path(twin: Twin) -> None:
    """capturable=True on CPU tensors: torch's own step, which refuses them."""
    messages = []
    for make in (twin.make_ours, twin.make_theirs):
        p = torch.zeros(3, requires_grad=True)
        opt = make([p], **twin.typical, capturable=True)
        p.grad = torch.ones(3)
        with pytest.raises(Exception) as info:
            opt.step()
        messages.append((type(info.value), str(info.value)))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_hooks_run_once_when_torchs_path_steps_a_group(twin: Twin) -> None:
    """torch's own step (here for a non-contiguous parameter) runs unhooked:
    the optimizer's hooks fire once per step, even after torch hooked its class."""
    twin.theirs([torch.zeros(1, requires_grad=True)])  # torch wraps its class's step with the hook runner
    p = torch.randn(4, 3).t().requires_grad_()
    opt = twin.make_ours([p], **twin.typical)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert calls == ["pre", "post"] * 2


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_first_momentum_step_native_only_without_dampening(dampening: float) -> None:
    """SGD's first momentum step runs on the kernels from a zero buffer when that
    equals torch's copy of the gradient (dampening 0), else torch's code."""
    gen = torch.Generator().manual_seed(7)
    params = clone_params([torch.randn(s, generator=gen) for s in [(9,), (4, 3)]])
    ref = clone_params(params)
    opt = oxoptim.SGD(params, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01)
    theirs = torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01, foreach=False)
    torch_steps = []
    step = opt._torch_step
    opt._torch_step = lambda group: torch_steps.append(group) or step(group)
    for _ in range(3):
        set_grads(gen, params, ref)
        opt.step()
        theirs.step()
    assert len(torch_steps) == (0 if dampening == 0 else 1)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


def test_asgd_eta_and_mu_rounded_like_torch_in_float64_state() -> None:
    """torch stores each new eta/mu via ``torch.as_tensor(float)`` (the default
    dtype) even when a load cast those cells to float64: ours must round alike."""
    gen = torch.Generator().manual_seed(11)
    opts, params = [], []
    for make in (oxoptim.ASGD, lambda ps, **kw: torch.optim.ASGD(ps, foreach=False, **kw)):
        p = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
        opt = make([p], lr=0.01, lambd=1e-4, t0=1.0)
        p.grad = torch.ones_like(p)
        opt.step()
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0]["eta"] = sd["state"][0]["eta"].double()  # what a load into float64 params does
        sd["state"][0]["mu"] = sd["state"][0]["mu"].double()
        opt.load_state_dict(sd)
        opts.append(opt)
        params.append(p)
    for _ in range(3):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        for opt, p in zip(opts, params):
            p.grad = g.clone()
            opt.step()
    ours, theirs = (o.state[p] for o, p in zip(opts, params))
    assert ours["eta"].dtype == theirs["eta"].dtype == torch.float64
    for key in ("eta", "mu", "ax"):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(params[0], params[1])


def _pairs(twin: Twin) -> dict:
    """The twin's hyper-parameters that are pairs (tuple defaults or typical values), as lists."""
    pairs = {k: list(v.default) for k, v in inspect.signature(twin.ours).parameters.items() if isinstance(v.default, tuple)}
    pairs.update({k: list(v) for k, v in twin.typical.items() if isinstance(v, tuple)})
    return pairs


TWINS_WITH_PAIRS = [t for t in TWINS if _pairs(t)]


@pytest.mark.parametrize("twin", TWINS_WITH_PAIRS, ids=[t.name for t in TWINS_WITH_PAIRS])
def test_pairs_given_as_lists_step_as_tuples_do(twin: Twin) -> None:
    """Hyper-parameter pairs (``betas``, ``etas``, ``step_sizes``, ``eps``) read from a JSON or YAML
    config are lists: the twin steps them as torch does, to the same bits as the tuples."""
    pairs = _pairs(twin)
    gen = torch.Generator().manual_seed(6)
    as_lists = clone_params([torch.randn(40, generator=gen)])
    as_tuples = clone_params(as_lists)
    kw = {**twin.typical, **pairs}
    ours = twin.make_ours(as_lists, **kw)
    reference = twin.make_ours(as_tuples, **{**kw, **{k: tuple(v) for k, v in pairs.items()}})
    ours.param_groups[0].update(pairs)  # some constructors convert: the group holds lists now
    for _ in range(3):
        set_grads(gen, as_lists, as_tuples)
        ours.step()
        reference.step()
    assert torch.equal(as_lists[0], as_tuples[0])


def test_adafactor_sizes_whose_square_root_pow_rounds_differently_match_torch() -> None:
    """torch's Adafactor divides by ``numel ** 0.5`` (Python: the C library's pow), which for some
    sizes is a last bit away from the square root: 3541 and 8414 elements among them."""
    gen = torch.Generator().manual_seed(11)
    mine = clone_params([torch.randn(n, dtype=torch.float64, generator=gen) for n in (3541, 8414)])
    ref = clone_params(mine)
    ours, theirs = oxoptim.Adafactor(mine, lr=0.01), torch.optim.Adafactor(ref, lr=0.01, foreach=False)
    for _ in range(3):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("twin", [t for t in TWINS if t.bit_exact], ids=[t.name for t in TWINS if t.bit_exact])
def test_a_numpy_float32_learning_rate_is_computed_as_torch_computes_it(twin: Twin) -> None:
    """A NumPy float32 ``lr`` (a schedule computed with NumPy): torch's Python arithmetic on it stays
    in float32 (NumPy 2), so the step must too, bit for bit."""
    import numpy as np
    gen = torch.Generator().manual_seed(12)
    mine = clone_params([torch.randn(1000, generator=gen)])
    ref = clone_params(mine)
    kw = {**twin.typical, "lr": np.float32(0.0123)}
    ours, theirs = twin.make_ours(mine, **kw), twin.make_theirs(ref, **kw)
    for _ in range(3):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    assert torch.equal(mine[0], ref[0])
