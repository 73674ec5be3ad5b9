"""state_dict interchange with torch.optim, both ways, mid-training."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from optimizers import TOLERANCE, TWIN_IDS, TWINS, Twin, clone_params, set_grads

def _train(opt, params, gen, steps):
    for _ in range(steps):
        set_grads(gen, params)
        opt.step()


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_moves_between_libraries_mid_training(twin: Twin, direction: str) -> None:
    make_src, make_dst = (twin.ours, twin.make_theirs) if direction == "ours_to_torch" else (twin.make_theirs, twin.ours)
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

    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _train(src, params, gen_a, 10)
    _train(dst, continued, gen_b, 10)
    for a, b in zip(params, continued):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    for pa, pb in zip(params, continued):
        for key in src.state[pa]:
            torch.testing.assert_close(src.state[pa][key], dst.state[pb][key], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_state_dict_layout_is_torchs(twin: Twin) -> None:
    gen = torch.Generator().manual_seed(2)
    mine = clone_params([torch.randn(5, generator=gen)])
    ref = clone_params(mine)
    ours, theirs = twin.ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
    set_grads(gen, mine, ref)
    ours.step()
    theirs.step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key in a["state"][k]:
            assert a["state"][k][key].dtype == b["state"][k][key].dtype
            assert a["state"][k][key].shape == b["state"][k][key].shape
    strip = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]  # noqa: E731
    assert strip(a["param_groups"]) == strip(b["param_groups"])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_deepcopy_and_pickle_keep_working(twin: Twin) -> None:
    params = clone_params([torch.randn(3)])
    opt = twin.ours(params, **twin.typical)
    params[0].grad = torch.ones(3)
    opt.step()
    clone = copy.deepcopy(opt)
    assert type(clone) is type(opt)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.step()
