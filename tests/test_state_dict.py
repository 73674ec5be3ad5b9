"""state_dict interchange with torch.optim, both ways, mid-training."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import oxoptim
from optimizers import TWIN_IDS, TWINS, Twin, assert_twin_matches, assert_unchanged, clone_params, same_setting, set_grads, snapshot

def _train(opt, params, gen, steps):
    for _ in range(steps):
        set_grads(gen, params)
        opt.step()


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_moves_between_libraries_mid_training(twin: Twin, direction: str) -> None:
    make_src, make_dst = (twin.make_ours, twin.make_theirs) if direction == "ours_to_torch" else (twin.make_theirs, twin.make_ours)
    gen = torch.Generator().manual_seed(0)
    params = clone_params([torch.randn(s, generator=gen) for s in [(17,), (4, 9), ()]])
    src = make_src(params, **twin.typical)
    _train(src, params, gen, 10)

    # Serialise through torch.save as a user would; continue on both sides.
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": src.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    continued = clone_params(saved["params"])
    dst = make_dst(continued, **twin.typical)
    dst.load_state_dict(saved["opt"])
    # What was saved is what the other library now holds, exactly.
    for pa, pb in zip(params, continued):
        assert src.state[pa].keys() == dst.state[pb].keys()
        for key in src.state[pa]:
            assert same_setting(src.state[pa][key], dst.state[pb][key]), key

    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _train(src, params, gen_a, 10)
    _train(dst, continued, gen_b, 10)
    for pa, pb in zip(params, continued):
        assert_twin_matches(twin, pa.detach(), pb.detach())
        for key in src.state[pa]:
            assert_twin_matches(twin, src.state[pa][key], dst.state[pb][key])


def _stepped_once(twin: Twin, seed: int) -> tuple:
    """The twin and its reference over one 5-element parameter each, stepped once alike:
    ``(generator, ours' params, theirs' params, ours, theirs)``."""
    gen = torch.Generator().manual_seed(seed)
    mine = clone_params([torch.randn(5, generator=gen)])
    ref = clone_params(mine)
    ours, theirs = twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
    set_grads(gen, mine, ref)
    ours.step()
    theirs.step()
    return gen, mine, ref, ours, theirs


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_state_dict_layout_is_torchs(twin: Twin) -> None:
    _, _, _, ours, theirs = _stepped_once(twin, seed=2)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key in a["state"][k]:
            if not torch.is_tensor(b["state"][k][key]):  # prodigyopt's step is an int
                assert type(a["state"][k][key]) is type(b["state"][k][key])
                continue
            assert a["state"][k][key].dtype == b["state"][k][key].dtype
            assert a["state"][k][key].shape == b["state"][k][key].shape
    strip = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]  # noqa: E731
    assert strip(a["param_groups"]) == strip(b["param_groups"])


def _params_of(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_deepcopy_and_pickle_carry_the_state_and_continue_identically(twin: Twin) -> None:
    gen = torch.Generator().manual_seed(3)
    params = clone_params([torch.randn(s, generator=gen) for s in [(33,), (4, 5)]])
    opt = twin.make_ours(params, **twin.typical)
    _train(opt, params, gen, 5)
    clone = copy.deepcopy(opt)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = twin.make_ours(clone_params(params), **twin.typical)  # same weights, no state
    copies = [clone, loaded, fresh]
    assert type(clone) is type(opt) and type(loaded) is type(opt)
    for other in (clone, loaded):
        for p, q in zip(params, _params_of(other)):
            assert q is not p and torch.equal(q, p)
            assert opt.state[p].keys() == other.state[q].keys()
            for key in opt.state[p]:
                assert same_setting(opt.state[p][key], other.state[q][key]), key

    # Each continues on its own tensors with the same gradients.
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for o in [opt] + copies:
            for p, g in zip(_params_of(o), grads):
                p.grad = g.clone()
            o.step()
    for other in (clone, loaded):
        for p, q in zip(params, _params_of(other)):
            assert torch.equal(p, q)
    # The state mattered: without it the same steps end elsewhere.
    assert not all(torch.equal(p, q) for p, q in zip(params, _params_of(fresh)))


def _filled_on_load(twin: Twin, sd: dict) -> list[str]:
    """The group settings the twin's own ``load_state_dict`` puts back when a state dict
    lacks them (flags a later torch release added): what an older checkpoint misses."""
    filled = []
    for key in sd["param_groups"][0]:
        if key == "params":
            continue
        older = copy.deepcopy(sd)
        for group in older["param_groups"]:
            del group[key]
        ref = twin.make_theirs(clone_params([torch.zeros(5)]), **twin.typical)
        try:
            ref.load_state_dict(older)
        except Exception:
            continue
        if key in ref.param_groups[0]:
            filled.append(key)
    return filled


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_a_checkpoint_from_an_older_torch_loads_as_torch_loads_it(twin: Twin) -> None:
    """A state dict saved before torch added a group setting (Adam's ``decoupled_weight_decay``,
    ``maximize``...) loads: torch's ``__setstate__`` fills the setting, so oxoptim must too."""
    gen, mine, ref, ours, theirs = _stepped_once(twin, seed=4)
    sd = theirs.state_dict()
    filled = _filled_on_load(twin, sd)
    if twin.theirs.__module__.startswith("torch.optim"):
        assert filled, "torch fills no setting of this optimizer: the test would check nothing"
    older = copy.deepcopy(sd)
    for group in older["param_groups"]:
        for key in filled:
            del group[key]
    ours.load_state_dict(copy.deepcopy(older))
    theirs.load_state_dict(copy.deepcopy(older))
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups
    ]
    set_grads(gen, mine, ref)
    ours.step()
    theirs.step()
    assert_twin_matches(twin, mine[0].detach(), ref[0].detach())


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_loads_the_none_momentum_buffer_older_torch_saved(momentum: float, nesterov: bool) -> None:
    """Older torch's SGD saved ``momentum_buffer: None`` (always, without momentum); torch loads it
    as a fresh buffer."""
    import oxoptim

    results = []
    for cls in (torch.optim.SGD, oxoptim.SGD):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = cls([p], lr=0.1, momentum=momentum, nesterov=nesterov)
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        opt.load_state_dict({"state": {0: {"momentum_buffer": None}}, "param_groups": [{**group, "params": [0]}]})
        for i in range(3):
            p.grad = torch.linspace(0, 1, 5) * (i + 1)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["momentum_buffer"]))
    (ours, our_buffer), (theirs, their_buffer) = results[1], results[0]
    assert torch.equal(ours, theirs)
    assert (our_buffer is None) == (their_buffer is None)
    if their_buffer is not None:
        assert torch.equal(our_buffer, their_buffer)


def _hooked_optimizers() -> list:
    """Every class that overrides ``state_dict``/``load_state_dict``, with what makes it convert."""
    import oxoptim

    def bf16(n: int) -> list:
        return [torch.nn.Parameter(torch.randn(n).bfloat16()) for _ in range(2)]

    def f32(n: int) -> list:
        return [torch.nn.Parameter(torch.randn(n)) for _ in range(2)]

    return [
        ("AdamW8bit", lambda: oxoptim.AdamW8bit(f32(5000), lr=1e-2)),
        ("SGD8bit", lambda: oxoptim.SGD8bit(f32(5000), lr=1e-2, momentum=0.9)),
        ("NAdam-bf16", lambda: oxoptim.NAdam(bf16(300), lr=1e-2)),
        ("AdamW-kahan", lambda: oxoptim.AdamW(bf16(300), lr=1e-2, kahan_sum=True)),
        ("SGD-skip", lambda: oxoptim.SGD(f32(30), lr=1e-2, momentum=0.9, skip_nonfinite=True)),
        ("Subgradient", lambda: oxoptim.Subgradient(f32(30), lr=1e-2)),
        *[(t.ours.__name__, lambda t=t: t.make_ours(f32(30), **t.typical)) for t in TWINS],
    ]


@pytest.mark.parametrize("make", [m for _, m in _hooked_optimizers()], ids=[n for n, _ in _hooked_optimizers()])
def test_state_dict_hooks_see_what_torchs_hooks_see(make) -> None:
    """Load pre-hooks get the caller's dict and what they return is loaded; load post-hooks see
    the state as ``load_state_dict`` leaves it; state-dict post-hooks get the finished dict."""
    def stepped():
        opt = make()
        torch.manual_seed(1)
        for _ in range(2):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            opt.step()
        return opt

    source, target = stepped(), stepped()
    saved = source.state_dict()
    seen: dict = {}

    def load_pre(opt, sd):
        seen["pre"] = sd
        return {**sd, "param_groups": [{**g, "lr": 0.125} for g in sd["param_groups"]]}

    def dtypes(opt) -> dict:
        return {(i, k): v.dtype for i, entry in enumerate(opt.state.values()) for k, v in entry.items() if torch.is_tensor(v)}

    target.register_load_state_dict_pre_hook(load_pre)
    target.register_load_state_dict_post_hook(lambda opt: seen.setdefault("post", dtypes(opt)))
    target.load_state_dict(saved)
    assert seen["pre"] == saved and seen["pre"] is not saved  # a shallow copy of the caller's, as torch's
    assert all(g["lr"] == 0.125 for g in target.param_groups)
    assert seen["post"] == dtypes(target)

    target.register_state_dict_post_hook(lambda opt, sd: seen.setdefault("saved", sd))
    target.register_state_dict_post_hook(lambda opt, sd: {"replaced": True})
    final = target.state_dict()
    assert final == {"replaced": True}
    assert seen["saved"].keys() == saved.keys()  # skipped_steps and the like included


ADAFACTOR_SHAPES = [(20, 30), (7,), (), (2, 3, 4)]


@pytest.mark.parametrize(
    ("index", "key"),
    [(0, "row_var"), (0, "col_var"), (1, "variance"), (2, "variance"), (3, "row_var"), (3, "col_var")],
)
def test_adafactor_refuses_an_entry_without_the_moments_its_parameter_needs(index: int, key: str) -> None:
    """torch's Adafactor creates ``row_var`` and ``col_var`` for a parameter of two or more dimensions,
    ``variance`` otherwise: an entry without them loaded, and the next step raised AssertionError after
    counting the step (and, for a vector, after stepping the matrices). Refused at load, nothing changed."""
    gen = torch.Generator().manual_seed(5)
    params = clone_params([torch.randn(s, generator=gen) for s in ADAFACTOR_SHAPES])
    opt = oxoptim.Adafactor(params)
    _train(opt, params, gen, 2)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][index][key]
    before = snapshot(opt)
    with pytest.raises(KeyError, match=rf"state\[{index}\] has no '{key}' entry"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    _train(opt, params, gen, 1)  # still steps from its own state
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_adafactor_refuses_a_moment_of_the_wrong_shape() -> None:
    gen = torch.Generator().manual_seed(6)
    params = clone_params([torch.randn(s, generator=gen) for s in ADAFACTOR_SHAPES])
    opt = oxoptim.Adafactor(params)
    _train(opt, params, gen, 1)
    for index, key, bad in [(0, "row_var", torch.zeros(20)), (0, "col_var", torch.zeros(20, 1)), (1, "variance", torch.zeros(6))]:
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][index][key] = bad
        before = snapshot(opt)
        with pytest.raises(ValueError, match=rf"state\[{index}\]\['{key}'\] has shape"):
            opt.load_state_dict(sd)
        assert_unchanged(opt, before)
