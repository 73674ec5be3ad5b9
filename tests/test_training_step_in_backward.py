"""The training layer's per-stage ``step_in_backward`` and ``accumulate``: equal to the ordinary
loop where the maths says so, hooks gone when a stage or a run ends, checkpoints resume bit for
bit (with previous-norm clipping's state), combinations that cannot be honoured refused at start-up."""

from __future__ import annotations

import re
import signal

import pytest
import torch
import torch.nn.functional as F

from oxoptim.training import Stage, Trainer
from oxoptim.training.config import parse_config, _toml_loads, DEFAULT_CONFIG_TOML
from oxoptim.training.errors import ConfigError
from training_jobs import run_script, synthetic_job


def data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 30, (n, 10), generator=g)
    y = (F.one_hot(x, 30).float().sum(1) @ torch.randn(30, 3, generator=g)).argmax(1)
    return (x[: n - 60], y[: n - 60]), (x[n - 60:], y[n - 60:])


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Flatten(), torch.nn.Linear(80, 32),
                               torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))


def train(stages):
    torch.set_num_threads(1)
    m = model()
    train_data, val_data = data()
    history = Trainer(m, F.cross_entropy, train_data, val_data, stages, run_dir=None, quiet=True).fit()
    return m, history


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def no_hooks(m) -> bool:
    return all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in m.parameters())


@pytest.mark.parametrize("optimizer, kwargs", [("adamw", {"lr": 3e-3}), ("sgd", {"lr": 0.05, "momentum": 0.9}),
                                               ("lion", {"lr": 1e-4}),
                                               ("adamw8bit", {"lr": 3e-3, "min_8bit_size": 64, "param_dtype": "bfloat16",
                                                              "stochastic_rounding": True})])
@pytest.mark.parametrize("accumulate, clip", [(1, None), (3, None), (2, "per_parameter")])
def test_step_in_backward_stage_equals_the_ordinary_loop(optimizer, kwargs, accumulate, clip):
    """Exact gradient accumulation and per-parameter clipping are what the ordinary loop does, so
    the weights after two stages (and every validation record) are bit-identical. The batch of 32
    does not divide the 240 examples: the last batch of each epoch is short (16 examples)."""
    extra = {"grad_clip": 0.5, "grad_clip_mode": clip} if clip else {}

    def stages(inside):
        return [Stage("a", optimizer, epochs=2, batch_size=32, accumulate=accumulate, step_in_backward=inside,
                      lr_schedule="cosine", **kwargs, **extra),
                Stage("b", "adamw", epochs=1, batch_size=20, lr=1e-3, step_in_backward=inside)]

    ordinary, h_ordinary = train(stages(False))
    inside, h_inside = train(stages(True))
    # the updates did run inside backward: it released the last gradients, the ordinary loop kept them
    assert all(p.grad is None for p in inside.parameters())
    assert all(p.grad is not None for p in ordinary.parameters())
    assert same_weights(ordinary, inside)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in h]  # noqa: E731
    assert strip(h_ordinary) == strip(h_inside)
    assert no_hooks(inside)  # each stage's hooks left with the stage


def test_accumulate_is_the_batch_gradient():
    """K micro-batches, each loss weighted by its share, give the batch's mean gradient (up to the
    order of the sums): close to accumulate=1 after training, not bit-identical."""
    one, _ = train([Stage("a", "sgd", epochs=2, batch_size=30, lr=0.1)])
    three, _ = train([Stage("a", "sgd", epochs=2, batch_size=30, lr=0.1, accumulate=3)])
    for p, q in zip(one.parameters(), three.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_optimizer_accumulation_runs_and_differs_from_gradient_accumulation():
    grad, _ = train([Stage("a", "adamw", epochs=1, batch_size=32, lr=3e-3, accumulate=2, step_in_backward=True)])
    opt, hist = train([Stage("a", "adamw", epochs=1, batch_size=32, lr=3e-3, accumulate=2, step_in_backward=True,
                             accumulation="optimizer")])
    assert not same_weights(grad, opt) and hist[-1]["train_loss"] == hist[-1]["train_loss"]


def test_a_short_last_batch_is_a_step_with_fewer_micro_batches():
    """Optimizer accumulation absorbs micro-batches 1..K-1 and steps on the K-th: a last batch of
    one example is a single micro-batch, so it must step (not only be absorbed)."""
    m = model()
    (x, y), val_data = data()
    trainer = Trainer(m, F.cross_entropy, (x[:33], y[:33]), val_data,
                      [Stage("a", "adamw", epochs=1, batch_size=32, lr=1e-2, accumulate=2, step_in_backward=True,
                             accumulation="optimizer")], quiet=True)
    trainer.phase = trainer.make_phase({})
    order = torch.arange(33)
    try:
        trainer.train_step(order, 0)
        state = trainer.phase.optimizer.state
        assert all(float(s["step"]) == 2 for s in state.values())  # two micro-batches of 16
        before = [p.detach().clone() for p in m.parameters()]
        trainer.train_step(order, 1)  # one example
        assert all(float(s["step"]) == 3 for s in state.values())
        assert all(not torch.equal(b, p) for b, p in zip(before, m.parameters()))
    finally:
        trainer._drop_phase()
    assert no_hooks(m)


def test_hooks_are_removed_when_a_run_fails():
    m = model()
    train_data, val_data = data()

    def stop(record):
        raise KeyboardInterrupt  # a pruned trial, Ctrl-C

    trainer = Trainer(m, F.cross_entropy, train_data, val_data,
                      [Stage("a", "adamw", epochs=3, batch_size=32, lr=1e-3, step_in_backward=True)],
                      quiet=True, on_record=stop)
    assert no_hooks(m)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert no_hooks(m)


@pytest.mark.parametrize("settings, message", [
    ({"step_in_backward": True, "grad_clip": 1.0}, "set grad_clip_mode to 'per_parameter' or 'previous_norm'"),
    ({"step_in_backward": True, "adversarial": 1.0}, "cannot take adversarial steps"),
    ({"grad_clip": 1.0, "grad_clip_mode": "previous_norm"}, "'previous_norm' is for step_in_backward stages"),
    ({"step_in_backward": True, "optimizer": "sgd", "accumulate": 2, "accumulation": "optimizer"},
     "defined for Adam and AdamW"),
    ({"step_in_backward": True, "optimizer": "subgradient", "lr": 0.1}, "needs a Rust-backed oxoptim optimizer"),
    ({"accumulate": 100}, "must be <= batch_size"),
    ({"accumulation": "gradients"}, "did you mean 'gradient'"),
    ({"release_rows": True}, "release_rows needs step_in_backward = true"),
    ({"step_in_backward": True, "release_rows": True, "accumulate": 2}, "release_rows cannot be combined"),
    ({"step_in_backward": True, "release_rows": True, "optimizer": "adafactor"}, "elementwise"),
])
def test_refused_at_start_up(settings, message):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [{"name": "s", "optimizer": "adamw", "epochs": 2, "batch_size": 32, "lr": 1e-3, **settings}]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw)


def test_release_rows_stage_equals_the_same_stage_without_it(monkeypatch):
    """A GPT classifier's token embedding updated row block by row block inside backward: the same
    weights and records as step_in_backward alone (an embedding's rows are exact: oxoptim.rows)."""
    import oxoptim.rows
    from oxoptim.training.gpt import GPT, GPTClassifier

    opened = []
    original = oxoptim.rows.RowRelease.open
    monkeypatch.setattr(oxoptim.rows.RowRelease, "open", lambda self: (opened.append(self.weight), original(self))[1])

    def run(release):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        m = GPTClassifier(GPT(30, block=10, layers=1, dim=16, heads=2), num_classes=3)
        train_data, val_data = data()
        stages = [Stage("a", "adamw", epochs=2, batch_size=32, lr=3e-3, step_in_backward=True, release_rows=release),
                  Stage("b", "lion", epochs=1, batch_size=20, lr=1e-4, step_in_backward=True, release_rows=release)]
        history = Trainer(m, F.cross_entropy, train_data, val_data, stages, run_dir=None, quiet=True).fit()
        return m, history

    plain, h_plain = run(False)
    assert not opened
    released, h_released = run(True)
    assert [w is released.body.tok.weight for w in opened] == [True, True]  # one per stage
    assert same_weights(plain, released)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in h]  # noqa: E731
    assert strip(h_plain) == strip(h_released)
    assert no_hooks(released) and not any(id(p) in oxoptim.rows._ACTIVE for p in released.parameters())


def test_release_rows_needs_a_model_that_has_rows_to_release():
    """Refused when the Trainer is made, before an earlier stage trains (it failed at the stage)."""
    stages = [Stage("a", "adamw", epochs=1, batch_size=32, lr=3e-3),
              Stage("b", "adamw", epochs=1, batch_size=32, lr=3e-3, step_in_backward=True, release_rows=True)]
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="release_rows needs a model whose token embedding"):
        Trainer(m, F.cross_entropy, *data(), stages, run_dir=None, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("continued", [False, True], ids=["own optimizer", "continues an 8-bit one"])
def test_sgd8bit_rows_of_a_weight_under_min_8bit_size_are_refused_when_the_trainer_is_made(continued):
    """The released embedding (30 x 16 = 480 elements) would get float state: refused up front,
    with the size that decides it (the first stage of a continue_optimizer chain makes the state)."""
    from oxoptim.training.gpt import GPT, GPTClassifier

    def make(first_min, second_min):
        torch.manual_seed(0)
        m = GPTClassifier(GPT(30, block=10, layers=1, dim=16, heads=2), num_classes=3)
        stages = [Stage("a", "sgd8bit", epochs=1, batch_size=32, lr=0.1, momentum=0.9, min_8bit_size=first_min),
                  Stage("b", "sgd8bit", epochs=1, batch_size=32, lr=0.1, momentum=0.9, min_8bit_size=second_min,
                        step_in_backward=True, release_rows=True, continue_optimizer=continued)]
        return Trainer(m, F.cross_entropy, *data(), stages, run_dir=None, quiet=True)

    with pytest.raises(ValueError, match=r"480 elements, under min_8bit_size = 4096 of stage 'a'" if continued
                       else r"480 elements, under min_8bit_size = 4096 of stage 'b'"):
        make(4096, 4096)
    if continued:  # the chain's first stage keeps 8-bit state for it: accepted whatever b's threshold
        make(256, 4096)
    else:
        make(4096, 256)


JOB = synthetic_job("""[
    Stage("a", "adamw", epochs=3, batch_size=16, lr=3e-3, step_in_backward=True, accumulate=2,
          grad_clip=0.3, grad_clip_mode="previous_norm"),
    Stage("b", "adamw", epochs=3, batch_size=24, lr=1e-3, step_in_backward=True, accumulate=3,
          accumulation="optimizer", grad_clip=0.5, grad_clip_mode="per_parameter"),
]""", vocab=30, n=1400, length=10, n_train=1200)


def _run(tmp_path, run_dir, resume=False, kill=False):
    return run_script(JOB, tmp_path, run_dir, resume=resume, kill_after=0.0 if kill else None, checkpoints_first=3)


@pytest.mark.integration
def test_resume_of_step_in_backward_stages_is_bit_identical(tmp_path):
    """Killed mid-stage with previous-norm clipping (whose last norm is in the checkpoint) and
    resumed: the same weights and records as an uninterrupted run."""
    _run(tmp_path, tmp_path / "ref")
    assert _run(tmp_path, tmp_path / "run", kill=True) == -signal.SIGKILL
    assert not (tmp_path / "run" / "final.pt").exists()
    _run(tmp_path, tmp_path / "run", resume=True)
    ref, got = (torch.load(tmp_path / d / "final.pt") for d in ("ref", "run"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    strip = lambda t: [l.split('"time_s"')[0] for l in t.splitlines()]  # noqa: E731
    assert strip((tmp_path / "ref" / "metrics.jsonl").read_text()) == strip((tmp_path / "run" / "metrics.jsonl").read_text())
