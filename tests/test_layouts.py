"""Any tensor layout gives torch's result and never a write outside the tensor:
hypothesis draws layouts (transposed, sliced, offset, channels_last, empty, 0-d)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from optimizers import TWIN_IDS, TWINS, Twin, assert_twin_matches, forbid_torch_fallback

LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "channels_last", "empty", "scalar", "strided"]


def _make(layout: str, gen: torch.Generator, guard: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf parameter in `layout`, and the whole buffer it lives in (pre-filled with `guard`)."""
    if layout == "contiguous":
        base = torch.randn(37, generator=gen)
        return base.requires_grad_(), base
    if layout == "transposed":
        base = torch.randn(5, 7, generator=gen)
        return base.t().requires_grad_(), base
    if layout == "sliced":  # every other column of a wider buffer
        base = torch.full((6, 10), guard)
        view = base[:, ::2]
        view.copy_(torch.randn(6, 5, generator=gen))
        return view.requires_grad_(), base
    if layout == "offset":  # storage_offset != 0, guards on both sides
        base = torch.full((50,), guard)
        view = base[7:40]
        view.copy_(torch.randn(33, generator=gen))
        return view.requires_grad_(), base
    if layout == "channels_last":
        base = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)
        return base.requires_grad_(), base
    if layout == "empty":
        base = torch.randn(4, 0, 3, generator=gen)
        return base.requires_grad_(), base
    if layout == "scalar":
        base = torch.randn((), generator=gen)
        return base.requires_grad_(), base
    # strided: a 1-D view with stride 3 into a guarded buffer
    base = torch.full((64,), guard)
    view = base[1::3]
    view.copy_(torch.randn(view.shape, generator=gen))
    return view.requires_grad_(), base


def _grad(param: torch.Tensor, gen: torch.Generator, layout: str) -> torch.Tensor:
    g = torch.randn(param.shape, generator=gen)
    if layout == "transposed_grad" and g.dim() == 2:
        return g.t().contiguous().t()
    return g


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@given(layouts=st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1), odd_grads=st.booleans())
def test_layouts_match_torch_and_stay_inside(twin: Twin, layouts, seed, odd_grads) -> None:
    assume(twin.steps_shape((4, 0, 3)) or "empty" not in layouts)  # torch cannot step it
    guard = 1234.5
    runs = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        gen = torch.Generator().manual_seed(seed)
        pairs = [_make(layout, gen, guard) for layout in layouts]
        params = [p for p, _ in pairs]
        opt = make_opt(params, **twin.typical)
        grad_gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(5):
            for p in params:
                g = torch.randn(p.shape, generator=grad_gen)
                if odd_grads and g.dim() == 2:
                    g = g.t().contiguous().t()  # a non-contiguous gradient of the same shape
                p.grad = g
            opt.step()
        runs.append(pairs)
    for (p_ours, base_ours), (p_ref, base_ref) in zip(*runs):
        assert_twin_matches(twin, p_ours.detach(), p_ref.detach())
        # Elements of the buffer outside the parameter keep their guard value.
        outside = torch.ones_like(base_ours, dtype=torch.bool)
        if p_ours.numel():
            marker = base_ours.detach().clone()
            probe = marker.as_strided(p_ours.shape, p_ours.stride(), p_ours.storage_offset() - base_ours.storage_offset())
            probe.fill_(float("nan"))
            outside = ~torch.isnan(marker)
        assert torch.equal(base_ours.detach()[outside], base_ref.detach()[outside])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_a_lazily_negated_gradient_is_read_as_its_values(twin: Twin) -> None:
    """A gradient with torch's neg bit (``z.conj().imag`` of one element, or ``torch._neg_view``)
    is contiguous, but its memory holds the values un-negated: it must not be read as raw memory."""
    runs = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        params = [torch.linspace(-1, 1, 6).requires_grad_(), torch.tensor([0.5]).requires_grad_()]
        opt = make_opt(params, **twin.typical)
        for step in range(3):
            params[0].grad = torch._neg_view(torch.linspace(0.2, 1.2, 6) * (step + 1))
            params[1].grad = torch.tensor([0.1 + (0.3 + step) * 1j]).conj().imag
            assert params[0].grad.is_neg() and params[1].grad.is_neg() and params[1].grad.is_contiguous()
            opt.step()
        runs.append([p.detach() for p in params])
    for ours, theirs in zip(*runs):
        assert_twin_matches(twin, ours, theirs)


def _grad_in(layout: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """A gradient of ``shape`` laid out as ``layout`` inside a larger buffer."""
    n = 1
    for d in shape:
        n *= d
    buffer = torch.randn(3 * n + 11, generator=gen)
    if layout == "offset":  # contiguous, storage_offset 5
        return buffer[5 : 5 + n].view(shape)
    if layout == "odd strides of size-1 dims":  # contiguous by torch's rule, strides not row-major
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        strides = [17 if d == 1 else s for d, s in zip(shape, strides)]
        return buffer.as_strided(shape, strides, 3)
    return buffer[: 2 * n : 2].view(-1).as_strided(shape, [2 * s for s in torch.empty(shape).stride()], 1)  # every other element


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("layout", ["offset", "odd strides of size-1 dims", "every other element"])
def test_gradients_in_any_layout_match_torch(twin: Twin, layout: str) -> None:
    """Gradients that are views (an offset into a buffer, size-1 dimensions with any stride,
    strided): read where torch reads them (the fresh-gradient description goes through DLPack)."""
    shapes = [(3, 4), (1, 5), (7,), (2, 1, 3)]
    runs = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        params = [torch.linspace(-1, 1, int(torch.tensor(s).prod())).reshape(s).requires_grad_() for s in shapes]
        opt = make_opt(params, **twin.typical)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = _grad_in(layout, tuple(p.shape), gen)
            opt.step()
        runs.append([p.detach() for p in params])
    for ours, theirs in zip(*runs):
        assert_twin_matches(twin, ours, theirs)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_gradients_viewing_one_flat_buffer_take_the_native_path(twin: Twin, monkeypatch) -> None:
    """Every gradient a view of one flat buffer (DDP's ``gradient_as_bucket_view``), parameters
    views of another: disjoint memory, stepped natively (Adafactor once declined any shared
    storage), with torch's numbers."""
    shapes = [(3, 4), (1, 5), (7,), (2, 1, 3)]
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    runs = []
    for ours, make_opt in ((True, twin.make_ours), (False, twin.make_theirs)):
        flat = torch.linspace(-1, 1, sum(sizes))
        params = [t.view(s).requires_grad_() for t, s in zip(flat.detach().split(sizes), shapes)]
        opt = make_opt(params, **twin.typical)
        gen = torch.Generator().manual_seed(0)
        buffer = torch.empty(sum(sizes))
        with monkeypatch.context() as mp:
            if ours:
                forbid_torch_fallback(mp)
            for _ in range(3):
                buffer.copy_(torch.randn(sum(sizes), generator=gen))
                for p, g in zip(params, buffer.split(sizes)):
                    p.grad = g.view(p.shape)
                opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert_twin_matches(twin, a, b)


def _repoint(t: torch.Tensor, view) -> None:
    t.data = view(t.data)


# Changes that keep a tensor's object, data pointer and element count (what the description
# cache once re-checked), made after a step cached its description. Each takes (opt, param, key).
STALE = {
    "state transposed in place": lambda opt, p, key: opt.state[p][key].t_(),
    "state viewed as int32": lambda opt, p, key: _repoint(opt.state[p][key], lambda d: d.view(torch.int32)),
    "state negated lazily": lambda opt, p, key: _repoint(opt.state[p][key], torch._neg_view),
    "step viewed as int32": lambda opt, p, key: _repoint(opt.state[p]["step"], lambda d: d.view(torch.int32)),
    "param viewed as int32": lambda opt, p, key: _repoint(p, lambda d: d.view(torch.int32)),
    "param negated lazily": lambda opt, p, key: _repoint(p, torch._neg_view),
}


@pytest.mark.parametrize(
    "twin,change",
    [(t, change) for change in STALE for t in TWINS if t.group_path and (not change.startswith("step") or "step" in t.ours.SCALAR_STATE)],
    ids=lambda v: v.name if isinstance(v, Twin) else v,
)
def test_a_tensor_changed_under_its_cached_description_is_read_again(twin: Twin, change: str) -> None:
    """The whole-group path caches tensor descriptions between steps. A tensor re-laid-out
    in place (``t_()``), re-typed or lazily negated under the same object and data pointer
    (``.data = .data.view(dtype)``, ``torch._neg_view``) is not the tensor described: it takes
    torch's path, which computes with it or raises its error, as the twin does."""
    key = twin.ours.PARAM_SHAPED[0]
    outcomes = []
    for make_opt in (twin.make_ours, twin.make_theirs):
        # No requires_grad: a parameter that requires grad must stay a float tensor.
        p = torch.linspace(-1, 1, 16).reshape(4, 4)
        opt = make_opt([p], **twin.typical)
        error = None
        for step in range(4):
            p.grad = torch.linspace(0.5, -0.3, 16).reshape(4, 4) * (step + 1)
            if step == 3:  # the first steps made the state and cached the descriptions
                if change.startswith("step"):  # the twins that keep one keep it in float32
                    assert opt.state[p]["step"].dtype == torch.float32
                STALE[change](opt, p, key)
            try:
                opt.step()
            except Exception as e:  # compared with the twin's
                error = (type(e), str(e))
                break
        outcomes.append((error, p.detach().clone(), opt.state[p][key].clone()))
    (error, p_ours, s_ours), (want, p_ref, s_ref) = outcomes
    assert error == want
    assert p_ours.dtype == p_ref.dtype and s_ours.dtype == s_ref.dtype
    for ours, theirs in ((p_ours, p_ref), (s_ours, s_ref)):
        if ours.dtype == torch.int32:  # the float32 bits, stepped by each before the change
            ours, theirs = ours.view(torch.float32), theirs.view(torch.float32)
        assert_twin_matches(twin, ours.resolve_neg(), theirs.resolve_neg(), equal_nan=True)
