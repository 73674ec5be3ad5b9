"""step_in_backward(release_rows=...): a token embedding and output head (tied or not) updated
row block by row block inside backward, bit-identical to the ordinary loop, their whole gradient
never formed; every optimizer of the table either does it or is refused at entry."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizers import TWINS, assert_unchanged, forbid_torch_fallback, snapshot
from test_step_in_backward import LOW_PRECISION as SIB_LOW_PRECISION
from test_step_in_backward import assert_same_training
from test_step_in_backward_ddp import DdpStandIn
from torch.utils._python_dispatch import TorchDispatchMode

import oxoptim
from oxoptim import _blockwise as bw
from oxoptim import rows, step_in_backward
from oxoptim.rows import _ACTIVE, _head_plus_embedding, weight_gradient_rows

LAYOUTS = ["tied", "untied", "embedding", "head"]
# The output layer by rows.linear + F.cross_entropy, or by rows.linear_cross_entropy (not in the
# embedding-only layout, which has no output layer).
LAYOUTS_AND_LOSSES = [(layout, "linear") for layout in LAYOUTS] + [
    (layout, "linear_cross_entropy") for layout in LAYOUTS if layout != "embedding"]


class TinyLM(torch.nn.Module):
    """``tied``: one weight is the embedding and the output layer; ``untied``: two weights;
    ``embedding``: an embedding whose output feeds a loss without an output layer; ``head``: an
    output layer whose input comes from a small ordinary (not released) embedding."""

    def __init__(self, layout: str, vocab: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                 chunked: int | None = None, cross_entropy: int | None = None) -> None:
        super().__init__()
        self.chunked = chunked  # the ordinary loop's output layer with release_rows' weight gradient
        self.cross_entropy = cross_entropy  # the head and loss by rows.linear_cross_entropy, this many classes a chunk
        gen = torch.Generator().manual_seed(seed)

        def param(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype) * 0.5)

        self.layout = layout
        self.emb = param(8 if layout == "head" else vocab, dim)
        self.mid = param(dim, dim)
        self.bias = param(dim)
        if layout in ("untied", "head"):
            self.head = param(vocab, dim)

    def released(self) -> list[torch.Tensor]:
        if self.layout in ("tied", "embedding"):
            return [self.emb]
        return [self.emb, self.head] if self.layout == "untied" else [self.head]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, y = ids[:, :-1], ids[:, 1:]
        e = F.embedding(x % 8, self.emb) if self.layout == "head" else rows.embedding(x, self.emb)
        h = torch.tanh(e @ self.mid.T + self.bias)
        if self.layout == "embedding":
            return h.square().mean()
        w = self.emb if self.layout == "tied" else self.head
        if self.cross_entropy:
            return rows.linear_cross_entropy(h, w, y, chunk_rows=self.cross_entropy)
        logits = ChunkedLinear.apply(h, w, self.chunked) if self.chunked else rows.linear(h, w)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class ChunkedLinear(torch.autograd.Function):
    """``F.linear(x, w)`` whose weight gradient is formed as release_rows forms it, ``chunk`` rows at
    a time: the reference that separates the update machinery from the BLAS's summation order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.chunk = chunk
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        n, dim = w.shape
        x2, g2 = x.reshape(-1, dim), grad.reshape(-1, n)
        gw = torch.cat([weight_gradient_rows(x2, g2, a, min(a + ctx.chunk, n)) for a in range(0, n, ctx.chunk)])
        return g2.mm(w).reshape(x.shape), gw, None


def released_now(model: torch.nn.Module) -> bool:
    """Whether a weight of ``model`` is released by an open context (others' may be: the benches')."""
    return any(id(p) in _ACTIVE for p in model.parameters())


def token_batches(n: int, vocab: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Few distinct tokens in a small vocabulary: repeated rows, runs of neighbouring rows.
    return [torch.randint(0, vocab, (2, 7), generator=gen) for _ in range(n)]


def train(model: TinyLM, opt, batches, sib: dict | None = None, decay: float = 0.7) -> None:
    """The ordinary loop, or the same inside step_in_backward(opt, **sib); lr decays each step."""
    def loop() -> None:
        for ids in batches:
            model(ids).backward()
            opt.step()
            opt.zero_grad()
            for group in opt.param_groups:
                group["lr"] *= decay

    if sib is None:
        loop()
    else:
        with step_in_backward(opt, **sib):
            loop()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (torch.equal takes -0 for +0)."""
    if not t.is_floating_point():
        return t
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same(a: TinyLM, opt_a, b: TinyLM, opt_b) -> None:
    assert_same_training(a, opt_a, b, opt_b, same=same_bits)


def ordinary(cls, batches, layout: str = "tied", row_chunk: int = 5, **hyper):
    """The ordinary loop on a 37 × 16 model with release_rows' weight gradient: the reference."""
    model = TinyLM(layout, 37, 16, chunked=row_chunk)
    opt = cls(model.parameters(), **hyper)
    train(model, opt, batches)
    return model, opt


def chunk_rows_of(opt, weight: torch.Tensor, row_chunk: int) -> int:
    """The classes per chunk of linear_cross_entropy on ``weight`` released with ``row_chunk``."""
    return rows.RowRelease(opt, weight, row_chunk, lambda: None, lambda: False).chunk_rows()


def refused(twin, hyper: dict) -> bool:
    return not twin.rows


@pytest.mark.parametrize("twin", [t for t in TWINS if t.in_backward], ids=[t.name for t in TWINS if t.in_backward])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_released_rows_are_bit_identical_to_the_ordinary_loop(twin, data) -> None:
    hyper = data.draw(twin.hyper(), label="hyper")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    vocab = data.draw(st.sampled_from([1, 2, 37, 300]), label="vocab")
    dim = data.draw(st.sampled_from([1, 7, 16, 33]), label="dim")
    row_chunk = data.draw(st.sampled_from([1, 5, 64, 4096]), label="row_chunk")
    two_groups = data.draw(st.booleans(), label="two_groups")
    # The output layer and loss by linear_cross_entropy (no logits), in both loops.
    fused = layout != "embedding" and data.draw(st.booleans(), label="linear_cross_entropy")
    batches = token_batches(3, vocab)
    with pytest.MonkeyPatch.context() as mp:  # not the fixture: hypothesis reruns the body
        forbid_torch_fallback(mp)
        a, b = TinyLM(layout, vocab, dim, dtype, chunked=row_chunk), TinyLM(layout, vocab, dim, dtype)

        def make(model: TinyLM):
            params = list(model.parameters())
            groups = [{"params": params[:2]}, {"params": params[2:], "lr": hyper.get("lr", 0.01) * 0.5}]
            return twin.make_ours(groups if two_groups else params, **hyper)

        opt_a, opt_b = make(a), make(b)
        sib = dict(release_rows=b.released(), row_chunk=row_chunk)
        if fused and not refused(twin, hyper):  # the ordinary loop's chunks: the context's, in whole units
            a.cross_entropy = b.cross_entropy = chunk_rows_of(opt_b, b.released()[-1], row_chunk)
        if refused(twin, hyper):
            with pytest.raises(ValueError, match="release_rows"):
                step_in_backward(opt_b, **sib)
            return
        train(a, opt_a, batches)
        train(b, opt_b, batches, sib)
    assert_same(a, opt_a, b, opt_b)
    assert all(p.grad is None for p in b.released())
    assert not released_now(b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hyper", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
                                   dict(momentum=0.5, nesterov=True, maximize=True)], ids=["plain", "dampening", "nesterov"])
def test_sgd_momentum_rows_make_their_buffer_as_the_ordinary_step_does(layout, hyper) -> None:
    # The first iteration makes the buffer (from zero, or torch's step with dampening), piece by piece.
    batches = token_batches(3, 37)
    with pytest.MonkeyPatch.context() as mp:
        forbid_torch_fallback(mp)
        a, b = TinyLM(layout, 37, 16, chunked=5), TinyLM(layout, 37, 16)
        opt_a, opt_b = oxoptim.SGD(a.parameters(), lr=0.1, **hyper), oxoptim.SGD(b.parameters(), lr=0.1, **hyper)
        train(a, opt_a, batches)
        train(b, opt_b, batches, dict(release_rows=b.released(), row_chunk=5))
    assert_same(a, opt_a, b, opt_b)
    assert all("momentum_buffer" in opt_b.state[w] for w in b.released())


# What torch's step cannot make chunk by chunk as the ordinary step makes it whole (dampening != 0).
SGD_REFUSED = [
    (torch.bfloat16, dict(bf16_stochastic_round=True), "bf16_stochastic_round"),
    (torch.bfloat16, dict(kahan_sum=True), "kahan_sum"),
    (torch.float32, dict(state_dtype=torch.bfloat16), "state_dtype"),
    (torch.bfloat16, {}, "torch.bfloat16 weights"),
    (torch.float16, {}, "torch.float16 weights"),
]


@pytest.mark.parametrize("dtype, options, message", SGD_REFUSED, ids=[c[2] for c in SGD_REFUSED])
def test_sgd_first_momentum_with_dampening_that_chunks_cannot_make_is_refused(dtype, options, message) -> None:
    model = TinyLM("tied", 37, 16, dtype)
    make = lambda damp: oxoptim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=damp, **options)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        step_in_backward(make(0.1), release_rows=[model.emb])
    assert not released_now(model)
    # Changed after entry: refused at the weight's first update, before any of its rows moves.
    opt = make(0.0)
    before = model.emb.detach().clone()
    with step_in_backward(opt, release_rows=[model.emb]):
        opt.param_groups[0]["dampening"] = 0.1
        with pytest.raises(ValueError, match=message):
            model(token_batches(1, 37)[0]).backward()
    assert same_bits(model.emb.detach(), before) and opt.state[model.emb].get("momentum_buffer") is None


@pytest.mark.parametrize("dampening", [0.0, 0.1])
def test_a_momentum_buffer_of_none_is_made_as_a_missing_one(dampening) -> None:
    # A hand-made state may hold momentum_buffer=None (oxoptim's load_state_dict refuses one).
    batches = token_batches(3, 37)
    a, b = TinyLM("tied", 37, 16, chunked=5), TinyLM("tied", 37, 16)
    opt_a = oxoptim.SGD(a.parameters(), lr=0.1, momentum=0.9, dampening=dampening)
    opt_b = oxoptim.SGD(b.parameters(), lr=0.1, momentum=0.9, dampening=dampening)
    for opt, model in ((opt_a, a), (opt_b, b)):
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = None
    train(a, opt_a, batches)
    train(b, opt_b, batches, dict(release_rows=b.released(), row_chunk=5))
    assert_same(a, opt_a, b, opt_b)


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 80), dim=st.sampled_from([1, 7, 16, 33, 100]), vocab=st.integers(1, 700),
       chunk=st.sampled_from([1, 5, 64, 4096]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_chunked_weight_gradient_is_autograds_to_rounding(tokens, dim, vocab, chunk, dtype) -> None:
    gen = torch.Generator().manual_seed(tokens * 1000 + vocab)
    x = torch.randn(tokens, dim, generator=gen, dtype=dtype)
    w = torch.randn(vocab, dim, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, vocab, generator=gen, dtype=dtype)
    F.linear(x, w).backward(g)
    chunked = torch.cat([weight_gradient_rows(x, g, a, min(a + chunk, vocab)) for a in range(0, vocab, chunk)])
    # The same sums, perhaps in another order: within a few ulps of each term's size.
    scale = (x.abs().t() @ g.abs()).t()
    eps = torch.finfo(dtype).eps
    assert ((chunked - w.grad).abs() <= 4 * tokens * eps * scale).all()


# bfloat16 weights with stochastic rounding (each piece draws its rows' bits of the weight's stream),
# Kahan summation, bfloat16 state and 8-bit state (rows of 512: two whole blocks), SGD's momentum buffer made
# from zero (dampening 0) by the first piece of each row block.
LOW_PRECISION = SIB_LOW_PRECISION


@pytest.mark.parametrize("layout, loss", LAYOUTS_AND_LOSSES)
@pytest.mark.parametrize("name, cls, hyper", LOW_PRECISION, ids=[c[0] for c in LOW_PRECISION])
def test_low_precision_released_rows_are_bit_identical_to_the_ordinary_loop(name, cls, hyper, layout, loss) -> None:
    batches = token_batches(4, 37)
    results = []
    for release in (False, True):
        torch.manual_seed(5)  # the same stochastic-rounding seeds
        model = TinyLM(layout, 37, 512, torch.bfloat16, chunked=None if release else 5,  # 2 blocks a row
                       cross_entropy=5 if loss == "linear_cross_entropy" else None)
        opt = cls(model.parameters(), **hyper)
        train(model, opt, batches, dict(release_rows=model.released(), row_chunk=5) if release else None)
        results.append((model, opt))
    (a, opt_a), (b, opt_b) = results
    assert_same(a, opt_a, b, opt_b)
    if "8bit" in name:
        assert all(bw.is_8bit(opt_b.state[w]) for w in b.released())


# Rows that split 8-bit blocks are updated in whole units: the fewest rows that end on a block
# boundary (384 → 2 rows, 16 → 16, 300 → 64, 7 → 256); row_chunk is rounded up to whole units.
@pytest.mark.parametrize("layout, loss", LAYOUTS_AND_LOSSES)
@pytest.mark.parametrize("dim, unit", [(384, 2), (16, 16), (300, 64), (7, 256)])
@pytest.mark.parametrize("low_precision", [False, True], ids=["float32", "bf16_sr"])
def test_8bit_rows_that_split_blocks_are_bit_identical_to_the_ordinary_loop(layout, loss, dim, unit,
                                                                           low_precision) -> None:
    batches = token_batches(4, 150)
    step = -(-5 // unit) * unit
    dtype = torch.bfloat16 if low_precision else torch.float32
    results = []
    for release in (False, True):
        torch.manual_seed(5)  # the same stochastic-rounding seeds
        model = TinyLM(layout, 150, dim, dtype, chunked=None if release else step,
                       cross_entropy=step if loss == "linear_cross_entropy" else None)
        opt = oxoptim.AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=16, bf16_stochastic_round=low_precision)
        train(model, opt, batches, dict(release_rows=model.released(), row_chunk=5) if release else None)
        results.append((model, opt))
    (a, opt_a), (b, opt_b) = results
    assert_same(a, opt_a, b, opt_b)
    assert all(opt_b.state[w]["exp_avg"].dtype == torch.uint8 for w in b.released())


def test_the_unit_follows_the_state_kept_not_the_groups_threshold() -> None:
    # 8-bit state made with min_8bit_size=16, then the threshold raised: the state stays 8-bit.
    batches = token_batches(4, 150)
    results = []
    for release in (False, True):
        model = TinyLM("tied", 150, 100, chunked=None if release else 64)
        opt = oxoptim.AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=16)
        train(model, opt, batches[:1])
        opt.param_groups[0]["min_8bit_size"] = 10**9
        train(model, opt, batches[1:], dict(release_rows=model.released(), row_chunk=5) if release else None)
        assert opt.state[model.emb]["exp_avg"].dtype == torch.uint8
        results.append((model, opt))
    (a, opt_a), (b, opt_b) = results
    assert_same(a, opt_a, b, opt_b)


@pytest.mark.parametrize("held, looked_up", [(6, [1, 4]), (6, list(range(6))), (5000, [0, 4999, 4096])])
def test_head_plus_embedding_is_the_dense_sum_bit_for_bit(held, looked_up) -> None:
    # The dense gradient adds a +0 to the rows not looked up: a head's -0 becomes +0 there.
    gen = torch.Generator().manual_seed(held)
    head = torch.randn(held, 3, generator=gen)
    head[::2, 0] = -0.0
    at = torch.tensor(looked_up)
    embedding = torch.randn(len(at), 3, generator=gen)
    embedding[:, 1] = -0.0
    dense = torch.zeros(held, 3)
    dense[at] = embedding
    expected = head + dense
    assert same_bits(_head_plus_embedding(head.clone(), embedding, at), expected)


def test_an_embedding_looked_up_after_the_output_layers_backward_is_an_error() -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters(), lr=0.01)
    w = model.emb
    with step_in_backward(opt, release_rows=[w]):
        rows.linear(torch.randn(3, 16), w).sum().backward()
        with pytest.raises(RuntimeError, match="after the output layer's backward"):
            rows.embedding(torch.tensor([1, 2]), w).sum().backward()
        opt.step()


def test_held_rows_are_the_looked_up_rows_widened_to_whole_units() -> None:
    model = TinyLM("tied", 150, 384)
    opt = oxoptim.AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=16)
    with step_in_backward(opt, release_rows=[model.emb], row_chunk=5) as sib:
        release = _ACTIVE[id(model.emb)]
        assert release._unit() == 2 and release._chunk_rows(2) == 6
        release.record_embedding(torch.tensor([5, 6, 149, 6]))
        assert release._held_rows(2).tolist() == [4, 5, 6, 7, 148, 149]
        release._reset()
    del sib


class LargestOutput(TorchDispatchMode):
    """The most elements of new memory an operator returns while the mode is on (views of
    its inputs' storage, as detach or slicing return, are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.most = max(self.most, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_tensor_the_size_of_a_released_weight_is_formed_in_backward(layout) -> None:
    vocab, dim, chunk = 500, 64, 50  # a weight (32,000 elements) larger than the logits' gradient (12 × 500)
    batches = token_batches(3, vocab)
    assert _largest_in_backward(layout, vocab, dim, batches, release=False) >= vocab * dim  # the test sees one
    most = _largest_in_backward(layout, vocab, dim, batches, release=True, row_chunk=chunk)
    assert most <= max(chunk * dim, 12 * vocab), most


@pytest.mark.parametrize("layout", LAYOUTS)
def test_8bit_rows_in_units_form_nothing_the_size_of_the_weight_in_backward(layout) -> None:
    # Width 100: units of 64 rows; 12 tokens hold at most 12 units.
    vocab, dim, chunk, unit = 2000, 100, 50, 64
    batches = token_batches(3, vocab)
    make = lambda ps: oxoptim.AdamW8bit(ps, lr=0.01, min_8bit_size=16)  # noqa: E731
    most = _largest_in_backward(layout, vocab, dim, batches, release=True, row_chunk=chunk, make=make)
    assert most <= max(unit * dim, 12 * vocab, 12 * unit * dim) < vocab * dim, most


def _largest_in_backward(layout: str, vocab: int, dim: int, batches, release: bool, row_chunk: int = 4096,
                         make=lambda ps: oxoptim.AdamW(ps, lr=0.01)) -> int:
    """The most elements of a tensor formed in backward after the first iteration, inside
    step_in_backward with or without release."""
    model = TinyLM(layout, vocab, dim)
    opt = make(model.parameters())
    most = 0
    with step_in_backward(opt, release_rows=model.released() if release else [], row_chunk=row_chunk):
        for i, ids in enumerate(batches):
            loss = model(ids)
            with LargestOutput() as mode:
                loss.backward()
            if i:  # the first creates the optimizer state, weight-sized
                most = max(most, mode.most)
            assert all(p.grad is None for p in model.parameters())
            opt.step()
    return most


def test_a_checkpoint_taken_between_iterations_resumes_bit_identically() -> None:
    batches = token_batches(6, 37)
    a, opt_a = ordinary(oxoptim.NAdam, batches, lr=0.01)
    b = TinyLM("tied", 37, 16)
    opt_b = oxoptim.NAdam(b.parameters(), lr=0.01)
    train(b, opt_b, batches[:3], dict(release_rows=[b.emb], row_chunk=5))
    saved = {"model": {k: v.clone() for k, v in b.state_dict().items()}, "opt": opt_b.state_dict()}
    c = TinyLM("tied", 37, 16, seed=9)
    c.load_state_dict(saved["model"])
    opt_c = oxoptim.NAdam(c.parameters(), lr=0.01)
    opt_c.load_state_dict(saved["opt"])
    train(c, opt_c, batches[3:], dict(release_rows=[c.emb], row_chunk=5))
    assert_same(a, opt_a, c, opt_c)


def test_outside_the_context_and_under_no_grad_they_are_the_torch_functions() -> None:
    w = torch.nn.Parameter(torch.randn(11, 4))
    ids, x = torch.tensor([[1, 3, 3]]), torch.randn(2, 4)
    assert torch.equal(rows.embedding(ids, w), F.embedding(ids, w))
    rows.linear(x, w).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, x.sum(0).expand(11, 4))
    opt = oxoptim.Adam([w])
    with step_in_backward(opt, release_rows=[w]), torch.no_grad():
        assert torch.equal(rows.linear(x, w), F.linear(x, w))
        assert rows.linear(x, w).grad_fn is None


REFUSED = [
    ("Adafactor", lambda ps: oxoptim.Adafactor(ps), {}, "elementwise"),
    ("SGD8bit, fp32 state", lambda ps: oxoptim.SGD8bit(ps, momentum=0.9, min_8bit_size=10**6), {}, "8-bit state only"),
    ("accumulate 2", lambda ps: oxoptim.AdamW(ps), {"accumulate": 2}, "accumulate"),
    ("clipping", lambda ps: oxoptim.AdamW(ps), {"clip": oxoptim.ClipPerParameter(1.0)}, "clip"),
    ("row_chunk 0", lambda ps: oxoptim.AdamW(ps), {"row_chunk": 0}, "row_chunk"),
    ("ddp", lambda ps: oxoptim.AdamW(ps), {"ddp": DdpStandIn(torch.nn.Linear(1, 1))}, "ddp"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_cannot_be_released_is_refused_at_entry(case) -> None:
    _, make, kwargs, message = case
    model = TinyLM("tied", 37, 16)
    opt = make(model.parameters())
    with pytest.raises(ValueError, match=message):
        step_in_backward(opt, release_rows=[model.emb], **kwargs)
    assert not released_now(model) and "_oxoptim_step_in_backward" not in opt.__dict__


@pytest.mark.parametrize("weight, message", [
    (lambda m: m.bias, "2-D"),
    (lambda m: torch.nn.Parameter(torch.randn(3, 3)), "not a parameter of this optimizer"),
])
def test_a_weight_that_cannot_be_released_is_refused(weight, message) -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=message):
        step_in_backward(opt, release_rows=[weight(model)])
    with pytest.raises(ValueError, match="twice"):
        step_in_backward(opt, release_rows=[model.emb, model.emb])


def test_a_second_backward_through_a_released_weight_in_one_iteration_is_an_error() -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters())
    ids = token_batches(1, 37)[0]
    with step_in_backward(opt, release_rows=[model.emb]):
        loss = model(ids)
        loss.backward(retain_graph=True)
        opt.step()
        step = opt.state[model.emb]["step"].clone()
        loss = model(ids)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="ran twice"):
            loss.backward()
        assert opt.state[model.emb]["step"] == step + 1
        opt.step()
        h = torch.randn(3, 16)
        with pytest.raises(RuntimeError, match="ran twice"):
            (rows.linear(h, model.emb).sum() + rows.linear(h, model.emb).sum()).backward()
    assert not released_now(model)


def test_a_forward_without_backward_changes_nothing() -> None:
    """A forward whose graph is dropped (a validation loss with grad enabled, a skipped batch):
    the rows it looked up get their head gradient alone, which is all they got; the next one works."""
    batches = token_batches(4, 37)
    a, opt_a = ordinary(oxoptim.AdamW, batches, lr=0.01)
    b = TinyLM("tied", 37, 16)
    opt_b = oxoptim.AdamW(b.parameters(), lr=0.01)
    with step_in_backward(opt_b, release_rows=[b.emb], row_chunk=5):
        for i, ids in enumerate(batches):
            b(token_batches(1, 37, seed=100 + i)[0])  # dropped
            loss = b(ids)
            b(token_batches(1, 37, seed=200 + i)[0])  # dropped, between the forward and its backward
            loss.backward()
            opt_b.step()
            opt_b.zero_grad()
            for group in opt_b.param_groups:
                group["lr"] *= 0.7
    assert_same(a, opt_a, b, opt_b)


class HeadOnlyLoss(TinyLM):
    """Looks the embedding up but leaves its output out of the loss: its rows' gradient never comes,
    only the head's."""

    def forward(self, ids):
        rows.embedding(ids, self.emb)  # looked up, unused
        h = torch.tanh(F.embedding(ids[:, :-1] % 3, self.mid) @ self.mid.T + self.bias)
        w = self.emb
        logits = ChunkedLinear.apply(h, w, self.chunked) if self.chunked else rows.linear(h, w)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_rows_whose_embedding_backward_never_comes_get_the_heads_gradient() -> None:
    """The embedding is looked up but its output does not reach the loss: at optimizer.step() its
    rows get the head's gradient alone, as in the ordinary loop."""
    batches = token_batches(3, 37)
    a, b = HeadOnlyLoss("tied", 37, 16, chunked=4), HeadOnlyLoss("tied", 37, 16)
    opt_a, opt_b = oxoptim.Adam(a.parameters(), lr=0.01), oxoptim.Adam(b.parameters(), lr=0.01)
    train(a, opt_a, batches)
    train(b, opt_b, batches, dict(release_rows=[b.emb], row_chunk=4))
    assert_same(a, opt_a, b, opt_b)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")  # torch's, expected
def test_gradients_that_leave_the_weight_out_update_nothing() -> None:
    head = torch.nn.Parameter(torch.randn(11, 4))
    h = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([1, 2, 3])
    opt = oxoptim.AdamW([head], lr=0.1)
    before = head.detach().clone()
    with step_in_backward(opt, release_rows=[head]):
        (g,) = torch.autograd.grad(F.cross_entropy(rows.linear(h, head), y), h, create_graph=True)
        (g2,) = torch.autograd.grad(F.cross_entropy(F.linear(h, head), y), h, create_graph=True)
        assert g.requires_grad and torch.equal(g, g2)
        F.cross_entropy(rows.linear(h, head), y).backward(inputs=[h])
        _, gw = torch.autograd.grad(F.cross_entropy(rows.linear(h, head), y), [h, head])
        _, gw_plain = torch.autograd.grad(F.cross_entropy(F.linear(h, head), y), [h, head])
        assert torch.equal(gw, gw_plain)  # autograd.grad returns the weight's gradient, updates nothing
        assert not opt.state[head] and torch.equal(head, before) and head.grad is None
        with pytest.raises(RuntimeError, match="create_graph"):
            F.cross_entropy(rows.linear(h, head), y).backward(create_graph=True)


def test_a_graph_backpropagated_after_the_context_closed_gives_an_ordinary_gradient() -> None:
    model = TinyLM("untied", 37, 16)
    twin = TinyLM("untied", 37, 16)
    opt = oxoptim.AdamW(model.parameters())
    ids = token_batches(1, 37)[0]
    with step_in_backward(opt, release_rows=model.released()):
        loss = model(ids)
    loss.backward()
    twin(ids).backward()
    assert not opt.state
    for p, q in zip(model.parameters(), twin.parameters()):
        assert same_bits(p.grad, q.grad)


def test_a_graph_from_an_earlier_iteration_is_an_error() -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters())
    with step_in_backward(opt, release_rows=[model.emb]):
        old = model(token_batches(1, 37)[0])
        opt.step()
        with pytest.raises(RuntimeError, match="before the last optimizer.step"):
            old.backward()


def test_the_embedding_backward_before_the_output_layers_is_an_error() -> None:
    w = torch.nn.Parameter(torch.randn(11, 4))
    opt = oxoptim.AdamW([w])
    with step_in_backward(opt, release_rows=[w]):
        logits = rows.linear(torch.randn(3, 4), w)  # built first: its backward runs last
        e = rows.embedding(torch.tensor([1, 2]), w)
        with pytest.raises(RuntimeError, match="before the output layer's"):
            (logits.sum() + e.sum()).backward()


def test_autocast_around_a_released_output_layer_is_refused() -> None:
    w = torch.nn.Parameter(torch.randn(11, 4))
    opt = oxoptim.AdamW([w])
    with step_in_backward(opt, release_rows=[w]), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="autocast"):
            rows.linear(torch.randn(3, 4), w)


def test_8bit_state_loaded_after_entry_on_rows_that_split_blocks_is_stepped_in_whole_units() -> None:
    # Float32 state at entry (37 x 16 < min_8bit_size), 8-bit state loaded inside the context.
    source = TinyLM("tied", 37, 16, chunked=16)
    saved = oxoptim.AdamW8bit(source.parameters(), lr=0.01, min_8bit_size=16)
    train(source, saved, token_batches(1, 37))
    batches = token_batches(3, 37, seed=2)
    a, b = TinyLM("tied", 37, 16, chunked=16), TinyLM("tied", 37, 16)  # 16 rows: whole blocks of 256
    opt_a, opt_b = (oxoptim.AdamW8bit(m.parameters(), lr=0.01) for m in (a, b))
    opt_a.load_state_dict(copy.deepcopy(saved.state_dict()))  # torch's load keeps same-dtype tensors shared
    with step_in_backward(opt_b, release_rows=[b.emb], row_chunk=5):
        opt_b.load_state_dict(copy.deepcopy(saved.state_dict()))
        assert opt_b.state[b.emb]["exp_avg"].dtype == torch.uint8
    train(a, opt_a, batches)
    train(b, opt_b, batches, dict(release_rows=[b.emb], row_chunk=5))
    assert_same(a, opt_a, b, opt_b)


def test_a_released_weight_used_by_another_operation_too_is_an_error() -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters())
    with step_in_backward(opt, release_rows=[model.emb]):
        ids = token_batches(1, 37)[0]
        (model(ids) + model.emb.sum()).backward()  # the sum gives it a .grad after its rows were updated
        with pytest.raises(RuntimeError, match="also got a .grad"):
            opt.step()
        model.emb.grad = None
        model(ids).backward()  # the context goes on
        opt.step()


def test_stream_offsets_need_one_per_tensor() -> None:
    params = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    grads = [torch.ones(4, dtype=torch.bfloat16) for _ in params]
    with pytest.raises(ValueError, match="expected 2 stream offsets"):
        oxoptim._core.step("sgd", params, grads, [], [], {"lr": 0.1, "momentum": 0.0, "dampening": 0.0,
                           "weight_decay": 0.0, "nesterov": False, "maximize": False},
                           stochastic_round=(1, 0), stream_ids=[0, 0], stream_offsets=[0])
    assert all(torch.equal(p, torch.zeros(4, dtype=torch.bfloat16)) for p in params)


def test_a_released_weight_used_only_by_plain_operations_steps_as_usual() -> None:
    """A model that calls F.embedding instead of oxoptim.rows: the weight's .grad is stepped by
    optimizer.step(), as without release_rows."""
    class Plain(TinyLM):
        def forward(self, ids):
            h = torch.tanh(F.embedding(ids[:, :-1], self.emb) @ self.mid.T + self.bias)
            return F.cross_entropy(F.linear(h, self.emb).reshape(-1, self.emb.shape[0]), ids[:, 1:].reshape(-1))

    batches = token_batches(3, 37)
    a, b = Plain("tied", 37, 16), Plain("tied", 37, 16)
    opt_a, opt_b = oxoptim.AdamW(a.parameters(), lr=0.01), oxoptim.AdamW(b.parameters(), lr=0.01)
    train(a, opt_a, batches, dict())
    train(b, opt_b, batches, dict(release_rows=[b.emb]))
    assert_same(a, opt_a, b, opt_b)


def _skipping_loop(model, opt, batches, skip: set, sib: dict) -> None:
    """Inside step_in_backward(opt, **sib): iterations in ``skip`` are dropped by ``zero_grad()``
    after their backward, without ``step()`` (a batch skipped because its loss looked bad)."""
    with step_in_backward(opt, **sib):
        for i, ids in enumerate(batches):
            model(ids).backward()
            if i in skip:
                opt.zero_grad()
                continue
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_batch_skipped_by_zero_grad_drops_the_iteration_as_without_released_rows(layout) -> None:
    """zero_grad() before step() drops the iteration: the next backward through the released weight
    is a new iteration (it used to raise "the output layer's backward ran twice"), and the weights
    are those of step_in_backward without release_rows (what backward updated stays updated)."""
    batches, skip = token_batches(5, 37), {0, 2, 3}
    a = TinyLM(layout, 37, 16, chunked=5)
    opt_a = oxoptim.AdamW(a.parameters(), lr=0.01)
    _skipping_loop(a, opt_a, batches, skip, {})
    b = TinyLM(layout, 37, 16)
    opt_b = oxoptim.AdamW(b.parameters(), lr=0.01)
    _skipping_loop(b, opt_b, batches, skip, dict(release_rows=b.released(), row_chunk=5))
    assert not released_now(b)
    assert_same(a, opt_a, b, opt_b)


def test_rows_held_for_the_embedding_get_the_heads_gradient_when_the_iteration_is_dropped() -> None:
    """Dropped while rows wait for an embedding gradient that never comes: they get the head's
    alone, as optimizer.step() gives them, so the weight is that of step_in_backward without
    release_rows (whose bucket took the head's gradient in backward)."""
    batches, skip = token_batches(4, 37), {0, 1}
    a, b = HeadOnlyLoss("tied", 37, 16, chunked=4), HeadOnlyLoss("tied", 37, 16)
    opt_a, opt_b = oxoptim.Adam(a.parameters(), lr=0.01), oxoptim.Adam(b.parameters(), lr=0.01)
    _skipping_loop(a, opt_a, batches, skip, {})
    _skipping_loop(b, opt_b, batches, skip, dict(release_rows=[b.emb], row_chunk=4))
    assert_same(a, opt_a, b, opt_b)


def test_a_backward_that_raised_after_the_output_layer_leaves_the_next_iteration_working() -> None:
    """A backward that raises between the output layer's backward and the embedding's, then
    zero_grad(): the held rows get the head's gradient (every row and the step count move once),
    and the following iterations run."""
    class Failing(TinyLM):
        fail = False

        def forward(self, ids):
            x, y = ids[:, :-1], ids[:, 1:]
            h = torch.tanh(rows.embedding(x, self.emb) @ self.mid.T + self.bias)
            if self.fail:
                def boom(grad):
                    raise ValueError("boom")
                h.register_hook(boom)
            logits = rows.linear(h, self.emb)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    model = Failing("tied", 37, 16)
    opt = oxoptim.AdamW(model.parameters(), lr=0.01)
    batches = token_batches(4, 37)
    with step_in_backward(opt, release_rows=[model.emb], row_chunk=5):
        model(batches[0]).backward()
        opt.step()
        opt.zero_grad()
        before = model.emb.detach().clone()
        model.fail = True
        with pytest.raises(ValueError, match="boom"):
            model(batches[1]).backward()
        model.fail = False
        opt.zero_grad()
        assert int(opt.state[model.emb]["step"]) == 2
        held = torch.unique(batches[1][:, :-1])
        assert not torch.equal(model.emb.detach()[held], before[held])  # the held rows took the head's gradient
        for ids in batches[2:]:
            model(ids).backward()
            opt.step()
            opt.zero_grad()
        assert int(opt.state[model.emb]["step"]) == 4
        assert int(opt.state[model.mid]["step"]) == 3  # backward never reached it in the dropped iteration
    assert torch.isfinite(model.emb).all()


def test_zero_grad_between_a_forward_and_its_backward_keeps_the_graph() -> None:
    """zero_grad() after the forward, before its backward (a common loop shape): nothing is dropped,
    the backward updates the rows as usual."""
    batches = token_batches(3, 37)
    a, opt_a = ordinary(oxoptim.AdamW, batches, lr=0.01)
    b = TinyLM("tied", 37, 16)
    opt_b = oxoptim.AdamW(b.parameters(), lr=0.01)
    with step_in_backward(opt_b, release_rows=[b.emb], row_chunk=5):
        for ids in batches:
            loss = b(ids)
            opt_b.zero_grad()
            loss.backward()
            opt_b.step()
            for group in opt_b.param_groups:
                group["lr"] *= 0.7
    assert_same(a, opt_a, b, opt_b)


# Settings or state changed after entry that the ordinary step() refuses: (name, optimizer,
# the change, the ordinary step's error). Released rows are the first write of a language model's
# backward; the check must come before them.
def _int64_step(opt, model) -> None:
    opt.state[model.emb]["step"] = opt.state[model.emb]["step"].long()


CHANGED_AFTER_ENTRY = [
    ("AdamW bf16 stochastic rounding on fp32", lambda ps: oxoptim.AdamW(ps, lr=0.01),
     lambda opt, m: opt.param_groups[0].update(bf16_stochastic_round=True), "bf16_stochastic_round"),
    ("AdamW8bit lr -1", lambda ps: oxoptim.AdamW8bit(ps, lr=0.01, min_8bit_size=16),
     lambda opt, m: opt.param_groups[0].update(lr=-1.0), "Invalid learning rate"),
    ("AdamW8bit maximize", lambda ps: oxoptim.AdamW8bit(ps, lr=0.01, min_8bit_size=16),
     lambda opt, m: opt.param_groups[0].update(maximize=True), "maximize"),
    ("AdamW8bit kahan_sum", lambda ps: oxoptim.AdamW8bit(ps, lr=0.01, min_8bit_size=16),
     lambda opt, m: opt.param_groups[0].update(kahan_sum=True), "kahan_sum"),
    ("AdamW8bit int64 step", lambda ps: oxoptim.AdamW8bit(ps, lr=0.01, min_8bit_size=16), _int64_step,
     "must be a float32 or float64 CPU tensor"),
    ("SGD8bit float state", lambda ps: oxoptim.SGD8bit(ps, lr=0.1, momentum=0.9, min_8bit_size=16),
     lambda opt, m: opt.load_state_dict({**opt.state_dict(), "param_groups": [
         {**g, "min_8bit_size": 10**6} for g in opt.state_dict()["param_groups"]]}) or opt.state.clear(),
     "8-bit state only"),
]


@pytest.mark.parametrize("case", CHANGED_AFTER_ENTRY, ids=[c[0] for c in CHANGED_AFTER_ENTRY])
@pytest.mark.parametrize("only_released", [False, True], ids=["with others", "released weight only"])
def test_settings_changed_after_entry_are_refused_before_any_row_is_written(case, only_released) -> None:
    """The ordinary step's checks run before the iteration's first write, released rows included:
    backward raises the step's error with nothing written, as the ordinary loop's step() does; once
    the setting is put back the loop goes on."""
    _, make, change, message = case
    model = TinyLM("tied", 37, 16)
    opt = make([model.emb] if only_released else model.parameters())
    batches = token_batches(3, 37)
    with step_in_backward(opt, release_rows=[model.emb], row_chunk=5):
        model(batches[0]).backward()
        opt.step()
        opt.zero_grad()
        groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
        state = {p: copy.deepcopy(s) for p, s in opt.state.items()}
        change(opt, model)
        before = snapshot(opt)
        with pytest.raises(ValueError, match=message):
            model(batches[1]).backward()
        assert_unchanged(opt, before)
        opt.zero_grad()  # drops the refused iteration: still nothing written
        assert_unchanged(opt, before)
        for group, saved in zip(opt.param_groups, groups):  # the setting put back
            params = group["params"]
            group.clear()
            group.update(saved, params=params)
        opt.state.clear()
        opt.state.update(state)
        model(batches[2]).backward()
        opt.step()
    assert int(opt.state[model.emb]["step"]) == 2


@pytest.mark.parametrize("make", [
    lambda ps: oxoptim.AdamW8bit(ps, lr=0.01),
    lambda ps: oxoptim.SGD8bit(ps, lr=0.1, momentum=0.9),
], ids=["AdamW8bit", "SGD8bit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_an_8bit_sized_weight_of_a_dtype_8bit_state_cannot_take_is_refused_at_entry(make, dtype) -> None:
    model = TinyLM("tied", 64, 256, dtype=dtype)  # 16,384 elements: 8-bit state by size
    opt = make(model.parameters())
    with pytest.raises(ValueError, match="8-bit state needs float32 or bfloat16"):
        step_in_backward(opt, release_rows=[model.emb])
    assert not released_now(model) and not opt.state


@pytest.mark.parametrize("accumulate, clip", [(2, None), (1, oxoptim.ClipPerParameter(1e-3))], ids=["accumulate", "clip"])
def test_accumulate_or_clip_set_after_entry_is_refused_before_any_row_is_written(accumulate, clip) -> None:
    model = TinyLM("tied", 37, 16)
    opt = oxoptim.SGD8bit(model.parameters(), lr=0.1, momentum=0.9, min_8bit_size=16)
    with step_in_backward(opt, release_rows=[model.emb], row_chunk=5) as sib:
        sib.accumulate, sib.clip = accumulate, clip
        before = snapshot(opt)
        with pytest.raises(ValueError, match="cannot be combined with accumulate > 1, clip or ddp"):
            model(token_batches(1, 37)[0]).backward()
        assert_unchanged(opt, before)


def test_leaving_the_context_with_an_unfinished_iteration_drops_it_as_zero_grad_does() -> None:
    """An error that leaves the ``with`` block between the output layer's backward and the
    embedding's: the held rows get the head's gradient and the step count moves once, as with
    zero_grad() inside the block; not some rows updated with the count left behind."""
    class Failing(TinyLM):
        def forward(self, ids):
            x, y = ids[:, :-1], ids[:, 1:]
            h = torch.tanh(rows.embedding(x, self.emb) @ self.mid.T + self.bias)

            def boom(grad):
                raise KeyError("boom")
            h.register_hook(boom)
            logits = rows.linear(h, self.emb)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    outcomes = []
    for zero_grad_inside in (True, False):
        model = Failing("tied", 37, 16)
        opt = oxoptim.AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=16)
        with pytest.raises(KeyError):
            with step_in_backward(opt, release_rows=[model.emb], row_chunk=5):
                try:
                    model(token_batches(1, 37)[0]).backward()
                finally:
                    if zero_grad_inside:
                        opt.zero_grad()
        assert int(opt.state[model.emb]["step"]) == 1
        outcomes.append(snapshot(opt))
    inside, on_leaving = outcomes
    assert all(same_bits(a, b) for a, b in zip(inside.params, on_leaving.params))
    assert inside.state.keys() == on_leaving.state.keys()
    assert all(same_bits(inside.state[i][k], on_leaving.state[i][k]) for i in inside.state for k in inside.state[i])
