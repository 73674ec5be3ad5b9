"""SGD with an 8-bit block-wise momentum buffer (``oxoptim.SGD8bit``): every
step against a float64 "dequantise → SGD → quantise" of the same state over
random shapes, settings, dtypes and many steps; the first step's buffer taken
from the gradient; small parameters with torch's exact update; SIMD paths and
thread counts giving the same bits; training quality against fp32 SGD; state
dicts (round trips, torch SGD ⇄ 8-bit, bitsandbytes'); bad input leaving
everything unchanged; and the same steps as bitsandbytes' ``SGD8bit``."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import oxoptim
from oxoptim import _blockwise as bw
from oxoptim import _core

from eightbit import close_to_fp32_on_a_regression, refused_steps_change_nothing, same, snapshot, stepped

BLOCK = 256
KEYS = ("momentum_buffer", "momentum_buffer_absmax")


def reference_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (midpoints strictly below value/absmax, in float64) and absmax of each block, signed map."""
    code = bw.quantization_map(True).double()
    mid = (code[:-1] + code[1:]) / 2
    flat = x.reshape(-1).double()
    n = flat.numel()
    absmax = torch.stack([flat[i : i + BLOCK].abs().max() for i in range(0, n, BLOCK)]) if n else torch.zeros(0, dtype=torch.float64)
    scale = absmax.repeat_interleave(BLOCK)[:n]
    y = torch.where(scale > 0, flat / torch.where(scale > 0, scale, 1), 0)
    return torch.searchsorted(mid, y, right=False).to(torch.uint8).reshape(x.shape), absmax


def _grad(p: torch.Tensor, seed: int, scale: float = 1e-2) -> torch.Tensor:
    # Seeds apart from the parameters' (a gradient proportional to its weight cancels its decay under maximize).
    return (torch.randn(p.shape, generator=torch.Generator().manual_seed(100_000 + seed)) * scale).to(p.dtype)


def _param(shape, seed: int = 0, dtype=torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))


def _expected(p0: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, group: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch SGD's step in float64 from buffer ``buf`` (None: the first step): (parameter, buffer,
    the magnitude of the terms the new buffer sums, which bounds float32's rounding of it)."""
    d = -g if group["maximize"] else g
    d = d + group["weight_decay"] * p0
    terms = g.abs() + group["weight_decay"] * p0.abs()
    if buf is not None:
        terms = group["momentum"] * buf.abs() + (1 - group["dampening"]) * terms
    new = d if buf is None else group["momentum"] * buf + (1 - group["dampening"]) * d
    direction = d + group["momentum"] * new if group["nesterov"] else new
    return p0 - group["lr"] * direction, new, terms


def _codes(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The nearest codes of ``x`` in blocks scaled by ``absmax``, in float64."""
    code = bw.quantization_map(True).double()
    scale = absmax.double().repeat_interleave(BLOCK)[: x.numel()]
    y = torch.where(scale > 0, x.reshape(-1) / torch.where(scale > 0, scale, 1), 0)
    return torch.searchsorted((code[:-1] + code[1:]) / 2, y.clamp(-1, 1)).reshape(x.shape)


def _check_step(opt: oxoptim.SGD8bit, p: torch.nn.Parameter, g: torch.Tensor) -> tuple[int, int]:
    """Steps ``opt`` (which holds only ``p``) with gradient ``g`` and checks the step against float64
    arithmetic on the same dequantised state, within float32's rounding of the terms each value sums
    (a few ulps of the largest: a sum that cancels to near 0 keeps an error that large). Returns
    (codes differing from the float64 nearest where no midpoint lies within float32's rounding of the
    value, weights more than one ulp of their dtype, at the
    largest term of their update, from the float64 value rounded to it)."""
    entry = opt.state.get(p)
    group = opt.param_groups[0]
    buf = None if not entry or float(entry["step"]) == 0 else bw.dequantize(entry, "momentum_buffer").double()
    p0 = p.detach().double().clone()
    p.grad = g
    opt.step()
    want_p, want_buf, terms = _expected(p0, g.double(), buf, group)
    entry = opt.state[p]
    want, want_absmax = reference_codes(want_buf)
    err = 4 * torch.finfo(torch.float32).eps * terms  # float32's rounding of the new buffer
    got_absmax = entry["momentum_buffer_absmax"].double()
    block_err = torch.stack([err.reshape(-1)[i : i + BLOCK].max() for i in range(0, err.numel(), BLOCK)])
    assert ((got_absmax - want_absmax).abs() <= block_err + 1e-6 * want_absmax).all()
    got = entry["momentum_buffer"].long()
    lo, hi = _codes(want_buf - err, got_absmax), _codes(want_buf + err, got_absmax)
    assert ((lo - 1 <= got) & (got <= hi + 1)).all(), "a code no value within float32's rounding has"
    # A code differing where float32's rounding window of the value straddles a midpoint is no
    # mismatch: bfloat16 values land exactly on the map's midpoints often (0.0859375 = 11/128).
    diff = (got - want.long()).abs() * (lo == hi)
    lr, momentum = group["lr"], group["momentum"]
    largest = torch.maximum(torch.maximum(want_p.abs(), p0.abs()), lr * (terms + momentum * want_buf.abs()))
    ulp = torch.finfo(p.dtype).eps * largest.clamp_min(torch.finfo(p.dtype).tiny)
    off = (p.detach().double() - want_p.to(p.dtype).double()).abs() > ulp
    return int((diff > 0).sum()), int(off.sum())


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(1,), (67,), (256,), (257,), (3, 300), (4, 8, 33), (1100,)]),
    lr=st.sampled_from([1e-3, 0.05, 0.3]),
    momentum=st.sampled_from([0.5, 0.9, 0.99]),
    dampening=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    maximize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
# bfloat16 gradients on midpoints of the map (3 of 256 codes across them): counted as mismatches before.
@example(shape=(256,), lr=0.001, momentum=0.5, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
         dtype=torch.bfloat16, steps=1, seed=931)
def test_every_step_matches_float64_dequantise_sgd_quantise(shape, lr, momentum, dampening, nesterov, weight_decay, maximize, dtype, steps, seed) -> None:
    """Over shapes (block tails included), settings, float32/bfloat16 weights and many steps, each
    step is torch SGD's in float64 on the dequantised buffer, quantised to the nearest codes: codes
    may differ only where f32 arithmetic puts a value across a midpoint (asserted under 1%, a code
    apart at most), and weights agree to one ulp of their dtype in at least 99.9% of elements (one
    may differ in a small example: float32 rounds several times)."""
    if nesterov:
        dampening = 0.0
    p = _param(shape, seed, dtype)
    opt = oxoptim.SGD8bit([p], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize, min_8bit_size=0)
    differing = off = 0
    for s in range(steps):
        d, o = _check_step(opt, p, _grad(p, seed + s))
        differing, off = differing + d, off + o
    assert opt.state[p]["momentum_buffer"].dtype == torch.uint8 and float(opt.state[p]["step"]) == steps
    assert differing <= max(1, 0.01 * p.numel() * steps), f"{differing} of {p.numel() * steps} codes differ"
    assert off <= max(1, 0.001 * p.numel() * steps), f"{off} of {p.numel() * steps} weights off by more than one ulp"


def test_the_first_step_takes_the_buffer_from_the_gradient_whatever_the_dampening() -> None:
    """torch's first momentum step sets the buffer to the (decayed) gradient, undamped; so do we,
    by the step counter (0 until then), for 8-bit and fp32 state alike."""
    big, small = _param(5 * BLOCK + 3, 1), _param(50, 2)
    opt = oxoptim.SGD8bit([big, small], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, min_8bit_size=100)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in (big, small)]
    ref = torch.optim.SGD(twins, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1)
    for p, t in zip((big, small), twins):
        p.grad = t.grad = _grad(p, 3)
    opt.step()
    ref.step()
    codes, absmax = reference_codes(ref.state[twins[0]]["momentum_buffer"])
    assert torch.equal(opt.state[big]["momentum_buffer_absmax"], absmax.float())
    assert (opt.state[big]["momentum_buffer"] != codes).float().mean() <= 0.001
    assert torch.equal(big, twins[0]) and torch.equal(small, twins[1])
    assert torch.equal(opt.state[small]["momentum_buffer"], ref.state[twins[1]]["momentum_buffer"])
    assert float(opt.state[big]["step"]) == float(opt.state[small]["step"]) == 1


@pytest.mark.parametrize("hyper", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True), dict(momentum=0.8, nesterov=True)],
                         ids=["plain", "damped", "nesterov"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_small_parameters_keep_fp32_state_and_torchs_exact_update(hyper, layout) -> None:
    """Parameters under ``min_8bit_size`` keep an fp32 buffer and follow ``torch.optim.SGD`` bit for
    bit, on the kernels or (a channels-last weight, which they cannot take) by torch's own step."""
    shape = (8, 3, 3, 3)
    small = _param(shape, 4)
    if layout == "channels_last":
        small = torch.nn.Parameter(small.detach().to(memory_format=torch.channels_last))
    big = _param(5000, 5)
    twin = torch.nn.Parameter(small.detach().clone(memory_format=torch.preserve_format))
    opt = oxoptim.SGD8bit([small, big], lr=0.05, **hyper)
    ref = torch.optim.SGD([twin], lr=0.05, **hyper)
    for s in range(5):
        g = _grad(small, s).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        small.grad, twin.grad, big.grad = g.clone(), g.clone(), _grad(big, s)
        opt.step()
        ref.step()
    assert torch.equal(small, twin)
    assert opt.state[small]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt.state[small]["momentum_buffer"], ref.state[twin]["momentum_buffer"])
    assert bw.is_8bit(opt.state[big]) and float(opt.state[small]["step"]) == 5


@pytest.mark.parametrize("hyper", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.3, weight_decay=0.1), dict(momentum=0.8, nesterov=True, maximize=True)],
                         ids=["plain", "damped", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_small_parameters_of_other_dtypes_take_oxoptim_sgds_exact_steps(hyper, dtype) -> None:
    """Small bfloat16, float16 and float64 parameters step as ``oxoptim.SGD`` steps them, bit for bit,
    a first step with dampening included (torch makes that buffer, as in oxoptim.SGD)."""
    small, big = _param((7, 3), 4, dtype), _param(5000, 5)
    twin = torch.nn.Parameter(small.detach().clone())
    opt = oxoptim.SGD8bit([small, big], lr=0.1, **hyper)
    ref = oxoptim.SGD([twin], lr=0.1, **hyper)
    for s in range(4):
        g = _grad(small, s, scale=1.0)
        small.grad, twin.grad, big.grad = g.clone(), g.clone(), _grad(big, s)
        opt.step()
        ref.step()
        assert torch.equal(small, twin), s
        assert torch.equal(opt.state[small]["momentum_buffer"], ref.state[twin]["momentum_buffer"]), s
    assert opt.state[small]["momentum_buffer"].dtype == dtype and bw.is_8bit(opt.state[big])


def _run_native(backend: str | None, threads: int, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.set_num_threads(threads)
    lens = [*range(0, 68), 255, 257, 513, 70_001]
    params = [_param(n, n, dtype) for n in lens]
    rounding = dtype == torch.bfloat16
    opt = oxoptim.SGD8bit(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, min_8bit_size=0, bf16_stochastic_round=rounding)
    if rounding:
        opt.param_groups[0]["sr_seed"] = 1234
    for s in range(3):
        for p in params:
            p.grad = _grad(p, s)
        if backend is None or not opt.state:
            opt.step()  # creates the state (on the default path); later steps on `backend`
            continue
        group = opt.param_groups[0]
        state = [[opt.state[p][k] for p in params] for k in KEYS]
        cells = [[opt.state[p]["step"] for p in params]]
        assert _core.step("sgd8bit", params, [p.grad for p in params], state, cells, opt._hyper(group), num_threads=threads,
                          backend=backend, **opt._rounding(group, params))
        opt._advance_group(group)
    return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_simd_paths_and_thread_counts_give_the_same_bits(dtype) -> None:
    threads = torch.get_num_threads()
    try:
        reference = _run_native("scalar", 1, dtype)
        for backend in _core.supported_backends():
            for n in (1, 2, 3):
                got = _run_native(backend, n, dtype)
                assert all(torch.equal(a, b) for a, b in zip(got, reference)), (backend, n)
        for n in (1, 2, 3):
            assert all(torch.equal(a, b) for a, b in zip(_run_native(None, n, dtype), reference)), n
    finally:
        torch.set_num_threads(threads)


def test_training_quality_is_close_to_fp32_sgd() -> None:
    """A small MLP regression trained 300 steps with Nesterov momentum: the 8-bit buffer (its
    8192-element layer; the rest stays fp32) ends within 10% of fp32 SGD's loss."""

    close_to_fp32_on_a_regression(torch.optim.SGD, oxoptim.SGD8bit, 300, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _trained(steps: int = 3, **kw) -> tuple[list[torch.nn.Parameter], oxoptim.SGD8bit]:
    params = [_param(5000, 0), _param((7, 9), 1)]
    opt = oxoptim.SGD8bit(params, lr=1e-2, momentum=0.9, **kw)
    stepped(params, opt, _grad, range(steps))
    return params, opt


def _continue(params, opt, steps: int = 3) -> list[torch.Tensor]:
    return stepped(params, opt, _grad, range(10, 10 + steps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_resumes_bit_identically(dtype) -> None:
    kw = {"bf16_stochastic_round": True} if dtype == torch.bfloat16 else {}
    params = [_param(5000, 0, dtype), _param((7, 9), 1, dtype)]
    opt = oxoptim.SGD8bit(params, lr=1e-2, momentum=0.9, **kw)
    _continue(params, opt)
    saved = copy.deepcopy(opt.state_dict())
    assert {k: v.dtype for k, v in saved["state"][0].items()} == {"step": torch.float32, "momentum_buffer": torch.uint8, "momentum_buffer_absmax": torch.float32}
    assert saved["state"][1]["momentum_buffer"].dtype == dtype
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = oxoptim.SGD8bit(twins, lr=1e-2, momentum=0.9, **kw)
    resumed.load_state_dict(pickle.loads(pickle.dumps(saved)))
    assert all(torch.equal(a, b) for a, b in zip(_continue(params, opt), _continue(twins, resumed)))


def test_torch_sgd_state_loads_quantised_and_the_8bit_state_loads_into_sgd() -> None:
    params = [_param(5000, 0), _param(30, 1), _param(6000, 2)]
    fp32 = torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-3)
    for s in range(3):
        for p in params[:2]:  # the third has no buffer yet (None in torch's state)
            p.grad = _grad(p, s)
        fp32.step()
    eight = oxoptim.SGD8bit(params, lr=1e-3, momentum=0.5)
    eight.load_state_dict(fp32.state_dict())
    assert eight.param_groups[0]["lr"] == 1e-2 and eight.param_groups[0]["momentum"] == 0.9
    big, small = (eight.state[p] for p in params[:2])
    codes, absmax = reference_codes(fp32.state[params[0]]["momentum_buffer"])
    assert (big["momentum_buffer"] == codes).float().mean() > 0.999 and torch.allclose(big["momentum_buffer_absmax"], absmax.float())
    assert torch.equal(small["momentum_buffer"], fp32.state[params[1]]["momentum_buffer"])
    assert float(big["step"]) == float(small["step"]) == 1
    assert not eight.state.get(params[2])
    # It steps on: the third parameter's first step takes its buffer from its gradient.
    ref = copy.deepcopy(fp32)
    for s in range(2):
        for p, q in zip(params, ref.param_groups[0]["params"]):
            p.grad, q.grad = _grad(p, 20 + s), _grad(p, 20 + s)
        eight.step()
        ref.step()
    assert torch.equal(params[1], ref.param_groups[0]["params"][1])
    assert torch.allclose(params[2], ref.param_groups[0]["params"][2], atol=1e-4)

    # Back: a dequantised state dict that torch's and oxoptim's SGD load and step on.
    sd = eight.dequantized_state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"} and sd["state"][0]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(sd["state"][0]["momentum_buffer"], bw.dequantize(eight.state[params[0]], "momentum_buffer"))
    for cls in (torch.optim.SGD, oxoptim.SGD):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(twins, lr=1e-2, momentum=0.9)
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["weight_decay"] == 1e-3
        _continue(twins, opt, 2)
    # Loaded as is, the 8-bit state dict is refused by oxoptim's SGD (torch would read the codes as numbers).
    plain = oxoptim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match="dequantize_state_dict"):
        plain.load_state_dict(eight.state_dict())
    assert not plain.state


def test_bad_arguments_are_refused_with_torchs_messages() -> None:
    p = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(NotImplementedError, match="SGD without momentum is not supported"):
        oxoptim.SGD8bit(p)
    for kw, msg in (({"lr": -1.0}, "Invalid learning rate"), ({"lr": float("nan")}, "Invalid learning rate"),
                    ({"momentum": -0.5}, "Invalid momentum value"), ({"weight_decay": -0.1}, "Invalid weight_decay"),
                    ({"nesterov": True, "dampening": 0.1}, "Nesterov momentum requires a momentum and zero dampening"),
                    ({"min_8bit_size": -1}, "min_8bit_size"), ({"kahan_sum": True}, "kahan_sum=True is not available")):
        with pytest.raises(ValueError, match=msg):
            oxoptim.SGD8bit(p, **{"momentum": 0.9, **kw})
    opt = oxoptim.SGD8bit(p, momentum=0.9)
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "momentum": 0.0})
    assert len(opt.param_groups) == 1


def test_bad_input_leaves_parameters_and_state_unchanged() -> None:
    params, opt = _trained()
    # A sparse gradient on the second parameter (the first is not stepped either), corrupt 8-bit state.
    refused_steps_change_nothing(params, opt, _grad, "momentum_buffer_absmax")
    before = snapshot(params, opt)
    # A state dict with bad entries is refused whole.
    for corrupt, error, msg in (
        (lambda sd: sd["state"][1].__setitem__("momentum_buffer", torch.zeros(3)), ValueError, r"state\[1\]\['momentum_buffer'\] has shape"),
        (lambda sd: sd["state"][0].__setitem__("momentum_buffer_absmax", torch.zeros(2)), ValueError, "momentum_buffer_absmax"),
        (lambda sd: sd["state"][0].pop("momentum_buffer_absmax"), KeyError, "momentum_buffer_absmax"),
        (lambda sd: sd["param_groups"][0].__setitem__("momentum", 0.0), ValueError, r"param_groups\[0\]: SGD without momentum"),
        (lambda sd: sd["param_groups"][0].__setitem__("nesterov", True) or sd["param_groups"][0].__setitem__("dampening", 0.5), ValueError, "Nesterov"),
    ):
        sd = copy.deepcopy(opt.state_dict())
        corrupt(sd)
        with pytest.raises(error, match=msg):
            opt.load_state_dict(sd)
        assert same(snapshot(params, opt), before)
    # 8-bit state needs float32 or bfloat16 CPU parameters: a float16 one is refused before any write.
    half = torch.nn.Parameter(torch.randn(5000, dtype=torch.float16))
    mixed = oxoptim.SGD8bit([params[1], half], momentum=0.9)
    params[1].grad, half.grad = _grad(params[1], 1), torch.ones_like(half)
    snap = params[1].detach().clone()
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU parameters"):
        mixed.step()
    assert torch.equal(params[1], snap) and not mixed.state


def test_parameters_sharing_memory_are_refused_before_anything_is_written() -> None:
    base = torch.randn(2 * 5000)
    a, b = torch.nn.Parameter(base[:5000]), torch.nn.Parameter(base[:5000])  # the same memory twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = oxoptim.SGD8bit([a, b], momentum=0.9)
    a.grad, b.grad = torch.ones(5000), torch.ones(5000)
    snap = base.clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(base, snap) and not opt.state


def _bnb():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install --no-deps bitsandbytes)")
    return bnb


def test_steps_agree_with_bitsandbytes() -> None:
    """The same steps as ``bitsandbytes.optim.SGD8bit`` on CPU (whose update is ours with
    dampening 0 and no Nesterov): the first step copies the gradient, the second blends.
    bitsandbytes' CPU quantiser picks codes from a table coarser than the map near 0, so the codes
    are asserted equal in at least 99% of elements, ours the float64 nearest, and the weights
    equal to float32 rounding."""
    bnb = _bnb()
    ours_p, theirs_p = _param(64 * BLOCK, 0), _param(64 * BLOCK, 0)
    ours = oxoptim.SGD8bit([ours_p], lr=0.1, momentum=0.9, weight_decay=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.optim.SGD8bit([theirs_p], lr=0.1, momentum=0.9, weight_decay=1e-2)
        for s in range(2):
            g = _grad(ours_p, s)
            want_p, want_buf, _ = _expected(ours_p.detach().double(), g.double(),
                                         None if s == 0 else bw.dequantize(ours.state[ours_p], "momentum_buffer").double(),
                                         ours.param_groups[0])
            ours_p.grad, theirs_p.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
            mine, bt = ours.state[ours_p], theirs.state[theirs_p]
            assert torch.allclose(mine["momentum_buffer_absmax"], bt["absmax1"], rtol=1e-6)
            want, _ = reference_codes(want_buf)
            assert (mine["momentum_buffer"] == want).float().mean() >= 0.999
            agree = (mine["momentum_buffer"] == bt["state1"]).float().mean().item()
            assert agree >= 0.99, f"step {s + 1}: codes agree in {agree:.4f} of elements"
            assert torch.allclose(ours_p, theirs_p, rtol=0, atol=1e-5), s
            # Carry on from the same state: bitsandbytes' codes are loaded as they are.
            mine["momentum_buffer"].copy_(bt["state1"])


def test_a_bitsandbytes_state_dict_loads_exactly() -> None:
    """bitsandbytes' ``SGD8bit`` keeps ``state1``/``qmap1``/``absmax1`` and its groups ``betas =
    (momentum, dampening)``: the codes and absmax load as they are, the settings as torch's names."""
    bnb = _bnb()
    shapes = [(64, 128), (300,), (10,)]
    params = [_param(s, i) for i, s in enumerate(shapes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.optim.SGD8bit(params, lr=0.05, momentum=0.8, weight_decay=1e-3, min_8bit_size=100)
        for k in range(3):
            for i, p in enumerate(params):
                p.grad = _grad(p, 10 * k + i)
            theirs.step()
    sd = theirs.state_dict()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = oxoptim.SGD8bit(twins, lr=1e-3, momentum=0.5, nesterov=True, min_8bit_size=100)
    ours.load_state_dict(sd)
    group = ours.param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"], group["weight_decay"]) == (0.05, 0.8, 0, 1e-3)
    assert "betas" not in group and "eps" not in group and group["nesterov"] is False  # what bitsandbytes ran
    for i, p in enumerate(twins):
        saved = sd["state"][i]
        quant = saved.get("__bnb_optimizer_quant_state__", saved)
        mine = ours.state[p]
        assert float(mine["step"]) == 3
        if p.numel() >= 100:
            assert torch.equal(mine["momentum_buffer"], quant["state1"]) and torch.equal(mine["momentum_buffer_absmax"], quant["absmax1"])
        else:
            assert torch.equal(mine["momentum_buffer"], quant["state1"])
    for i, p in enumerate(twins):
        p.grad = _grad(p, 99 + i)
    ours.step()
    assert all(float(ours.state[p]["step"]) == 4 for p in twins)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_in_backward_is_bit_identical_to_the_ordinary_loop(dtype) -> None:
    def run(in_backward: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4)).to(dtype)
        opt = oxoptim.SGD8bit(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, min_8bit_size=1000,
                              bf16_stochastic_round=dtype == torch.bfloat16)
        for g in opt.param_groups:
            g["sr_seed"] = 5
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
        if in_backward:
            with oxoptim.step_in_backward(opt, bucket_numel=0):
                for _ in range(4):
                    model(x).square().mean().backward()
                    opt.step()
        else:
            for _ in range(4):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        assert any(bw.is_8bit(e) for e in opt.state.values()) and any(not bw.is_8bit(e) for e in opt.state.values())
        return [t.detach().clone() for p in model.parameters() for t in (p, *opt.state[p].values())]

    assert same(run(False), run(True))


def test_a_bitsandbytes_group_with_dampening_loads_as_what_bitsandbytes_ran() -> None:
    """bitsandbytes saves ``betas=(momentum, dampening)`` but its update ignores dampening: the loaded
    group has dampening 0, and the next step is bitsandbytes' next step."""
    bnb = _bnb()
    p, twin = _param(16 * BLOCK, 3), _param(16 * BLOCK, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.optim.SGD8bit([p], lr=0.1, momentum=0.9, dampening=0.5)
        for k in range(3):
            p.grad = _grad(p, k)
            theirs.step()
        ours = oxoptim.SGD8bit([twin], lr=0.1, momentum=0.9, dampening=0.2)
        with torch.no_grad():
            twin.copy_(p)
        ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
        assert ours.param_groups[0]["dampening"] == 0.0
        p.grad, twin.grad = _grad(p, 9), _grad(p, 9)
        theirs.step()
        ours.step()
    assert torch.allclose(p, twin, rtol=0, atol=1e-5)


def test_a_state_dict_of_another_optimizer_is_refused_before_anything_is_loaded() -> None:
    params = [_param(5000, 0)]
    twin = [torch.nn.Parameter(params[0].detach().clone())]
    opt = oxoptim.SGD8bit(params, momentum=0.9)
    others = [torch.optim.Adam(twin), oxoptim.AdamW8bit(twin)]  # no state yet: only their groups say so
    try:
        others.append(_bnb().optim.RMSprop8bit(twin))
    except pytest.skip.Exception:
        pass
    for other in others:
        with pytest.raises(ValueError, match="has no 'momentum': not a state dict of SGD"):
            opt.load_state_dict(other.state_dict())
        assert opt.param_groups[0]["momentum"] == 0.9 and not opt.state
    with pytest.raises(ValueError, match=r"param_groups\[0\]: SGD without momentum"):  # torch SGD without momentum
        opt.load_state_dict(torch.optim.SGD(twin, lr=0.1).state_dict())
    assert opt.param_groups[0]["momentum"] == 0.9


def test_a_bitsandbytes_state_dict_with_keys_torch_adds_loads() -> None:
    """A scheduler's ``initial_lr`` and ``param_names`` (an optimizer built from named parameters)
    are keys torch adds to any optimizer's groups, bitsandbytes' too."""
    bnb = _bnb()
    model = torch.nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.optim.SGD8bit(model.named_parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(theirs, 2)
        for k in range(2):
            for p in model.parameters():
                p.grad = _grad(p, k)
            theirs.step()
            scheduler.step()
    ours = oxoptim.SGD8bit(model.named_parameters(), lr=0.5, momentum=0.5, min_8bit_size=1000)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["momentum"] == 0.9 and ours.param_groups[0]["initial_lr"] == 0.1
    assert bw.is_8bit(ours.state[model.weight]) and float(ours.state[model.weight]["step"]) == 2


def test_torch_sgds_other_keywords_are_taken() -> None:
    p = [_param(10, 0)]
    opt = oxoptim.SGD8bit(p, lr=0.1, momentum=0.9, foreach=True, fused=None, differentiable=False)
    assert "foreach" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        oxoptim.SGD8bit(p, momentum=0.9, differentiable=True)


def test_state_the_native_step_cannot_take_is_refused_before_any_group_is_written() -> None:
    """With stochastic rounding (no torch step to fall back on) and for 8-bit state, the step
    counter and fp32 buffers the native call would refuse are refused before the first write;
    loading makes them what it takes (a float32 step, contiguous buffers)."""
    big, small = _param((64, 64), 0, torch.bfloat16), _param((8, 8), 1, torch.bfloat16)
    twins = [torch.nn.Parameter(q.detach().clone()) for q in (big, small)]
    source = torch.optim.SGD([{"params": [twins[0]]}, {"params": [twins[1]]}], lr=0.1, momentum=0.9)
    source.state[twins[1]]["momentum_buffer"] = torch.randn(8, 8).t().bfloat16()  # not contiguous
    opt = oxoptim.SGD8bit([{"params": [big]}, {"params": [small]}], lr=0.1, momentum=0.9, bf16_stochastic_round=True)
    opt.load_state_dict(source.state_dict())
    assert opt.state[small]["momentum_buffer"].is_contiguous() and opt.state[small]["step"].dtype == torch.float32
    for case in ("transposed buffer", "float32 buffer", "int64 step"):
        entry = opt.state[small]
        if case == "transposed buffer":
            entry["momentum_buffer"] = entry["momentum_buffer"].t().contiguous().t()
        elif case == "float32 buffer":
            entry["momentum_buffer"] = entry["momentum_buffer"].contiguous().float()
        else:
            entry["momentum_buffer"] = entry["momentum_buffer"].bfloat16()
            entry["momentum_buffer"] = entry["momentum_buffer"].contiguous()
            entry["step"] = torch.tensor(1)
        before = snapshot([big, small], opt)
        big.grad, small.grad = _grad(big, 0), _grad(small, 0)
        with pytest.raises(ValueError, match="contiguous CPU state of the parameter's dtype" if case != "int64 step" else "float32 or float64 CPU tensor"):
            opt.step()
        assert same(snapshot([big, small], opt), before), case
        assert not opt.state.get(big) and opt.param_groups[0]["sr_count"] == 0
    opt.state[small]["step"] = torch.tensor(1.0)
    opt.step()  # taken once the state is what the native call takes
    assert float(opt.state[small]["step"]) == 2 and bw.is_8bit(opt.state[big])
