"""oxoptim.rows.linear_cross_entropy: F.cross_entropy(F.linear(x, w), target) without the logits,
checked against torch over shapes, chunks, dtypes, reductions and ignored targets; torch's errors
for bad input; nothing of the logits' size formed in forward or backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rows import LargestOutput, TinyLM, token_batches

import oxoptim
from oxoptim import rows, step_in_backward


def reference(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    logits = F.linear(x, w)
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), target.reshape(-1), **kwargs)
    return loss.reshape(target.shape) if kwargs.get("reduction") == "none" else loss


def case(data, dtype: torch.dtype):
    """Inputs with batch dimensions, a vocabulary, targets with some ignored, and an output gradient."""
    lead = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="lead")
    dim = data.draw(st.sampled_from([1, 7, 16, 33]), label="dim")
    classes = data.draw(st.integers(1, 70), label="classes")
    chunk = data.draw(st.sampled_from([1, 3, 16, 64, 1024]), label="chunk")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    ignore_index = data.draw(st.sampled_from([-100, 0, classes - 1]), label="ignore_index")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    scale = data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="scale")  # 8: a few classes dominate
    x = (torch.randn(*lead, dim, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.randint(0, classes, tuple(lead), generator=gen)
    target[torch.rand(tuple(lead), generator=gen) < 0.2] = ignore_index
    kwargs = dict(ignore_index=ignore_index, reduction=reduction)
    return x, w, target, chunk, kwargs


def loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor, grad_dtype: torch.dtype | None = None):
    """The loss and its gradients for a random output gradient, drawn in ``grad_dtype`` (the
    loss's by default: a float64 reference of a bfloat16 run takes the bfloat16 values)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = g.to(grad_dtype or loss.dtype).to(loss.dtype)
    gx, gw = torch.autograd.grad(loss, (x, w), g)
    return loss.detach(), gx, gw


def ours_theirs_exact(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int, kwargs: dict):
    """Loss and gradients: ours, torch's in the same dtype, and torch's in float64 of the same values."""
    ours = loss_and_grads(lambda x, w: rows.linear_cross_entropy(x, w, target, chunk_rows=chunk, **kwargs), x, w)
    theirs = loss_and_grads(lambda x, w: reference(x, w, target, **kwargs), x, w)
    exact = loss_and_grads(lambda x, w: reference(x, w, target, **kwargs), x.double(), w.double(), x.dtype)
    return ours, theirs, exact


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_float64_matches_torch_to_rounding(data) -> None:
    x, w, target, chunk, kwargs = case(data, torch.float64)
    ours = loss_and_grads(lambda x, w: rows.linear_cross_entropy(x, w, target, chunk_rows=chunk, **kwargs), x, w)
    theirs = loss_and_grads(lambda x, w: reference(x, w, target, **kwargs), x, w)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_float32_errs_as_float32_logits_allow(data) -> None:
    """Against float64 maths of the same inputs: within 4× torch's float32 error, or within what
    rounding the logits to float32 allows (a logit z carries about eps·|z|, which moves its
    softmax by that much relative: 8 eps·(1 + max|z|) of the largest value)."""
    x, w, target, chunk, kwargs = case(data, torch.float32)
    largest_logit = float((x.double() @ w.double().T).abs().max()) if x.numel() and w.numel() else 0.0
    for a, b, e in zip(*ours_theirs_exact(x, w, target, chunk, kwargs)):
        assert a.dtype == torch.float32 and a.shape == e.shape
        if e.isnan().any():  # a mean over no target: torch's 0/0
            assert a.isnan().equal(e.isnan())
            continue
        ulp = torch.finfo(torch.float32).eps * max(float(e.abs().max()), 1e-30)
        ours_err, theirs_err = float((a.double() - e).abs().max()), float((b.double() - e).abs().max())
        assert ours_err <= max(4 * theirs_err, 8 * ulp * (1 + largest_logit)), (ours_err, theirs_err, ulp)


def test_float32_is_as_accurate_as_torchs_over_many_cases() -> None:
    """Over fixed cases (8 to 200 tokens, 5 to 500 classes, logits small to large, chunks of 1 to
    1024), the mean error against float64 maths, in ulps of each tensor's largest value, is within
    a quarter of torch's float32 path's (measured: loss 0.17 against 0.24, input gradient 12.2
    against 12.4, weight gradient 6.7 against 6.7)."""
    totals = torch.zeros(3, 2, dtype=torch.float64)
    for seed in range(30):
        x, w, target = fixed_case(seed, torch.float32)
        for i, (a, b, e) in enumerate(zip(*ours_theirs_exact(x, w, target, [1, 16, 1024][seed % 3], {}))):
            ulp = torch.finfo(torch.float32).eps * float(e.abs().max())
            totals[i] += torch.tensor([float((a.double() - e).abs().max()) / ulp,
                                       float((b.double() - e).abs().max()) / ulp], dtype=torch.float64)
    assert (totals[:, 0] <= 1.25 * totals[:, 1]).all(), totals / 30


def fixed_case(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens, dim, classes = [8, 64, 200][seed % 3], [7, 16, 33, 64][seed % 4], [5, 70, 500][seed % 3]
    x = (torch.randn(tokens, dim, generator=gen, dtype=torch.float64) * [0.1, 1.0, 8.0][seed % 3]).to(dtype)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, torch.randint(0, classes, (tokens,), generator=gen)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bfloat16_mismatch_rate_against_float64(data) -> None:
    """bfloat16 inputs: the loss and gradients are float64 maths of the same inputs rounded once
    (logits, softmax and sums in float32): at most one element in 50 (or one) more than one
    bfloat16 ulp away, however torch's bfloat16 path does."""
    for a, b, e in zip(*ours_theirs_exact(*case(data, torch.bfloat16))):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape
        ours_rate, theirs_rate = mismatch_rate(a, e), mismatch_rate(b, e)
        assert ours_rate <= max(1 / max(e.numel(), 1), 0.02), (ours_rate, theirs_rate)


def test_bfloat16_mismatch_rate_is_below_torchs_over_many_cases() -> None:
    """Over fixed cases (8 to 200 tokens, 5 to 500 classes, logits small to large), the mean share
    of gradient elements more than one bfloat16 ulp from float64 maths: none of ours (measured
    0.000), a fifth of torch's bfloat16 path's (0.20 for the input, 0.22 for the weight), whose
    logits are rounded to bfloat16."""
    totals = torch.zeros(2, 2, dtype=torch.float64)
    for seed in range(30):
        x, w, target = fixed_case(seed, torch.bfloat16)
        ours, theirs, exact = ours_theirs_exact(x, w, target, [1, 16, 1024][seed % 3], {})
        for i, (a, b, e) in enumerate(zip(ours[1:], theirs[1:], exact[1:])):
            totals[i] += torch.tensor([mismatch_rate(a, e), mismatch_rate(b, e)], dtype=torch.float64)
    ours_mean, theirs_mean = totals[:, 0] / 30, totals[:, 1] / 30
    assert (ours_mean <= 0.001).all() and (theirs_mean > 0.1).all(), (ours_mean, theirs_mean)


def mismatch_rate(value: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of elements more than one bfloat16 ulp (of the exact value, or of the tensor's smallest
    normal scale where the exact value is far below its largest) from the exact value."""
    if exact.numel() == 0:
        return 0.0
    e = exact.double()
    floor = float(e.abs().max()) * 2.0**-8  # below this, absolute error in ulps of the largest value
    ulp = torch.maximum(e.abs(), torch.full_like(e, floor)) * 2.0**-7
    off = ((value.double() - e).abs() > ulp) & ~(e.isnan() & value.isnan())
    return float(off.double().mean())


def test_no_tensor_the_size_of_the_logits_is_formed() -> None:
    tokens, classes, dim, chunk = 64, 5000, 8, 256
    x = torch.randn(tokens, dim, requires_grad=True)
    w = torch.randn(classes, dim, requires_grad=True)
    target = torch.randint(0, classes, (tokens,))
    with LargestOutput() as plain:
        F.cross_entropy(F.linear(x, w), target).backward()
    assert plain.most >= tokens * classes  # the mode sees the logits when they are formed
    with LargestOutput() as fused:
        rows.linear_cross_entropy(x, w, target, chunk_rows=chunk).backward()
    # The weight's gradient (classes × dim) is formed, as in the ordinary loop; nothing tokens × classes.
    assert fused.most <= max(tokens * chunk, classes * dim) < tokens * classes, fused.most


@pytest.mark.parametrize("layout", ["tied", "untied", "head"])
def test_inside_release_neither_the_logits_nor_the_weights_gradient_is_formed(layout) -> None:
    vocab, dim, chunk = 3000, 16, 50  # weight 48,000 elements, logits 12 × 3000 = 36,000
    model = TinyLM(layout, vocab, dim, cross_entropy=chunk)
    opt = oxoptim.AdamW(model.parameters(), lr=0.01)
    most = 0
    with step_in_backward(opt, release_rows=model.released(), row_chunk=chunk):
        for i, ids in enumerate(token_batches(3, vocab)):
            with LargestOutput() as mode:
                model(ids).backward()
            if i:  # the first creates the optimizer state, weight-sized
                most = max(most, mode.most)
            opt.step()
    assert most <= max(12 * chunk, chunk * dim, 12 * dim) < 12 * vocab, most


def test_under_no_grad_and_without_gradients_it_is_the_same_loss() -> None:
    x, w = torch.randn(5, 4), torch.randn(9, 4)
    target = torch.tensor([0, 8, 3, -100, 3])
    with torch.no_grad():
        off = rows.linear_cross_entropy(x, w, target, chunk_rows=2)
    on = rows.linear_cross_entropy(x.requires_grad_(), w, target, chunk_rows=2)
    assert off.grad_fn is None and on.grad_fn is not None and torch.equal(off, on.detach())
    torch.testing.assert_close(off, reference(x.detach(), w, target))


def test_a_mean_over_ignored_targets_only_is_nan_as_torchs() -> None:
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4)
    target = torch.full((3,), -100)
    ours, theirs = rows.linear_cross_entropy(x, w, target), reference(x, w, target)
    assert ours.isnan() and theirs.isnan()
    assert torch.equal(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


def test_a_second_derivative_is_refused() -> None:
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(rows.linear_cross_entropy(x, w, torch.tensor([1, 2, 3])), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_changing_the_weight_before_backward_is_torchs_error() -> None:
    x, w = torch.randn(3, 4, requires_grad=True), torch.nn.Parameter(torch.randn(6, 4))
    loss = rows.linear_cross_entropy(x, w, torch.tensor([1, 2, 3]))
    with torch.no_grad():
        w.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


BAD = [
    ("reduction", dict(reduction="avg")),
    ("target out of bounds", dict(target=torch.tensor([0, 6, 1]))),
    ("negative target", dict(target=torch.tensor([0, -3, 1]))),
    ("int32 target", dict(target=torch.tensor([0, 1, 2], dtype=torch.int32))),
    ("fewer targets", dict(target=torch.tensor([0, 1]))),
]


@pytest.mark.parametrize("name, change", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_torchs_error_type(name, change) -> None:
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4)
    kwargs = dict(target=torch.tensor([0, 1, 2]), reduction="mean")
    kwargs.update(change)
    target = kwargs.pop("target")
    with pytest.raises(Exception) as theirs:
        reference(x, w, target, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        rows.linear_cross_entropy(x, w, target, **kwargs)
    if name in ("reduction", "target out of bounds", "negative target", "int32 target"):
        assert str(ours.value) == str(theirs.value)


def test_an_input_of_another_dtype_than_the_weight_is_torchs_error() -> None:
    x, w, target = torch.randn(3, 4), torch.randn(6, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError) as theirs:
        reference(x, w, target)
    with pytest.raises(RuntimeError) as ours:
        rows.linear_cross_entropy(x, w, target)
    assert str(ours.value) == str(theirs.value)


def test_a_width_that_does_not_match_the_weight_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        rows.linear_cross_entropy(torch.randn(3, 5), torch.randn(6, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True])
def test_chunk_rows_must_be_a_positive_int(chunk) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        rows.linear_cross_entropy(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2]), chunk_rows=chunk)


def test_autocast_around_a_released_weight_is_refused() -> None:
    model = TinyLM("untied", 37, 16, cross_entropy=5)
    opt = oxoptim.AdamW(model.parameters())
    with step_in_backward(opt, release_rows=model.released()), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="autocast"):
            model(token_batches(1, 37)[0])


def test_uint8_targets_are_class_indices_as_in_torch() -> None:
    x, w = torch.randn(4, 3), torch.randn(7, 3)
    target = torch.tensor([0, 6, 2, 2])
    for reduction in ("mean", "none"):
        as_bytes = rows.linear_cross_entropy(x, w, target.to(torch.uint8), reduction=reduction)
        assert torch.equal(as_bytes, rows.linear_cross_entropy(x, w, target, reduction=reduction))
        torch.testing.assert_close(as_bytes, reference(x, w, target.to(torch.uint8), reduction=reduction))


@pytest.mark.parametrize("changed", ["target", "input"])
def test_changing_the_input_or_targets_before_backward_is_torchs_error(changed) -> None:
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    h, target = x * 1, torch.tensor([0, 1, 2, 3])
    loss = rows.linear_cross_entropy(h, w, target, chunk_rows=2)
    with torch.no_grad():
        (target.fill_(-100) if changed == "target" else h.mul_(10))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_input_is_held_by_autograd_alone_and_let_go_after_backward() -> None:
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = rows.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]))
    assert loss.grad_fn.ce._inputs is None  # between forward and backward: autograd's saved tensors
    loss.backward(retain_graph=True)
    assert loss.grad_fn.ce._inputs is None
    first = x.grad.clone()
    loss.backward()  # retained: the saved tensors are attached again
    assert torch.equal(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="freed"):
        loss.grad_fn.saved_tensors


def test_under_autocast_it_runs_in_the_weights_dtype() -> None:
    x, w = torch.randn(6, 8), torch.randn(11, 8, requires_grad=True)
    target = torch.tensor([0, 3, 10, 2, 2, 7])
    plain = loss_and_grads(lambda x, w: rows.linear_cross_entropy(x, w, target), x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = loss_and_grads(lambda x, w: rows.linear_cross_entropy(x, w, target), x, w)
        lower = loss_and_grads(lambda x, w: rows.linear_cross_entropy(x, w, target), x.bfloat16(), w)
    for a, b in zip(plain, same):
        assert torch.equal(a, b)
    assert torch.equal(lower[0], rows.linear_cross_entropy(x.bfloat16().float(), w, target).detach())
    assert lower[1].dtype == torch.bfloat16 and lower[2].dtype == torch.float32


def test_tensors_off_the_cpu_are_refused() -> None:
    x, w = torch.randn(4, 3, device="meta"), torch.randn(5, 3, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        rows.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.int64, device="meta"))
