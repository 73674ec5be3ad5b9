"""8-bit block-wise optimizer state (``oxoptim.Adam8bit``/``AdamW8bit``):
the quantisation scheme against a float64 reference, one step against a
float64 "dequantise → Adam → quantise", SIMD paths and thread counts giving
the same bits, training quality against fp32 AdamW, state dicts (round trips,
fp32 ⇄ 8-bit conversions), bad input leaving everything unchanged, and one
step against bitsandbytes where it imports."""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import pytest
import torch

import oxoptim
from oxoptim import _blockwise as bw
from oxoptim import _core

from eightbit import close_to_fp32_on_a_regression, refused_steps_change_nothing, same, snapshot, stepped

BLOCK = 256


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``functional.create_dynamic_map``, restated."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def reference_codes(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (midpoints strictly below value/absmax, in float64) and absmax of each block."""
    code = create_dynamic_map(signed)
    mid = ((code[:-1] + code[1:]) / 2).double()
    flat = x.reshape(-1).double()
    n = flat.numel()
    absmax = torch.stack([flat[i : i + BLOCK].abs().max() for i in range(0, n, BLOCK)]) if n else torch.zeros(0, dtype=torch.float64)
    scale = absmax.repeat_interleave(BLOCK)[:n]
    y = torch.where(scale > 0, flat / torch.where(scale > 0, scale, 1), 0)
    return torch.searchsorted(mid, y, right=False).to(torch.uint8), absmax


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-x.numel() // BLOCK), dtype=torch.float32)
    assert _core.quantize_blockwise([x], [codes], [absmax], signed=signed)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32)
    assert _core.dequantize_blockwise([codes], [absmax], [out], signed=signed)
    return out


def test_maps_are_bitsandbytes_dynamic_maps() -> None:
    for signed in (True, False):
        ours = bw.quantization_map(signed)
        assert torch.equal(ours, create_dynamic_map(signed))
        assert (ours[1:] > ours[:-1]).all() and ours[-1] == 1.0
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    for signed in (True, False):
        assert torch.equal(bw.quantization_map(signed), bnb.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantise_dequantise_match_a_float64_reference_for_every_block_length(signed: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [*range(0, 68), 255, 256, 257, 511, 512, 513, 1000, 4 * BLOCK + 3]
    compared = differing = 0
    for n in lengths:
        x = torch.randn(n, generator=gen) * torch.logspace(-6, 0, n) if n else torch.zeros(0)
        if not signed:
            x = x.abs()
        codes, absmax = quantize(x, signed)
        want, want_absmax = reference_codes(x, signed)
        assert torch.equal(absmax.double(), want_absmax), n
        # f32 normalisation (x * (1 / absmax)) moves a value across a midpoint
        # only when it lies within an ulp or two of it.
        assert ((codes.int() - want.int()).abs() <= 1).all(), n
        differing += int((codes != want).sum())
        compared += n
        # Dequantising is map[code] * absmax, one f32 rounding.
        code = create_dynamic_map(signed)
        expected = code[codes.long()] * absmax.repeat_interleave(BLOCK)[:n]
        assert torch.equal(dequantize(codes, absmax, signed), expected), n
    assert differing <= compared * 1e-3, f"{differing} of {compared} codes differ from the float64 reference"


def test_special_values_quantise_to_their_codes() -> None:
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5] + [0.0] * 250)
    codes, absmax = quantize(x, True)
    code = create_dynamic_map(True)
    assert absmax.tolist() == [1.0]
    assert code[codes[:4].long()].tolist() == [0.0, 0.0, 1.0, code[0].item()]  # no -1 in the map: the nearest is its lowest entry
    zeros, zmax = quantize(torch.zeros(300), True)
    assert zmax.tolist() == [0.0, 0.0] and (code[zeros.long()] == 0).all()
    nan, nmax = quantize(torch.tensor([1.0, float("nan")] + [0.0] * 300), True)
    assert nmax[0].isnan() and nmax[1] == 0


@pytest.mark.parametrize("signed", [True, False])
def test_subnormal_absmax_blocks_get_the_nearest_codes(signed: bool) -> None:
    # 1 / absmax overflows to inf below absmax ~2.9e-39: the codes must still
    # be the nearest ones (those of the block scaled into the normal range),
    # and exact zeros must stay zeros.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3 * BLOCK + 7, generator=gen)
    x[::5] = 0.0
    if not signed:
        x = x.abs()
    codes, absmax = quantize(x, signed)
    for scale in (2.0**-130, 2.0**-140):
        y = (x.double() * scale).float()
        # Compare with the same block scaled by 2^64 (normal range, exact).
        want, want_absmax = quantize(y * 2.0**64, signed)
        got, got_absmax = quantize(y, signed)
        assert torch.equal(got, want), scale
        assert torch.equal(got_absmax.double() * 2.0**64, want_absmax.double()), scale
        back = dequantize(got, got_absmax, signed)
        assert not back.isnan().any() and (back[y == 0] == 0).all()
        ref, _ = reference_codes(y, signed)
        assert ((got.int() - ref.int()).abs() <= 1).all()


def test_infinite_absmax_blocks_code_their_finite_values_as_zero_not_nan() -> None:
    x = torch.randn(2 * BLOCK + 3, generator=torch.Generator().manual_seed(2))
    x[5], x[9] = float("inf"), float("-inf")
    codes, absmax = quantize(x, True)
    assert absmax[0].isinf() and absmax[1:].isfinite().all()
    back = dequantize(codes, absmax, True)
    assert not back.isnan().any()
    assert back[5] == float("inf") and back[9] == float("-inf")
    finite = torch.ones(BLOCK, dtype=torch.bool)
    finite[[5, 9]] = False
    assert (back[:BLOCK][finite] == 0).all()
    assert torch.equal(back[BLOCK:], dequantize(*quantize(x[BLOCK:], True), True))


def test_an_overflowing_second_moment_turns_no_weight_nan() -> None:
    # A finite gradient of 1e22 overflows exp_avg_sq to inf; fp32 AdamW then
    # steps that weight by m / inf = 0 and every other weight as usual.
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2 * BLOCK))
    r = torch.nn.Parameter(torch.zeros(2 * BLOCK))
    o8 = oxoptim.AdamW8bit([p], min_8bit_size=0)
    ref = torch.optim.AdamW([r])
    g = torch.randn(2 * BLOCK, generator=gen)
    g[5] = 1e22
    for step in range(3):
        p.grad, r.grad = g.clone(), g.clone()
        o8.step()
        ref.step()
        g = torch.randn(2 * BLOCK, generator=gen)
        assert p.isfinite().all(), step
        assert r.isfinite().all()
        assert p[5] == r[5] == 0
        assert o8.state[p]["exp_avg_sq_absmax"][0].isinf()


def test_tiny_gradients_blocks_follow_fp32_adamw() -> None:
    # exp_avg_sq ~1e-40 (subnormal absmax): the block's update must be as
    # close to fp32 AdamW's as any other block's, not ~50% off.
    p = torch.nn.Parameter(torch.zeros(2 * BLOCK))
    r = torch.nn.Parameter(torch.zeros(2 * BLOCK))
    o8 = oxoptim.AdamW8bit([p], min_8bit_size=0, eps=1e-30, weight_decay=0)
    ref = torch.optim.AdamW([r], eps=1e-30, weight_decay=0)
    gen = torch.Generator().manual_seed(0)
    grad = torch.cat([torch.randn(BLOCK, generator=gen) * 1e-20, torch.randn(BLOCK, generator=gen)])
    for _ in range(2):
        p.grad, r.grad = grad.clone(), grad.clone()
        o8.step()
        ref.step()
    for b in (0, 1):
        s = slice(BLOCK * b, BLOCK * (b + 1))
        assert ((p[s] - r[s]).abs().max() / r[s].abs().max()).item() < 0.05, b


def _pair(numel: int = 3 * BLOCK + 5, seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(numel, generator=gen)
    return torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())


def _grad(p: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 1e-2


@pytest.mark.parametrize("cls, decoupled", [(oxoptim.AdamW8bit, True), (oxoptim.Adam8bit, False)])
def test_one_step_matches_float64_dequantise_adam_quantise(cls, decoupled: bool) -> None:
    """After 3 steps (non-trivial 8-bit state), one step against float64 arithmetic
    on the same dequantised state; codes may differ only where a value lies within
    rounding of a midpoint, which is rare (asserted below 1e-3 of the codes)."""
    p, _ = _pair(20 * BLOCK + 17)
    lr, (b1, b2), eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.05
    opt = cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, min_8bit_size=1)
    for s in range(3):
        p.grad = _grad(p, s)
        opt.step()
    st = opt.state[p]
    m = dequantize(st["exp_avg"], st["exp_avg_absmax"], True).double()
    v = dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"], False).double()
    p0, g = p.detach().double().clone(), _grad(p, 3).double()
    p.grad = g.float()
    opt.step()
    step = 4
    if not decoupled:
        g = g + wd * p0
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2**step) ** 0.5 + eps
    want_p = (p0 * (1 - lr * wd) if decoupled else p0) - lr / (1 - b1**step) * m / denom
    assert torch.allclose(p.detach().double(), want_p, rtol=1e-6, atol=1e-7)
    differing = 0
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        want, want_absmax = reference_codes(x, signed)
        assert torch.allclose(st[f"{name}_absmax"].double(), want_absmax, rtol=1e-6, atol=0)
        diff = (st[name].int() - want.int()).abs()
        assert (diff <= 1).all()
        differing += int((diff > 0).sum())
    assert differing <= 2 * p.numel() * 1e-3, f"{differing} of {2 * p.numel()} codes differ"


@pytest.mark.parametrize("cls, twin", [(oxoptim.AdamW8bit, oxoptim.AdamW), (oxoptim.Adam8bit, oxoptim.Adam)])
def test_small_tensors_keep_fp32_state_and_oxoptims_exact_update(cls, twin) -> None:
    small, small_twin = _pair(100)
    big, big_twin = _pair(5000, seed=1)
    opt = cls([small, big], lr=1e-2, weight_decay=0.1)
    ref = twin([small_twin], lr=1e-2, weight_decay=0.1)
    for s in range(5):
        for q in (small, small_twin, big):
            q.grad = _grad(q, s)
        opt.step()
        ref.step()
    assert torch.equal(small, small_twin)
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and torch.equal(opt.state[small]["exp_avg"], ref.state[small_twin]["exp_avg"])
    assert opt.state[big]["exp_avg"].dtype == torch.uint8 and opt.state[big]["exp_avg_absmax"].shape == (-(-5000 // BLOCK),)


def _run_native(backend: str | None, threads: int) -> list[torch.Tensor]:
    torch.set_num_threads(threads)
    lens = [*range(0, 68), 255, 257, 513, 70_001]
    params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in lens]
    opt = oxoptim.AdamW8bit(params, lr=1e-2, min_8bit_size=0)
    for s in range(3):
        for p in params:
            p.grad = _grad(p, s)
        if backend is None:
            opt.step()
            continue
        state = [[opt.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")] if opt.state else None
        if state is None:
            opt.step()  # creates the state (on the default path); later steps on `backend`
            continue
        cells = [[opt.state[p]["step"] for p in params]]
        hyper = opt._hyper(opt.param_groups[0])
        assert _core.step("adam8bit", params, [p.grad for p in params], state, cells, hyper, num_threads=threads, backend=backend)
    return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]


def test_simd_paths_and_thread_counts_give_the_same_bits() -> None:
    threads = torch.get_num_threads()
    try:
        reference = _run_native("scalar", 1)
        for backend in _core.supported_backends():
            for n in (1, 2, 3):
                got = _run_native(backend, n)
                assert all(torch.equal(a, b) for a, b in zip(got, reference)), (backend, n)
        for n in (1, 2, 3):
            assert all(torch.equal(a, b) for a, b in zip(_run_native(None, n), reference)), n
    finally:
        torch.set_num_threads(threads)


def test_training_quality_is_close_to_fp32_adamw() -> None:
    """A small MLP regression trained 200 steps: 8-bit state (its 8192-element
    layer; the rest stays fp32) ends within 10% of fp32 AdamW's loss."""

    close_to_fp32_on_a_regression(torch.optim.AdamW, oxoptim.AdamW8bit, 200, lr=3e-3, weight_decay=1e-2)


def _trained(steps: int = 3, **kw) -> tuple[list[torch.nn.Parameter], oxoptim.AdamW8bit]:
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(7, 9))]
    opt = oxoptim.AdamW8bit(params, lr=1e-2, **kw)
    stepped(params, opt, _grad, range(steps))
    return params, opt


def _continue(params, opt, steps: int = 3) -> list[torch.Tensor]:
    return stepped(params, opt, _grad, range(10, 10 + steps))


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    params, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    assert {k: v.dtype for k, v in saved["state"][0].items()} == {
        "step": torch.float32,
        "exp_avg": torch.uint8,
        "exp_avg_absmax": torch.float32,
        "exp_avg_sq": torch.uint8,
        "exp_avg_sq_absmax": torch.float32,
    }
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = oxoptim.AdamW8bit(twins, lr=1e-2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(saved)))
    assert all(torch.equal(a, b) for a, b in zip(_continue(params, opt), _continue(twins, resumed)))
    clone = copy.deepcopy(resumed)
    assert torch.equal(clone.state[clone.param_groups[0]["params"][0]]["exp_avg"], resumed.state[twins[0]]["exp_avg"])


def test_fp32_adamw_state_loads_quantised_and_the_8bit_state_loads_into_adamw() -> None:
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(30))]
    fp32 = torch.optim.AdamW(params, lr=1e-2)
    for s in range(3):
        for p in params:
            p.grad = _grad(p, s)
        fp32.step()
    eight = oxoptim.AdamW8bit(params, lr=1e-2)
    eight.load_state_dict(fp32.state_dict())
    big, small = (eight.state[p] for p in params)
    codes, absmax = quantize(fp32.state[params[0]]["exp_avg"], True)
    assert torch.equal(big["exp_avg"], codes) and torch.equal(big["exp_avg_absmax"], absmax)
    assert big["exp_avg_sq"].dtype == torch.uint8 and small["exp_avg"].dtype == torch.float32
    assert torch.equal(small["exp_avg_sq"], fp32.state[params[1]]["exp_avg_sq"])
    assert eight.param_groups[0]["min_8bit_size"] == 4096
    _continue(params, eight, 1)  # steps on

    # Back: a dequantised state dict that torch's and oxoptim's AdamW load and step on.
    sd = eight.dequantized_state_dict()
    back = sd["state"][0]
    assert set(back) == {"step", "exp_avg", "exp_avg_sq"} and back["exp_avg"].dtype == torch.float32
    assert torch.equal(back["exp_avg"], dequantize(eight.state[params[0]]["exp_avg"], eight.state[params[0]]["exp_avg_absmax"], True))
    for cls in (torch.optim.AdamW, oxoptim.AdamW):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(twins, lr=1e-2)
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.param_groups[0]["decoupled_weight_decay"] is True
        _continue(twins, opt, 2)
    # Loaded as is, an 8-bit state dict is refused by oxoptim's AdamW (torch would read the codes as numbers).
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = oxoptim.AdamW(twins, lr=1e-2)
    with pytest.raises(ValueError, match="dequantize_state_dict"):
        plain.load_state_dict(eight.state_dict())
    assert not plain.state
    # Adam8bit's dequantised state is torch Adam's (coupled decay).
    adam8 = oxoptim.Adam8bit([torch.nn.Parameter(torch.randn(5000))])
    assert adam8.dequantized_state_dict()["param_groups"][0]["decoupled_weight_decay"] is False


def test_bad_arguments_are_refused() -> None:
    p = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        oxoptim.AdamW8bit(p, amsgrad=True)
    for kw, msg in (({"lr": -1.0}, "Invalid learning rate"), ({"lr": float("nan")}, "Invalid learning rate"), ({"eps": -1.0}, "Invalid epsilon"), ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"), ({"weight_decay": -0.1}, "Invalid weight_decay"), ({"min_8bit_size": -1}, "min_8bit_size")):
        with pytest.raises(ValueError, match=msg):
            oxoptim.AdamW8bit(p, **kw)


def test_bad_input_leaves_parameters_and_state_unchanged() -> None:
    params, opt = _trained()
    # A sparse gradient on the second parameter (the first is not stepped either), corrupt 8-bit state.
    refused_steps_change_nothing(params, opt, _grad, "exp_avg_absmax")
    before = snapshot(params, opt)
    # A state dict with bad entries is refused whole.
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\] has shape"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq_absmax"] = torch.zeros(2)
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["exp_avg_absmax"]
    with pytest.raises(KeyError, match="exp_avg_absmax"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(sd)
    assert same(snapshot(params, opt), before)
    # A bad gradient in a second group: the first group is not stepped either.
    extra = torch.nn.Parameter(torch.randn(300))
    opt.add_param_group({"params": [extra]})
    before = snapshot(params, opt)
    for p in params:
        p.grad = _grad(p, 8)
    extra.grad = torch.zeros(300).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert same(snapshot(params, opt), before) and not opt.state.get(extra)
    # 8-bit state needs float32 or bfloat16 CPU parameters: a float16 one is refused before any write.
    half = torch.nn.Parameter(torch.randn(5000, dtype=torch.float16))
    mixed = oxoptim.AdamW8bit([params[1], half])
    params[1].grad, half.grad = _grad(params[1], 1), torch.ones_like(half)
    snap = params[1].detach().clone()
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU parameters"):
        mixed.step()
    assert torch.equal(params[1], snap) and not mixed.state


def test_one_step_agrees_with_bitsandbytes() -> None:
    """The same first step as ``bitsandbytes.optim.AdamW8bit`` on CPU.

    bitsandbytes' CPU quantiser looks codes up in a 65536-entry table over
    [-1, 1] (bins 3e-5 wide), coarser than the map near 0, so for small
    normalised values it picks a code a few entries from the nearest (on
    this data: 0.15% of first-moment codes, 3% of second-moment codes, up to
    7 codes apart). Asserted: absmax and parameters agree; our codes are the
    float64 nearest ones; the codes agree in at least 99% (exp_avg) and 95%
    (exp_avg_sq) of the elements, and where they differ ours is never
    farther from the exact moment than bitsandbytes'."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install --no-deps bitsandbytes)")
    ours_p, theirs_p = _pair(64 * BLOCK)
    ours = oxoptim.AdamW8bit([ours_p], lr=1e-3, weight_decay=1e-2)
    theirs = bnb.optim.AdamW8bit([theirs_p], lr=1e-3, weight_decay=1e-2)
    g = _grad(ours_p, 0)
    ours_p.grad, theirs_p.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    st, bt = ours.state[ours_p], theirs.state[theirs_p]
    exact = {"exp_avg": 0.1 * g.double(), "exp_avg_sq": 0.001 * g.double() ** 2}  # the moments after one step from 0
    for name, bname, aname, signed, floor in (("exp_avg", "state1", "absmax1", True, 0.99), ("exp_avg_sq", "state2", "absmax2", False, 0.95)):
        assert torch.allclose(st[f"{name}_absmax"], bt[aname], rtol=1e-6)
        want, absmax = reference_codes(exact[name], signed)
        assert (st[name] == want).float().mean() >= 0.999
        agree = (st[name] == bt[bname]).float().mean().item()
        assert agree >= floor, f"{name}: codes agree in {agree:.4f} of elements"
        code = create_dynamic_map(signed).double()
        y = exact[name] / absmax.repeat_interleave(BLOCK)
        ours_err = (code[st[name].long()] - y).abs()
        theirs_err = (code[bt[bname].long()] - y).abs()
        assert (ours_err <= theirs_err + 1e-12).all()
    assert torch.allclose(ours_p, theirs_p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [oxoptim.Adam8bit, oxoptim.AdamW8bit])
def test_small_parameters_torch_must_step_take_torchs_step(cls) -> None:
    """A small (float32-state) parameter the kernels cannot take (a channels-last conv
    weight: not contiguous) is stepped by torch's own Adam, as ``oxoptim.Adam`` steps it,
    beside the 8-bit parameters of the same group."""
    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last))
    big = torch.nn.Parameter(torch.randn(5000))
    assert not conv.is_contiguous()
    twin_cls = oxoptim.AdamW if cls.DECOUPLED else oxoptim.Adam
    twin_conv = torch.nn.Parameter(conv.detach().clone().to(memory_format=torch.channels_last))
    ours, twin = cls([conv, big], weight_decay=0.1), twin_cls([twin_conv], weight_decay=0.1)
    for step in range(3):
        g = torch.randn_like(conv)
        conv.grad, twin_conv.grad, big.grad = g.clone(), g.clone(), torch.randn_like(big)
        ours.step()
        twin.step()
    assert torch.equal(conv, twin_conv)
    assert float(ours.state[big]["step"]) == 3 and bw.is_8bit(ours.state[big])


def test_a_refused_group_is_not_added() -> None:
    """``add_param_group`` refuses what the constructor refuses and leaves the groups as they were."""
    weights = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    opt = oxoptim.AdamW8bit([weights], bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="needs bfloat16 parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5000))]})
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))], "amsgrad": True})
    assert len(opt.param_groups) == 1
    weights.grad = torch.randn_like(weights)
    opt.step()


def test_a_refused_8bit_call_leaves_no_fresh_state() -> None:
    """Two parameters on one storage: the 8-bit call refuses before writing anything, and the
    fresh state made for it is taken back."""
    storage = torch.randn(10000)
    a, b = torch.nn.Parameter(storage[:5000]), torch.nn.Parameter(storage[4000:9000])
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt = oxoptim.AdamW8bit([a, b])
    before = storage.clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(storage, before) and not any(opt.state.values())


def test_loading_options_for_other_weights_is_refused_and_the_dequantised_dict_loads() -> None:
    """A state dict saved with bfloat16 weights and stochastic rounding is refused, whole, by
    an optimizer over float32 weights (as its constructor refuses the option); its dequantised
    form is torch's and loads into ``oxoptim.AdamW`` as into ``torch.optim.AdamW``."""
    weights = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    weights.grad = torch.randn_like(weights)
    source = oxoptim.AdamW8bit([weights], bf16_stochastic_round=True, min_8bit_size=0)
    source.step()
    full = torch.nn.Parameter(weights.detach().float())
    target = oxoptim.AdamW8bit([full], min_8bit_size=0)
    with pytest.raises(ValueError, match="needs bfloat16 parameters"):
        target.load_state_dict(source.state_dict())
    assert not target.state and "bf16_stochastic_round" not in target.param_groups[0]
    dense = source.dequantized_state_dict()
    assert not any(k in g for g in dense["param_groups"] for k in ("bf16_stochastic_round", "sr_seed", "sr_count"))
    ours, theirs = oxoptim.AdamW([full]), torch.optim.AdamW([torch.nn.Parameter(full.detach().clone())])
    ours.load_state_dict(copy.deepcopy(dense))
    theirs.load_state_dict(copy.deepcopy(dense))
    full.grad = theirs.param_groups[0]["params"][0].grad = torch.randn(5000)
    ours.step()
    theirs.step()
    torch.testing.assert_close(full, theirs.param_groups[0]["params"][0], rtol=1.3e-6, atol=1e-5)  # torch's sqrt: README †


def test_a_torch_state_dict_keeps_the_groups_own_threshold() -> None:
    """Loading a torch AdamW state dict keeps each group's own ``min_8bit_size``."""
    small = torch.nn.Parameter(torch.randn(300))
    small.grad = torch.randn(300)
    theirs = torch.optim.AdamW([torch.nn.Parameter(small.detach().clone())])
    theirs.param_groups[0]["params"][0].grad = small.grad.clone()
    theirs.step()
    theirs.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    ours = oxoptim.AdamW8bit([torch.nn.Parameter(torch.randn(3))])  # the default threshold, 4096
    ours.add_param_group({"params": [small], "min_8bit_size": 0})
    sd = theirs.state_dict()
    sd["param_groups"] = sd["param_groups"][::-1]  # the 300-element parameter in the second group
    sd["param_groups"][0]["params"], sd["param_groups"][1]["params"] = [1], [0]
    ours.load_state_dict(sd)
    assert ours.param_groups[1]["min_8bit_size"] == 0 and bw.is_8bit(ours.state[small])


def test_parameters_sharing_memory_are_refused_before_any_group_steps() -> None:
    """Views of one tensor in the second group, or a parameter listed twice: refused before the first
    group is stepped and before any state is made."""
    first = torch.nn.Parameter(torch.randn(8192))
    base = torch.randn(10000)
    views = [torch.nn.Parameter(base[:8192]), torch.nn.Parameter(base[1000:9192])]
    for p in (first, *views):
        p.grad = torch.randn_like(p)
    opt = oxoptim.AdamW8bit([{"params": [first]}, {"params": views}])
    before = first.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(first, before) and not opt.state
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of the duplicate
        twice = oxoptim.AdamW8bit([first, first])
    with pytest.raises(ValueError, match="share memory"):
        twice.step()
    assert torch.equal(first, before) and not twice.state


def _bitsandbytes_state_dict(bnb, shapes, steps: int = 3) -> tuple[list[torch.Tensor], dict]:
    """A real ``bitsandbytes.optim.AdamW8bit`` state dict: 8-bit state for parameters of 100
    elements or more (a partial last block included), fp32 for smaller ones."""
    import warnings

    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=100)
        for k in range(steps):
            for i, p in enumerate(params):
                p.grad = _grad(p, 10 * k + i)
            opt.step()
    return params, opt.state_dict()


def _stepped_8bit_copy(source: list[torch.Tensor]) -> tuple[list[torch.nn.Parameter], oxoptim.AdamW8bit, list]:
    """Copies of ``source`` as parameters, an ``AdamW8bit`` (8-bit state from 100 elements) that
    took one step on them, and the snapshot of both to compare with after a refused load."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in source]
    opt = oxoptim.AdamW8bit(params, min_8bit_size=100)
    for i, p in enumerate(params):
        p.grad = _grad(p, i)
    opt.step()
    return params, opt, snapshot(params, opt)


def _bnb_flat(sd: dict) -> dict:
    """The layout bitsandbytes saved before 0.45: the quantisation state in the entry itself."""
    state = {}
    for key, entry in sd["state"].items():
        entry = dict(entry)
        entry.update(entry.pop("__bnb_optimizer_quant_state__", {}))
        state[key] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_a_bitsandbytes_state_dict_loads_exactly(layout: str) -> None:
    """bitsandbytes' 8-bit Adam state is this scheme (its dynamic maps, blocks of 256): its codes
    and absmax load as they are (the same dequantised moments to the bit), fp32 state as it is.
    Before, the load raised KeyError "state[0] has no 'exp_avg' entry"."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    F = pytest.importorskip("bitsandbytes.functional")
    shapes = [(64, 128), (300,), (10,)]
    source, sd = _bitsandbytes_state_dict(bnb, shapes)
    if layout == "flat":
        sd = _bnb_flat(sd)
    params = [torch.nn.Parameter(p.detach().clone()) for p in source]
    opt = oxoptim.AdamW8bit(params, lr=1e-3, min_8bit_size=100)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2 and "alpha" not in opt.param_groups[0]
    for i, p in enumerate(params):
        saved = sd["state"][i]
        quant = saved.get("__bnb_optimizer_quant_state__", saved)
        ours = opt.state[p]
        assert float(ours["step"]) == 3
        if p.numel() >= 100:
            for name, (codes, qmap, absmax) in (("exp_avg", ("state1", "qmap1", "absmax1")), ("exp_avg_sq", ("state2", "qmap2", "absmax2"))):
                assert ours[name].dtype == torch.uint8 and torch.equal(ours[name], quant[codes])
                assert torch.equal(ours[f"{name}_absmax"], quant[absmax])
                theirs = F.dequantize_blockwise(quant[codes], absmax=quant[absmax], code=quant[qmap], blocksize=256)
                assert torch.equal(bw.dequantize(ours, name), theirs)
        else:
            assert torch.equal(ours["exp_avg"], quant["state1"]) and torch.equal(ours["exp_avg_sq"], quant["state2"])
    for i, p in enumerate(params):
        p.grad = _grad(p, 99 + i)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(float(opt.state[p]["step"]) == 4 for p in params)


def test_bitsandbytes_state_of_another_scheme_is_refused_saying_so() -> None:
    """bitsandbytes state that is not this scheme (another block size or map, clipping state,
    AdEMAMix settings) is refused at load with a ValueError naming bitsandbytes; nothing changes."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    source, good = _bitsandbytes_state_dict(bnb, [(64, 128), (10,)])
    params, opt, before = _stepped_8bit_copy(source)

    def edited(fn):
        sd = copy.deepcopy(good)
        fn(sd["state"][0]["__bnb_optimizer_quant_state__"], sd)
        return sd

    cases = [
        (edited(lambda q, sd: q.__setitem__("absmax1", torch.ones(4))), r"'absmax1' \(shape \(4,\)\) is not one absmax per block of 256"),
        (edited(lambda q, sd: q.__setitem__("qmap2", q["qmap2"].flip(0))), r"'qmap2' is not bitsandbytes' unsigned dynamic map"),
        (edited(lambda q, sd: q.__setitem__("gnorm_vec", torch.zeros(100))), r"no equivalent of \(gnorm_vec"),
        (edited(lambda q, sd: q.pop("state2")), r"without a tensor 'state2'"),
        (edited(lambda q, sd: sd["param_groups"][0].__setitem__("alpha", 5.0)), r"'alpha'\] is 5.0: another optimizer's setting \(bitsandbytes' AdEMAMix"),
    ]
    for sd, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        assert same(snapshot(params, opt), before)


def test_a_torchao_state_dict_is_refused_saying_what_to_do() -> None:
    """torchao's 8-bit state is tensor subclasses (and lr a tensor): refused at load with one
    ValueError naming torchao (before: "lr and betas must be numbers, not tensors", then, lr made
    a number, "RuntimeError: quantising exp_avg failed"); nothing changes. What the message says
    to do (plain tensors, lr a number) loads."""
    tao = pytest.importorskip("torchao.optim", reason="torchao is not installed")
    source = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10))]
    theirs = tao.AdamW8bit(source)
    for i, p in enumerate(source):
        p.grad = _grad(p, i)
    theirs.step()
    saved = theirs.state_dict()
    assert type(saved["state"][0]["exp_avg"]) is not torch.Tensor and torch.is_tensor(saved["param_groups"][0]["lr"])
    params, opt, before = _stepped_8bit_copy(source)
    lr_as_number = {"state": saved["state"], "param_groups": [{**g, "lr": float(g["lr"])} for g in saved["param_groups"]]}
    for sd in (saved, lr_as_number):
        with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] is a torchao\..*OptimState8bit: this is a torchao low-bit optimizer state dict"):
            opt.load_state_dict(sd)
        assert same(snapshot(params, opt), before)
    with pytest.raises(TypeError, match="not a plain tensor"):
        bw.quantize(saved["state"][0]["exp_avg"], "exp_avg")
    plain = {
        "state": {k: {n: (v.dequantize() if type(v) is not torch.Tensor else v) for n, v in e.items()} for k, e in saved["state"].items()},
        "param_groups": lr_as_number["param_groups"],
    }
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] is a tensor \(torchao's optimizers save it so\)"):
        opt.load_state_dict({**plain, "param_groups": saved["param_groups"]})
    opt.load_state_dict(plain)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8
    moment = plain["state"][0]["exp_avg"]
    assert (bw.dequantize(opt.state[params[0]], "exp_avg") - moment).abs().max() <= 0.05 * moment.abs().max()


def test_ademamix_group_settings_are_refused_before_any_state_too() -> None:
    """bitsandbytes' AdEMAMix group settings (``alpha`` other than Adam's) are refused whether or
    not the dict holds state: one saved before the first step loaded and stepped as plain Adam,
    keeping ``alpha`` in its groups; with Adam's values they are dropped either way."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
             "alpha": 5.0, "t_alpha": None, "t_beta3": None, "params": [0]}
    opt = oxoptim.AdamW8bit([p], lr=1e-3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="bitsandbytes' AdEMAMix"):
        opt.load_state_dict({"state": {}, "param_groups": [dict(group)]})
    assert opt.state_dict() == before
    opt.load_state_dict({"state": {}, "param_groups": [dict(group, alpha=0.0)]})
    assert not {"alpha", "t_alpha", "t_beta3"} & set(opt.state_dict()["param_groups"][0])


@pytest.mark.parametrize("cls", [oxoptim.AdamW8bit, oxoptim.Adam8bit])
def test_a_group_given_its_own_sr_seed_draws_nothing(cls) -> None:
    """A group that brings its ``sr_seed`` keeps it and leaves torch's generator alone (no draw, so
    under torch.distributed no broadcast), as the other optimizers' groups do."""
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    opt = cls([{"params": [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], "sr_seed": 7}],
              bf16_stochastic_round=True)
    assert torch.equal(torch.rand(1), expected)
    assert opt.param_groups[0]["sr_seed"] == 7 and opt.param_groups[0]["sr_count"] == 0


@pytest.mark.parametrize("ours, theirs", [(oxoptim.AdamW8bit, torch.optim.AdamW), (oxoptim.Adam8bit, torch.optim.Adam)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counter, betas", [(-1.0, (0.9, 0.999)), (-5.0, (0.9, 0.999)), (-5.0, (0.0, 0.999)),
                                            (-1e30, (0.9, 0.999))])
def test_8bit_step_counter_out_of_range_raises_adams_error_and_changes_nothing(ours, theirs, dtype, counter, betas) -> None:
    """The 8-bit kernel computes Adam's bias corrections: a step counter they cannot take raises
    torch's Adam error before anything is written (it wrote non-finite weights)."""
    raised = []
    for cls in (theirs, ours):
        p = torch.linspace(-1, 1, 600, dtype=dtype).reshape(2, 300).requires_grad_()
        opt = cls([p], lr=0.1, betas=betas, **({"min_8bit_size": 1} if cls is ours else {}))
        p.grad = torch.full_like(p, 0.5)
        opt.step()
        opt.state[p]["step"].fill_(counter)
        before = copy.deepcopy(opt.state_dict()), p.detach().clone()
        with warnings.catch_warnings(), pytest.raises(Exception) as info:
            warnings.simplefilter("ignore")  # torch: complex types are experimental
            opt.step()
        raised.append((type(info.value), str(info.value)))
        if cls is ours:
            assert "exp_avg_absmax" in opt.state[p]  # the 8-bit kernel's state
            after = opt.state_dict()
            assert torch.equal(p.detach(), before[1])
            for k, v in before[0]["state"][0].items():
                assert torch.equal(after["state"][0][k], v), k
    assert raised[0] == raised[1]



def _strided(g: torch.Tensor) -> torch.Tensor:
    """``g``'s values in a non-contiguous tensor (every other element of a buffer)."""
    out = torch.zeros(g.numel(), 2)[:, 0].view(g.shape)
    out.copy_(g)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("cls", [oxoptim.AdamW8bit, oxoptim.Adam8bit])
@pytest.mark.parametrize("where", ["later group", "small parameter of the same group", "beside a new group"])
@pytest.mark.parametrize("calls", ["one call", "a call per group and kind"])
def test_a_counter_adam_cannot_take_in_a_later_kernel_call_changes_nothing(cls, where, calls) -> None:
    """One step runs several kernel calls (each group's 8-bit and fp32-state parameters): a step
    counter Adam's bias corrections cannot take in the last one raises torch's error before the
    first call writes (it stepped the earlier calls' parameters). Also on a step that makes fresh
    state (a group added since), and where a strided gradient of the first parameter sends the
    step to a call per group and kind (the one native call takes contiguous gradients only)."""
    big, other = torch.nn.Parameter(torch.randn(3000)), torch.nn.Parameter(torch.randn(10 if "small" in where else 3000))
    groups = [{"params": [big, other]}] if "small" in where else [{"params": [big]}, {"params": [other]}]
    opt = cls(groups, lr=0.1, min_8bit_size=100)
    params = [big, other]
    for i, p in enumerate(params):
        p.grad = _grad(p, i)
    opt.step()
    if where == "beside a new group":
        params.append(torch.nn.Parameter(torch.randn(3000)))
        opt.add_param_group({"params": [params[-1]]})
        params[-1].grad = _grad(params[-1], 2)
    opt.state[other]["step"].fill_(-1.0)  # the next step's bias_correction1 is 1 - beta1**0 = 0
    if calls != "one call":
        big.grad = _strided(big.grad)
    before = snapshot(params, opt)
    with pytest.raises(ZeroDivisionError, match="float division by zero"):
        opt.step()
    assert same(snapshot(params, opt), before)  # a new parameter keeps no fresh state either


def test_a_step_counter_the_native_call_cannot_take_is_refused_before_any_group_is_written() -> None:
    """An 8-bit entry's step must be a float32 CPU tensor (the native call's counter): another dtype
    in the second group is refused before the first group is stepped; a loaded one is converted."""
    a, b = torch.nn.Parameter(torch.randn(3000)), torch.nn.Parameter(torch.randn(3000))
    opt = oxoptim.AdamW8bit([{"params": [a]}, {"params": [b]}], min_8bit_size=100)
    a.grad, b.grad = _grad(a, 0), _grad(b, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.state[b]["step"] = torch.tensor(1)
    before = snapshot([a, b], opt)
    with pytest.raises(ValueError, match="must be a float32 or float64 CPU tensor of one element"):
        opt.step()
    assert same(snapshot([a, b], opt), before)
    saved["state"][1]["step"] = torch.tensor(1, dtype=torch.int64)
    opt.load_state_dict(saved)
    assert opt.state[b]["step"].dtype == torch.float32 and float(opt.state[b]["step"]) == 1
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 2


@pytest.mark.parametrize("path", ["one call", "a call per group and kind", "in backward"])
def test_a_float64_step_counter_steps_as_a_float32_one(path) -> None:
    """The native call takes a float64 counter cell (a state edited or saved by another tool) as a
    float32 one: the same parameters, whichever path steps it (the call per group and backward's
    checks refused it before, though the one call took it)."""
    from oxoptim import step_in_backward

    def run(dtype: torch.dtype) -> list:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Linear(40, 3))
        opt = oxoptim.AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=16)
        x = torch.randn(4, 6)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for entry in opt.state.values():
            entry["step"] = entry["step"].to(dtype)
        context = step_in_backward(opt, bucket_numel=0) if path == "in backward" else contextlib.nullcontext()
        with context:
            for _ in range(2):
                model(x).square().mean().backward()
                if path == "a call per group and kind":
                    model[0].weight.grad = _strided(model[0].weight.grad)
                opt.step()
                opt.zero_grad()
        assert all(entry["step"].dtype == dtype and float(entry["step"]) == 3 for entry in opt.state.values())
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(torch.float32), run(torch.float64)))


def _two_group_sr(cls, **kw):
    a, b = (torch.nn.Parameter(torch.linspace(-1, 1, 600, dtype=torch.bfloat16)) for _ in range(2))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, bf16_stochastic_round=True, **kw)
    a.grad, b.grad = torch.full_like(a, 0.5), torch.full_like(b, -0.25)
    opt.step()
    return opt, [a, b]


EIGHT_BIT_SR = [(oxoptim.AdamW8bit, {"min_8bit_size": 256}), (oxoptim.SGD8bit, {"momentum": 0.9, "min_8bit_size": 256}),
                (oxoptim.AdamW, {})]


@pytest.mark.parametrize("cls, kw", EIGHT_BIT_SR, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("key, value", [("sr_seed", -1), ("sr_seed", 2**64), ("sr_seed", "abc"), ("sr_seed", 1.5),
                                        ("sr_count", -1), ("sr_seed", None)], ids=str)
def test_a_rounding_stream_the_native_call_cannot_take_is_refused_before_any_group_is_written(cls, kw, key, value) -> None:
    """sr_seed and sr_count are ints in [0, 2**64): refused when a group is added, when loaded, and
    when set afterwards (before the first group is stepped)."""
    a = torch.nn.Parameter(torch.zeros(600, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=f"{key} to be an int"):
        cls([{"params": [a], key: value}], lr=0.1, bf16_stochastic_round=True, **kw)
    opt, params = _two_group_sr(cls, **kw)
    saved = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    if value is None:
        del bad["param_groups"][1][key]
    else:
        bad["param_groups"][1][key] = value
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=f"{key} to be an int"):
        opt.load_state_dict(bad)
    opt.param_groups[1].pop(key) if value is None else opt.param_groups[1].update({key: value})
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    with pytest.raises(ValueError, match=f"{key} to be an int"):
        opt.step()
    opt.param_groups[1][key] = saved["param_groups"][1][key]
    after = opt.state_dict()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before[1]))
    assert [g.get("sr_count") for g in after["param_groups"]] == [g.get("sr_count") for g in before[0]["param_groups"]]
    for i, entry in before[0]["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in entry.items())


@pytest.mark.parametrize("cls, kw", [(oxoptim.AdamW8bit, {}), (oxoptim.SGD8bit, {"momentum": 0.9})], ids=["adamw8bit", "sgd8bit"])
def test_loaded_step_counters_that_alias_or_are_negative_are_refused_before_anything_changes(cls, kw) -> None:
    params = [torch.nn.Parameter(torch.randn(600, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, min_8bit_size=256, **kw)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    negative = copy.deepcopy(opt.state_dict())
    negative["state"][1]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        opt.load_state_dict(negative)
    shared = copy.deepcopy(opt.state_dict())
    one = torch.tensor(1.0)
    shared["state"][1]["step"] = shared["state"][2]["step"] = one
    opt.load_state_dict(shared)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert same(snapshot(params, opt), before)


def test_options_the_8bit_optimizers_do_not_take_are_refused_at_load() -> None:
    p = torch.nn.Parameter(torch.randn(600))
    for options in ({"skip_nonfinite": True}, {"state_dtype": torch.bfloat16}):
        twin = oxoptim.AdamW([p], lr=0.1, **options)
        p.grad = torch.ones_like(p)
        twin.step()
        opt = oxoptim.AdamW8bit([p], lr=0.1, min_8bit_size=256)
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=f"'{next(iter(options))}'.*does not take it"):
            opt.load_state_dict(twin.state_dict())
        assert opt.state_dict() == before


def test_adam8bit_obeys_a_loaded_groups_decoupled_weight_decay() -> None:
    """torch's Adam and AdamW step with the loaded group's flag: so do the 8-bit ones (a torch AdamW
    dict loaded into Adam8bit decays the parameter, as it does in AdamW8bit)."""
    source = torch.nn.Parameter(torch.randn(600))
    ref = torch.optim.AdamW([source], lr=0.1, weight_decay=0.5)
    source.grad = torch.ones_like(source)
    ref.step()
    results = []
    for cls in (oxoptim.Adam8bit, oxoptim.AdamW8bit):
        p = torch.nn.Parameter(source.detach().clone())
        opt = cls([p], lr=0.1, weight_decay=0.5, min_8bit_size=256)
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))
        assert opt.param_groups[0]["decoupled_weight_decay"] is True
        p.grad = torch.full_like(p, -0.5)
        opt.step()
        results.append(p.detach().clone())
        assert cls.dequantize_state_dict(opt.state_dict())["param_groups"][0]["decoupled_weight_decay"] is True
    assert torch.equal(results[0], results[1])


def test_8bit_codes_saved_with_other_strides_load_contiguous_and_step() -> None:
    p = torch.nn.Parameter(torch.randn(40, 30))
    opt = oxoptim.AdamW8bit([p], lr=0.1, min_8bit_size=256)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        codes = saved["state"][0][key]
        saved["state"][0][key] = codes.t().contiguous().t()  # the same values, column-major
    fresh = oxoptim.AdamW8bit([torch.nn.Parameter(p.detach().clone())], lr=0.1, min_8bit_size=256)
    fresh.load_state_dict(saved)
    q = fresh.param_groups[0]["params"][0]
    assert all(fresh.state[q][k].is_contiguous() and torch.equal(fresh.state[q][k], opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    q.grad = p.grad = torch.full_like(p, 0.5)
    fresh.step()
    opt.step()
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("source, target, message", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), oxoptim.AdamW8bit, "has no 'betas': not a state dict of Adam"),
    (lambda ps: torch.optim.Adagrad(ps, lr=0.1), oxoptim.AdamW8bit, "has no 'betas': not a state dict of Adam"),
    (lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.9, alpha=0.0, centered=True), oxoptim.SGD8bit,
     "holds 'grad_avg', 'square_avg', which SGD8bit does not keep"),
    (lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.9), oxoptim.SGD8bit, "torch's RMSprop"),
], ids=["sgd-adamw8bit", "adagrad-adamw8bit", "rmsprop-alpha0-sgd8bit", "rmsprop-sgd8bit"])
def test_another_optimizers_state_dict_is_refused_saying_so(source, target, message) -> None:
    p = torch.nn.Parameter(torch.randn(600))
    other = source([p])
    p.grad = torch.ones_like(p)
    other.step()
    opt = target([p], lr=0.1, min_8bit_size=256, **({"momentum": 0.9} if target is oxoptim.SGD8bit else {}))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(other.state_dict())
    assert opt.state_dict() == before


def _misaligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor at an odd byte offset of a buffer (as from a memory-mapped file)."""
    raw = torch.frombuffer(bytearray(1 + n * torch.tensor([], dtype=dtype).element_size()), dtype=dtype, offset=1, count=n)
    assert raw.data_ptr() % raw.element_size()
    return raw


@pytest.mark.parametrize("cls, kw", EIGHT_BIT_SR[:2], ids=lambda c: getattr(c, "__name__", ""))
# A small parameter without stochastic rounding takes torch's step, which takes it: not refused.
@pytest.mark.parametrize("sr, where", [(False, "param"), (False, "grad"), (True, "param"), (True, "grad"), (True, "small-param")],
                         ids=["nearest-param", "nearest-grad", "sr-param", "sr-grad", "sr-small-param"])
def test_a_misaligned_tensor_of_a_later_group_is_refused_before_any_group_is_written(cls, kw, sr, where) -> None:
    """The native call refuses a parameter or gradient at an odd byte offset: in the second group
    it is refused before the first group is stepped (it was stepped, then the step raised)."""
    dtype = torch.bfloat16 if sr else torch.float32
    n = 100 if where == "small-param" else 600
    a = torch.nn.Parameter(torch.linspace(-1, 1, 600, dtype=dtype))
    b = torch.nn.Parameter(_misaligned(n, dtype).copy_(torch.linspace(-1, 1, n)) if where != "grad" else torch.linspace(-1, 1, n, dtype=dtype))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, bf16_stochastic_round=sr, **kw)
    a.grad = torch.full_like(a, 0.5)
    b.grad = _misaligned(n, dtype).fill_(-0.25) if where == "grad" else torch.full_like(b, -0.25)
    before = snapshot([a, b], opt)
    with pytest.raises(ValueError, match="not aligned"):
        opt.step()
    assert same(snapshot([a, b], opt), before)


@pytest.mark.parametrize("cls", [oxoptim.Adam8bit, oxoptim.AdamW8bit])
def test_a_small_parameter_whose_dtype_changed_is_refused_before_any_parameter_is_written(cls) -> None:
    """A parameter under min_8bit_size whose dtype changed after its fp32 state was made: torch's
    step raised part-way (the 8-bit parameter and counters already moved on), with torch's message."""
    big, small = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(10))
    opt = cls([big, small], lr=0.1, min_8bit_size=256)
    big.grad, small.grad = _grad(big, 0), _grad(small, 0)
    opt.step()
    small.data = small.data.bfloat16()
    big.grad, small.grad = _grad(big, 1), _grad(small, 1).bfloat16()
    before = snapshot([big, small], opt)
    with pytest.raises(ValueError, match="the state of parameter 1 is torch.float32 on cpu, the parameter torch.bfloat16"):
        opt.step()
    assert same(snapshot([big, small], opt), before)


@pytest.mark.parametrize("cls, kw, name", [(oxoptim.AdamW8bit, {}, "exp_avg_sq_absmax"), (oxoptim.AdamW8bit, {}, "exp_avg_absmax"),
                                           (oxoptim.SGD8bit, {"momentum": 0.9}, "momentum_buffer_absmax")], ids=["sq", "avg", "sgd"])
def test_a_negative_absmax_is_refused_at_load_before_anything_changes(cls, kw, name) -> None:
    """A block's absmax is a magnitude: a negative one (a corrupt checkpoint) loaded silently and
    turned the weights NaN (a negative second moment) or flipped the moment's sign."""
    p = torch.nn.Parameter(torch.randn(600))
    opt = cls([p], lr=0.1, min_8bit_size=256, **kw)
    p.grad = _grad(p, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0][name][1] = -1.0
    before = snapshot([p], opt)
    with pytest.raises(ValueError, match="holds negative values"):
        opt.load_state_dict(saved)
    assert same(snapshot([p], opt), before)


def _mixed_groups(cls, kw: dict, dtype: torch.dtype) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Two groups with their own settings: 8-bit parameters (each shape, and one without a
    gradient) and, where the class steps them natively, a parameter under min_8bit_size."""
    g = torch.Generator().manual_seed(5)
    shapes = [(600,), (10,), (300,), (2, 300), (700,)] if cls is not oxoptim.SGD8bit else [(600,), (300,), (2, 300), (700,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    return params, cls(groups, lr=0.1, min_8bit_size=256, bf16_stochastic_round=dtype == torch.bfloat16, **kw)


def _mixed_steps(params: list, opt: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    for s in steps:
        for p in params[:-1]:  # the last has no gradient
            p.grad = _grad(p, s).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state.get(p, {}).values()]


NATIVE_STEPS = [(oxoptim.AdamW8bit, {}, torch.float32), (oxoptim.Adam8bit, {"weight_decay": 0.1}, torch.float32),
                (oxoptim.SGD8bit, {"momentum": 0.9, "dampening": 0.1, "nesterov": False}, torch.float32),
                (oxoptim.AdamW8bit, {}, torch.bfloat16), (oxoptim.SGD8bit, {"momentum": 0.9}, torch.bfloat16)]


@pytest.mark.parametrize("cls, kw, dtype", NATIVE_STEPS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_later_steps_take_one_native_call_with_the_checked_paths_bits(cls, kw, dtype) -> None:
    """After the first step (fresh state, checked and made in Python) every group is stepped in
    one native call (8-bit and fp32 state side by side, each group its own settings and rounding
    streams), with the bits of the path that checks every tensor in Python."""
    params, opt = _mixed_groups(cls, kw, dtype)
    ref_params, ref = _mixed_groups(cls, kw, dtype)
    ref._native_step = lambda groups, cache: False  # the checked path, every step
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        ref_group.update({k: group[k] for k in ("sr_seed",) if k in group})
    planned = []
    checked_plan = opt._plan
    opt._plan = lambda group: planned.append(group) or checked_plan(group)
    assert same(_mixed_steps(params, opt, range(5)), _mixed_steps(ref_params, ref, range(5)))
    assert len(planned) == 2, "only the first step (fresh state) takes the checked path"
    assert [g.get("sr_count") for g in opt.param_groups] == [g.get("sr_count") for g in ref.param_groups]


@pytest.mark.parametrize("cls, kw", [(oxoptim.AdamW8bit, {}), (oxoptim.SGD8bit, {"momentum": 0.9})], ids=["adamw8bit", "sgd8bit"])
@pytest.mark.parametrize("change", ["float16", "misaligned", "short-codes"])
def test_a_later_group_the_native_call_cannot_take_is_refused_before_any_group_is_written(cls, kw, change) -> None:
    """After a first step: a later group's parameter made float16, moved to an odd byte offset, or
    given codes of another shape is refused with the checked path's error, and the first group,
    which the native call would have stepped, is unchanged."""
    a, b = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(600))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, min_8bit_size=256, **kw)
    a.grad, b.grad = _grad(a, 0), _grad(b, 0)
    opt.step()
    moment = opt.MOMENTS[0]
    if change == "float16":
        b.data = b.data.half()
    elif change == "misaligned":
        b.data = _misaligned(600, torch.float32).copy_(b.data)
    else:
        opt.state[b][moment] = opt.state[b][moment].view(20, 30)
    a.grad, b.grad = _grad(a, 1), _grad(b, 1).to(b.dtype)
    before = snapshot([a, b], opt)
    message = {"float16": "float32 or bfloat16 CPU parameters", "misaligned": "not aligned", "short-codes": "has shape"}[change]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert same(snapshot([a, b], opt), before)


def test_fp32_state_sharing_memory_with_an_8bit_parameter_is_refused_after_the_first_step() -> None:
    """The 8-bit and the fp32 part of a group are proven disjoint together, not only each alone."""
    big, small = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(10))
    opt = oxoptim.AdamW8bit([big, small], lr=0.1, min_8bit_size=256)
    big.grad, small.grad = _grad(big, 0), _grad(small, 0)
    opt.step()
    opt.state[small]["exp_avg"] = big.data[:10]
    big.grad, small.grad = _grad(big, 1), _grad(small, 1)
    before = snapshot([big, small], opt)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert same(snapshot([big, small], opt), before)
