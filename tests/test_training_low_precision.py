"""Stages in low precision: ``param_dtype = "bfloat16"`` and ``stochastic_rounding = true``
from TOML to a trained model whose weights stayed bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oxoptim
from oxoptim.training import Stage, Trainer
from oxoptim.training.config import load_config
from oxoptim.training.stages import build_optimizer

JOB = """
[[stages]]
name = "low"
optimizer = "{optimizer}"
epochs = 2
batch_size = 32
lr = 1e-2
param_dtype = "bfloat16"
stochastic_rounding = true
{extra}
"""


def blobs(n: int = 240, d: int = 8, c: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g)).argmax(1)
    return (x[:180], y[:180]), (x[180:], y[180:])


def train_blobs(stage: Stage):
    """A small MLP trained on the blobs by one stage: (model, trainer, validation loss before, history)."""
    train, val = blobs()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    trainer = Trainer(model, F.cross_entropy, train, val, [stage], quiet=True)
    before = trainer.evaluate(val)["loss"]
    return model, trainer, before, trainer.fit()


@pytest.mark.parametrize("optimizer, extra", [("adamw", ""), ("adamw8bit", ""), ("sgd", ""), ("sgd8bit", "momentum = 0.9\nmin_8bit_size = 64")])
def test_a_bfloat16_stage_from_toml_trains_with_stochastic_rounding(tmp_path, optimizer: str, extra: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(optimizer=optimizer, extra=extra))
    stage = Stage(**load_config(str(path))["stages"][0])
    assert stage.param_dtype == "bfloat16" and stage.stochastic_rounding
    assert "bfloat16 weights with stochastic rounding" in stage.describe()
    model, trainer, before, history = train_blobs(stage)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = trainer.phase.optimizer if trainer.phase is not None else None
    if opt is not None:
        assert all(g.get("bf16_stochastic_round") and g["sr_count"] > 0 for g in opt.param_groups)
    assert history[-1]["val_loss"] < before  # it learned, in bfloat16, with float32 losses
    assert isinstance(history[-1]["val_loss"], float)


def test_stochastic_rounding_needs_an_optimizer_that_does_it() -> None:
    with pytest.raises(ValueError, match="needs an optimizer that rounds stochastically: adadelta, adagrad, adam, adam8bit"):
        Stage("s", "subgradient", param_dtype="bfloat16", stochastic_rounding=True)
    Stage("s", "lion", param_dtype="bfloat16", stochastic_rounding=True)  # every Rust twin rounds stochastically
    with pytest.raises(ValueError, match="stochastic_rounding must be true or false"):
        Stage("s", "adamw", param_dtype="bfloat16", stochastic_rounding="yes")
    # Without stochastic rounding any optimizer trains bfloat16 weights (rounded to nearest).
    assert Stage("s", "lion", param_dtype="bfloat16").rounding_kwargs() == {}
    assert oxoptim.AdamW is not None


STATE_JOB = """
[[stages]]
name = "small state"
optimizer = "{optimizer}"
epochs = 2
batch_size = 32
lr = 1e-2
state_dtype = "bfloat16"
"""


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_stage_from_toml_keeps_bfloat16_optimizer_state(tmp_path, optimizer: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(STATE_JOB.format(optimizer=optimizer) + ("momentum = 0.9\n" if optimizer == "sgd" else ""))
    stage = Stage(**load_config(str(path))["stages"][0])
    assert stage.state_dtype == "bfloat16" and stage.param_dtype is None
    assert "bfloat16 optimizer state" in stage.describe()
    assert stage.rounding_kwargs() == {"state_dtype": torch.bfloat16}
    # The optimizer the stage builds keeps bfloat16 state for float32 weights.
    w = torch.nn.Parameter(torch.randn(300))
    opt = build_optimizer(stage, [w])
    w.grad = torch.randn(300)
    opt.step()
    tensors = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.numel() == 300]
    assert tensors and all(v.dtype == torch.bfloat16 for v in tensors) and w.dtype == torch.float32
    # And a model trains with it.
    model, trainer, before, history = train_blobs(stage)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["val_loss"] < before


def test_state_dtype_is_checked_when_the_stage_is_made() -> None:
    with pytest.raises(ValueError, match="state_dtype"):
        Stage("s", "adamw", state_dtype="float16")
    with pytest.raises(ValueError, match='state_dtype = "bfloat16" needs an optimizer that keeps bfloat16 state: adadelta, adagrad, adam, adamax'):
        Stage("s", "adamw8bit", state_dtype="bfloat16")
    with pytest.raises(ValueError, match="keeps bfloat16 state"):
        Stage("s", "adafactor", state_dtype="bfloat16")
    assert Stage("s", "lion", state_dtype="bfloat16").rounding_kwargs() == {"state_dtype": torch.bfloat16}
    # float32 state is every optimizer's default: nothing is passed.
    assert Stage("s", "adamw8bit", state_dtype="float32").rounding_kwargs() == {}
    # ...for float32 weights: bfloat16 weights get state of their dtype, never float32.
    with pytest.raises(ValueError, match='no optimizer keeps float32 state for bfloat16 weights'):
        Stage("s", "adamw", param_dtype="bfloat16", state_dtype="float32")
    both = Stage("s", "adamw", param_dtype="bfloat16", stochastic_rounding=True, state_dtype="bfloat16")
    assert both.rounding_kwargs() == {"bf16_stochastic_round": True, "state_dtype": torch.bfloat16}


def test_a_stage_needing_bfloat16_weights_without_param_dtype_is_told_to_state_it() -> None:
    """Its settings are checked on float32 stand-ins: the refusal says what to write."""
    with pytest.raises(ValueError, match='set param_dtype = "bfloat16" in this stage'):
        Stage(name="b", epochs=1, optimizer="adamw", kahan_sum=True)
    Stage(name="b", epochs=1, optimizer="adamw", kahan_sum=True, param_dtype="bfloat16")
    with pytest.raises(ValueError) as info:
        Stage(name="b", epochs=1, optimizer="adamw", kahan_sum=True, param_dtype="float32")
    assert "set param_dtype" not in str(info.value)  # it chose float32 weights


AUTOCAST_JOB = """
[[stages]]
name = "mixed"
optimizer = "adamw"
epochs = 1
batch_size = 60
lr = 1e-2
autocast = "bfloat16"
"""


class Recorder(torch.nn.Module):
    """The blobs MLP, recording whether each forward ran under CPU autocast, training or not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.dtype))
        return out


def train_recorder(stage: Stage):
    train, val = blobs()
    torch.manual_seed(0)
    model = Recorder()
    history = Trainer(model, F.cross_entropy, train, val, [stage], quiet=True).fit()
    return model, history


def test_an_autocast_stage_from_toml_trains_in_mixed_precision(tmp_path) -> None:
    """``autocast = "bfloat16"``: each training forward runs under CPU autocast (bfloat16 outputs),
    evaluation does not; weights and gradients stay float32, losses float32; the result differs
    from the same stage in float32."""
    path = tmp_path / "job.toml"
    path.write_text(AUTOCAST_JOB)
    stage = Stage(**load_config(str(path))["stages"][0])
    assert stage.autocast == "bfloat16" and "autocast to bfloat16" in stage.describe()
    model, history = train_recorder(stage)
    training = [s for s in model.seen if s[0]]
    evaluating = [s for s in model.seen if not s[0]]
    assert len(training) == 3 and all(s[1:] == (True, torch.bfloat16) for s in training)  # 180 examples, batch 60
    assert evaluating and all(s[1:] == (False, torch.float32) for s in evaluating)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(history[-1]["val_loss"], float)
    plain, _ = train_recorder(Stage(**{**load_config(str(path))["stages"][0], "autocast": None}))
    assert all(s[1:] == (False, torch.float32) for s in plain.seen)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_autocast_is_checked_when_the_stage_is_made() -> None:
    with pytest.raises(ValueError, match=r"unknown autocast 'float16' .*; valid: bfloat16 \(or unset\)"):
        Stage("s", "adamw", autocast="float16")
    with pytest.raises(ValueError, match="weights compute in bfloat16 already"):
        Stage("s", "adamw", autocast="bfloat16", param_dtype="bfloat16")
    with pytest.raises(ValueError, match="autocast cannot be combined with release_rows"):
        Stage("s", "adamw", autocast="bfloat16", step_in_backward=True, release_rows=True)
    # A resume checks it (a checkpoint's stage settings), and runs saved before it existed read the same.
    assert "autocast" in Stage("s", "adamw", autocast="bfloat16").settings()
    assert "autocast" not in Stage("s", "adamw").settings()
    # Unset, the stage enters no autocast context of its own: one the caller entered holds.
    plain = Stage("s", "adamw")
    assert plain.autocast is None
    with torch.autocast("cpu", dtype=torch.bfloat16), plain.mixed_precision():
        assert torch.is_autocast_enabled("cpu")
