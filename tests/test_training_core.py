"""oxoptim.training: stages switch as configured, adjust rules fire, full-batch = manual full-batch GD."""

import json

import pytest
import torch
import torch.nn.functional as F

import oxoptim
from oxoptim.training import (EarlyStop, NextStageOnPlateau, ReduceLROnPlateau, RestoreBest, Stage, Trainer,
                              Trial, make_rule)
from oxoptim.training.stages import LRSchedule

needs_grad_avg = pytest.mark.skipif(not hasattr(oxoptim, "GradientAverager"), reason="oxoptim.GradientAverager missing")
needs_param_avg = pytest.mark.skipif(not hasattr(oxoptim, "ParamAverager"), reason="oxoptim.ParamAverager missing")
needs_subgradient = pytest.mark.skipif(not hasattr(oxoptim, "Subgradient"), reason="oxoptim.Subgradient missing")


def blobs(n=240, d=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g)).argmax(1)
    k = n * 3 // 4
    return (x[:k], y[:k]), (x[k:], y[k:])


def mlp(seed=0, d=8, c=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, c))


class FakeTrainer:
    def __init__(self):
        self.lr_scale = 1.0
        self.events = []
        self.state = {"w": torch.zeros(1)}
        self.loaded = None

    def log_event(self, msg):
        self.events.append(msg)

    def evaluated_state(self):
        return {k: v.clone() for k, v in self.state.items()}

    def load_model_state(self, s):
        self.loaded = s


def feed(rule, values, key="val_loss"):
    t = FakeTrainer()
    actions = []
    for i, v in enumerate(values):
        t.state["w"] = torch.tensor([float(i)])
        actions.append(rule.on_epoch_end(t, {key: v, "epoch": i + 1}))
    return t, actions


def test_reduce_lr_on_plateau_fires_after_patience():
    t, actions = feed(ReduceLROnPlateau(patience=2, factor=0.5), [1.0, 0.9, 0.95, 0.94, 0.93, 0.8, 0.85, 0.86])
    # bad epochs at 0.95, 0.94 -> reduce (scale 0.5); then 0.93 is bad (best 0.9) -> 1; 0.8 better; 0.85, 0.86 -> reduce
    assert t.lr_scale == pytest.approx(0.25)
    assert actions == [None] * 8
    assert len(t.events) == 2


def test_next_stage_and_early_stop_on_crafted_curves():
    _, a = feed(NextStageOnPlateau(patience=1), [1.0, 0.8, 0.81])
    assert a == [None, None, "next_stage"]
    _, a = feed(EarlyStop(monitor="val_accuracy", patience=2), [0.5, 0.6, 0.6, 0.59], key="val_accuracy")
    assert a == [None, None, None, "stop"]
    _, a = feed(EarlyStop(patience=2, min_delta=0.1), [1.0, 0.95, 0.91])  # improvements below min_delta
    assert a == [None, None, "stop"]


def test_restore_best_restores_best_epoch_weights():
    r = RestoreBest("val_accuracy")
    t, _ = feed(r, [0.5, 0.7, 0.6, 0.65], key="val_accuracy")
    r.on_stage_end(t)
    assert t.loaded["w"].item() == 1.0
    r2 = RestoreBest()
    r2.load_state_dict(r.state_dict())
    t2 = FakeTrainer()
    r2.on_stage_end(t2)
    assert t2.loaded["w"].item() == 1.0


def test_make_rule_from_tables():
    assert isinstance(make_rule({"rule": "early_stop", "patience": 3}), EarlyStop)
    tr = make_rule({"rule": "trial", "candidates": [0.1, 0.01], "epochs": 1})
    assert tr.candidates == [{"lr": 0.1}, {"lr": 0.01}]
    with pytest.raises(ValueError, match="unknown adjust rule"):
        make_rule({"rule": "nope"})


def test_schedules():
    assert LRSchedule("cosine").factor(0, 10) == pytest.approx(1.0)
    assert LRSchedule("cosine").factor(10, 10) == pytest.approx(0.0)
    assert LRSchedule({"name": "linear", "final": 0.1}).factor(5, 10) == pytest.approx(0.55)
    assert LRSchedule(lambda p: 2.0).factor(3, 10) == 2.0


class OptimizerSpy(RestoreBest):
    """Records, at each epoch end, the optimizer the stage runs and its settings."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def on_epoch_end(self, trainer, record):
        opt = trainer.phase.optimizer
        self.seen.append((type(opt), opt.defaults["lr"], opt.defaults.get("momentum")))
        return None


def test_stages_switch_as_configured_and_metrics_logged(tmp_path):
    train, val = blobs()
    seen = []
    stages = [
        Stage("one", "adamw", epochs=2, batch_size=32, lr=1e-2, adjust=[OptimizerSpy(seen)]),
        Stage("two", "sgd", epochs=3, batch_size=16, lr=0.05, momentum=0.9, lr_schedule="cosine",
              adjust=[OptimizerSpy(seen)]),
        Stage("three", oxoptim.Adam, epochs=1, batch_size=64, lr=1e-3, adjust=[OptimizerSpy(seen)]),
    ]
    model = mlp()
    tr = Trainer(model, F.cross_entropy, train, val, stages, run_dir=str(tmp_path), quiet=True)
    untrained = tr.evaluate(val)
    hist = tr.fit()
    assert seen == [(oxoptim.AdamW, 1e-2, None)] * 2 + [(oxoptim.SGD, 0.05, 0.9)] * 3 + [(oxoptim.Adam, 1e-3, None)]
    cos = LRSchedule("cosine")
    assert [r["lr"] for r in hist] == pytest.approx([1e-2, 1e-2] + [0.05 * cos.factor(12 * e + 11, 36) for e in range(3)]
                                                    + [1e-3], rel=1e-12)
    assert [r["stage"] for r in hist] == ["one"] * 2 + ["two"] * 3 + ["three"]
    assert [r["epoch"] for r in hist] == [1, 2, 1, 2, 3, 1]
    spe = [6, 6, 12, 12, 12, 3]  # 180 training rows
    assert [r["step"] for r in hist] == [sum(spe[: i + 1]) for i in range(6)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all("val_accuracy" in x and "val_loss" in x for x in lines)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == 6
    assert hist[-1]["val_loss"] < 0.8 * untrained["loss"]  # it trained


def scripted_metric(values):
    """A validation metric that returns ``values`` in turn (one validation batch per epoch), then
    the last one again (the validation of the final weights after the last epoch)."""
    it = iter(values)

    def score(out, y):
        return next(it, values[-1])

    return score


def test_next_stage_on_plateau_moves_on_and_early_stop_ends(tmp_path):
    train, val = blobs()
    # one validation batch per epoch: the scripted metric is the validation curve
    metric = scripted_metric([0.5, 0.6, 0.55, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3])
    stages = [
        Stage("a", "sgd", epochs=5, batch_size=60, lr=0.01, adjust=[NextStageOnPlateau("val_score", patience=1)]),
        Stage("b", "sgd", epochs=5, batch_size=60, lr=0.01, adjust=[EarlyStop("val_score", patience=2)]),
        Stage("c", "sgd", epochs=5, batch_size=60, lr=0.01),
    ]
    tr = Trainer(mlp(), F.cross_entropy, train, val, stages, metrics={"score": metric}, quiet=True)
    hist = tr.fit()
    assert [r["stage"] for r in hist] == ["a", "a", "a", "b", "b", "b"]
    assert tr.stopped


def test_reduce_lr_rule_changes_the_lr_used(tmp_path):
    train, val = blobs()
    metric = scripted_metric([0.5, 0.4, 0.3, 0.2])
    st = Stage("a", "sgd", epochs=4, batch_size=180, lr=0.1,
               adjust=[ReduceLROnPlateau("val_score", patience=1, factor=0.1)])
    hist = Trainer(mlp(), F.cross_entropy, train, val, [st], metrics={"score": metric}, quiet=True).fit()
    assert [r["lr"] for r in hist] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_trial_picks_best_candidate_and_continues_from_it():
    train, val = blobs()
    st = Stage("t", "sgd", epochs=3, batch_size=30, lr=0.5,
               adjust=[Trial([1e-6, 0.5, 1e-5], epochs=1, monitor="val_loss")])
    model = mlp()
    snapshots = []  # the weights at every forward pass: training steps and validation batches

    def snapshot(module, args):
        snapshots.append((module.training, {k: v.detach().clone() for k, v in module.state_dict().items()}))

    model.register_forward_pre_hook(snapshot)
    tr = Trainer(model, F.cross_entropy, train, val, [st], quiet=True)
    hist = tr.fit()
    # validation after each trial epoch is one forward in eval mode; the first training forward after
    # the third trial's validation starts the main run: from trial 1's (the best's) weights
    evals = [i for i, (training, _) in enumerate(snapshots) if not training]
    after_trial_1, main_start = snapshots[evals[1]][1], snapshots[evals[2] + 1][1]
    for k in after_trial_1:
        assert torch.equal(main_start[k], after_trial_1[k]), k
    start = snapshots[0][1]  # and each trial started from the stage's starting weights
    for i in (evals[0] + 1, evals[1] + 1):
        assert all(torch.equal(snapshots[i][1][k], start[k]) for k in start)
    phases = [r["phase"] for r in hist]
    assert phases[:3] == ["trial 0 {'lr': 1e-06}", "trial 1 {'lr': 0.5}", "trial 2 {'lr': 1e-05}"]
    assert phases[3:] == ["main", "main"]
    assert [r["lr"] for r in hist[3:]] == [0.5, 0.5]
    assert hist[3]["epoch"] == 2
    # trials start from the same weights: the tiny-LR trials give (nearly) the same validation loss
    assert hist[0]["val_loss"] == pytest.approx(hist[2]["val_loss"], abs=1e-3)
    # the main run continues from trial 1's end state: its first epoch improves on it
    assert hist[3]["val_loss"] < hist[1]["val_loss"]


def test_restore_best_in_trainer_puts_back_best_weights():
    train, val = blobs()
    metric = scripted_metric([0.1, 0.9, 0.2, 0.3])
    st = Stage("a", "sgd", epochs=4, batch_size=60, lr=0.1, adjust=[RestoreBest("val_score")])
    model = mlp()
    snap = {}

    class Spy(RestoreBest):
        def on_epoch_end(self, trainer, record):
            snap[record["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            return None

    st.adjust.append(Spy())
    Trainer(model, F.cross_entropy, train, val, [st], metrics={"score": metric}, quiet=True).fit()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[2][k])


@needs_grad_avg
def test_full_batch_stage_equals_manual_full_batch_gd():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(203, 5, generator=g), torch.randn(5, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(203, 1, generator=g)
    torch.manual_seed(0)
    m1 = torch.nn.Linear(5, 1)
    m2 = torch.nn.Linear(5, 1)
    m2.load_state_dict(m1.state_dict())
    st = Stage("fb", "sgd", epochs=6, batch_size="full", micro_batch=17, lr=0.1, momentum=0.5)
    hist = Trainer(m1, F.mse_loss, (x, y), (x, y), [st], metrics={}, quiet=True).fit()
    opt = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.5)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.mse_loss(m2(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5, 6]
    # an epoch's train_loss is the exact full-batch loss at the weights it stepped from
    assert [r["train_loss"] for r in hist] == pytest.approx(losses, rel=1e-5)


@needs_param_avg
def test_averaging_stage_validates_and_ends_with_averaged_weights():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    train, val = blobs()
    st = Stage("avg", "sgd", epochs=3, batch_size=30, lr=0.1, average="swa", average_start_epoch=1)
    model = mlp()
    iterates = []  # the weights after every optimizer step
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: iterates.append([p.detach().clone() for p in model.parameters()]))
    try:
        tr = Trainer(model, F.cross_entropy, train, val, [st], quiet=True)
        hist = tr.fit()
    finally:
        handle.remove()
    assert len(iterates) == 18  # 3 epochs of 180 rows / 30
    swa = [torch.stack([w[i] for w in iterates[6:]]).mean(0) for i in range(len(iterates[0]))]  # from epoch 2
    for p, want in zip(model.parameters(), swa):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b) for a, b in zip(swa, iterates[-1]))  # averaging changed something
    # validation of the last epoch used the averaged weights, which the model now holds
    assert tr.evaluate(val)["loss"] == pytest.approx(hist[-1]["val_loss"], rel=1e-5)


@needs_subgradient
def test_subgradient_stage_equals_manual_subgradient_steps():
    train, val = blobs()
    best = []

    class BestSpy(RestoreBest):
        def on_epoch_end(self, trainer, record):
            best.append(trainer.phase.optimizer.best_step)
            return None

    st = Stage("sub", "subgradient", epochs=3, batch_size="full", lr=0.05, step_rule="sqrt", adjust=[BestSpy()])
    model, ref = mlp(), mlp()
    hist = Trainer(model, F.cross_entropy, train, val, [st], quiet=True).fit()
    opt = oxoptim.Subgradient(ref.parameters(), lr=0.05, step_rule="sqrt")
    ref_best = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(ref(train[0]), train[1])
        loss.backward()
        opt.record_loss(loss.item())
        opt.step()
        ref_best.append(opt.best_step)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(hist) == 3
    assert best == ref_best and None not in best  # the trainer gave the optimizer each step's loss


@pytest.mark.parametrize("name", ["adamw_schedulefree", "sgd_schedulefree"])
def test_schedule_free_stage_evaluates_the_average_and_ends_on_it(name):
    """The trainer calls Schedule-Free's eval() around validation (training resumes from the
    exact y) and leaves the average x in the model: equal to a hand-written loop."""
    train, val = blobs()
    kw = dict(lr=0.02, warmup_steps=3) if name == "adamw_schedulefree" else dict(lr=0.2, warmup_steps=3)
    st = Stage("sf", optimizer=name, epochs=3, batch_size=30, lr_schedule="constant", **kw)
    model = mlp()
    hist = Trainer(model, F.cross_entropy, train, val, [st], metrics={}, quiet=True, seed=0).fit()

    manual = mlp()
    cls = oxoptim.AdamWScheduleFree if name == "adamw_schedulefree" else oxoptim.SGDScheduleFree
    opt = cls(manual.parameters(), **kw)
    opt.train()
    from oxoptim.training.batching import epoch_order

    losses = []
    x, y = train
    for epoch in range(3):
        order = epoch_order(0, epoch, len(x), 30, None, 0, None)
        for b in range(len(x) // 30):
            idx = order[b * 30:(b + 1) * 30]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(manual(x[idx]), y[idx]).backward()
            opt.step()
        y_weights = [p.detach().clone() for p in manual.parameters()]
        opt.eval()
        with torch.no_grad():
            losses.append(F.cross_entropy(manual(val[0]), val[1]).item())
        opt.train()
        with torch.no_grad():
            for p, w in zip(manual.parameters(), y_weights):
                p.copy_(w)
    opt.eval()
    assert [h["val_loss"] for h in hist] == pytest.approx(losses, rel=0, abs=0)
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.equal(a, b)


# ----- a Trial's winner, divergence, the final summary -------------------------------------------

def dropout_mlp(seed=0, d=8, c=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, c))


def test_trial_continues_from_the_winner_whatever_ran_after_it():
    """The main run continues from the winning candidate's weights, optimizer, RNG state and data
    order: candidates that lost after it (here a third one) change nothing (a dropout model draws
    from the RNG at every step)."""
    train, val = blobs()

    def run(candidates):
        st = Stage("s", "adamw", epochs=3, batch_size=32, lr=1e-2,
                   adjust=[Trial(candidates, epochs=1, monitor="val_loss")])
        model = dropout_mlp()
        tr = Trainer(model, F.cross_entropy, train, val, [st], quiet=True, seed=0)
        hist = tr.fit()
        return tr.run.events, model.state_dict(), [r for r in hist if r["phase"] == "main"]

    e2, w2, main2 = run([1e-2, 1e-7])
    e3, w3, main3 = run([1e-2, 1e-7, 1e-7])
    assert e2 == e3 and "{'lr': 0.01}" in e2[0]  # the same winner
    assert [r["val_loss"] for r in main2] == [r["val_loss"] for r in main3]
    for k in w2:
        assert torch.equal(w2[k], w3[k]), k


def test_divergent_training_stops_with_nonfinite_loss_and_can_resume(tmp_path):
    """A stage whose loss goes NaN stops the run with NonFiniteLoss at the end of that epoch: no
    NaN record, no summary.json or final.pt, no checkpoint of diverged weights; the run resumes
    from its last good checkpoint (and, its settings unchanged, stops there again)."""
    from oxoptim.training.checkpoint import list_checkpoints, load_checkpoint
    from oxoptim.training.errors import ConfigError
    from oxoptim.training.trainer import NonFiniteLoss

    train, val = blobs()
    stages = [Stage("good", "sgd", epochs=2, batch_size=30, lr=0.05),
              Stage("bad", "sgd", epochs=2, batch_size=30, lr=1e38)]

    def trainer():
        return Trainer(mlp(), F.cross_entropy, train, val, stages, run_dir=str(tmp_path), quiet=True,
                       checkpoint_every=3)

    with pytest.raises(NonFiniteLoss, match=r"training diverged in stage 'bad' epoch 1.*training loss is (nan|inf)") as e:
        trainer().fit()
    assert isinstance(e.value, ConfigError)  # `oxoptim train`: one line, exit status 2
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["good", "good"]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "final.pt").exists()
    for path in list_checkpoints(str(tmp_path)):
        s = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in s["model"].values()), path
    latest = load_checkpoint(list_checkpoints(str(tmp_path))[0])
    assert latest["pos"]["stage"] == 1 and latest["global_step"] >= 12  # the good stage's 12 steps are kept
    tr = trainer()
    with pytest.raises(NonFiniteLoss, match="stage 'bad' epoch 1"):
        tr.fit(resume=True)
    assert len(tr.history) == 2  # resumed: the good stage was not run again
    assert not (tmp_path / "summary.json").exists()


def test_nonfinite_loss_from_the_cli_is_one_line(tmp_path, capsys):
    from oxoptim.__main__ import main
    from training_jobs import TINY_DATA, reviews, write_rows

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text("seed = 1\nthreads = 1\n" + TINY_DATA.format(train="reviews.jsonl").replace(
        'text_column = "review"\nlabel_column = "stars"\n', "") + """
[model]
embed_dim = 8
hidden = 8

[[stages]]
name = "a"
epochs = 2
batch_size = 16
lr = 1e30
""")
    capsys.readouterr()
    rc = main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("oxoptim train: error: training diverged"), err
    assert "test accuracy" not in out and not (tmp_path / "run" / "summary.json").exists()


def test_a_diverging_trial_candidate_drops_out():
    from oxoptim.training.trainer import NonFiniteLoss

    train, val = blobs()
    st = Stage("s", "sgd", epochs=3, batch_size=30, lr=0.05, adjust=[Trial([1e38, 0.05, 3e38], epochs=1)])
    tr = Trainer(mlp(), F.cross_entropy, train, val, [st], quiet=True)
    hist = tr.fit()
    assert [r["phase"] for r in hist] == ["trial 1 {'lr': 0.05}", "main", "main"]
    assert tr.run.stage.chosen == {} and any("trial chose {'lr': 0.05}" in e for e in tr.run.events)
    assert sum("dropped out" in e for e in tr.run.events) == 2
    st = Stage("s", "sgd", epochs=3, batch_size=30, lr=0.05, adjust=[Trial([1e38, 3e38], epochs=1)])
    with pytest.raises(NonFiniteLoss, match="every trial candidate diverged"):
        Trainer(mlp(), F.cross_entropy, train, val, [st], quiet=True).fit()


def test_summary_final_describes_the_restored_weights(tmp_path):
    """After RestoreBest in the last stage, summary.json's "final" is the validation of the weights
    in final.pt (the restored epoch's), and the restore is logged at the stage's last epoch."""
    train, val = blobs()
    st = Stage("a", "sgd", epochs=4, batch_size=30, lr=2.0, adjust=[RestoreBest("val_loss")])
    model = mlp()
    tr = Trainer(model, F.cross_entropy, train, val, [st], run_dir=str(tmp_path), quiet=True)
    hist = tr.fit()
    s = json.loads((tmp_path / "summary.json").read_text())
    best = min(hist, key=lambda r: r["val_loss"])
    assert best is not hist[-1], "the job must restore an earlier epoch"
    truth = tr.evaluate(val)
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    assert tr.evaluate(val) == truth
    assert s["final"] == {"val_loss": truth["loss"], "val_accuracy": truth["accuracy"],
                          "train_loss": best["train_loss"], "global_epoch": best["global_epoch"]}
    assert s["final"]["val_loss"] == best["val_loss"]
    assert s["events"] == [f"[a e4] restored best val_loss={best['val_loss']:.4g} from stage epoch {best['epoch']}"]



def _blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return (x[:180], y[:180]), (x[180:], y[180:])


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


# Optimizers whose optimizer-wide state lives in the parameter groups: Prodigy's d, d_max,
# d_numerator, k; Schedule-Free's k, weight_sum, lr_max; bf16 stochastic rounding's sr_seed, sr_count;
# or in the state dict beside them: Subgradient's step count, which its step sizes decay with.
GROUP_STATE = [("prodigy", dict(lr=1.0)), ("adamw_schedulefree", dict(lr=0.02)), ("sgd_schedulefree", dict(lr=0.2)),
               ("adamw", dict(lr=1e-2, param_dtype="bfloat16", stochastic_rounding=True)),
               ("subgradient", dict(lr=0.05, step_rule="sqrt"))]


@pytest.mark.parametrize("name,kw", GROUP_STATE, ids=[n + ("_bf16_sr" if "param_dtype" in k else "") for n, k in GROUP_STATE])
def test_continue_optimizer_carries_the_state_kept_in_the_parameter_groups(name, kw):
    """Two stages of 2 epochs, the second continuing the optimizer, train exactly as one stage of 4
    epochs: the optimizer state kept in the groups carries over (not only the per-parameter state),
    and a Schedule-Free stage continues from the gradient points y it trained on, not from y
    recomputed from x and z."""
    assert_two_stages_train_as_one(name, kw)


def test_continue_optimizer_carries_the_previous_gradient_norm_of_step_in_backward():
    """ClipPreviousNorm clips by the previous iteration's norm, which step_in_backward keeps: a
    continued stage's first iteration is clipped by the previous stage's last norm, as one stage's is."""
    assert_two_stages_train_as_one("adamw", dict(lr=1e-2, step_in_backward=True, grad_clip=0.05,
                                                 grad_clip_mode="previous_norm"))


def assert_two_stages_train_as_one(name, kw):
    """Two stages of 2 epochs, the second continuing the optimizer, against one stage of 4: the same
    validation losses and weights, bit for bit."""
    train, val = _blobs()
    one = [Stage("a", name, epochs=4, batch_size=30, lr_schedule="constant", **kw)]
    two = [Stage("a", name, epochs=2, batch_size=30, lr_schedule="constant", **kw),
           Stage("b", name, epochs=2, batch_size=30, lr_schedule="constant", continue_optimizer=True, **kw)]
    models, hists = [], []
    for stages in (one, two):
        m = _mlp()
        hists.append([r["val_loss"] for r in Trainer(m, F.cross_entropy, train, val, stages, metrics={}, quiet=True,
                                                     seed=0).fit()])
        models.append(m)
    assert hists[0] == hists[1]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


class _Killed(Exception):
    pass


def _continued_run(run_dir, name, kw, kill_at=None, resume=False):
    class Dies(Trainer):
        def train_step(self, order, b):
            if self.global_step == kill_at:
                raise _Killed
            return super().train_step(order, b)

    train, val = _blobs()
    stages = [Stage("a", name, epochs=2, batch_size=30, lr_schedule="constant", **kw),
              Stage("b", name, epochs=2, batch_size=30, lr_schedule="cosine", continue_optimizer=True, **kw)]
    m = _mlp()
    Dies(m, F.cross_entropy, train, val, stages, metrics={}, quiet=True, seed=0, run_dir=str(run_dir),
         checkpoint_every=4).fit(resume=resume)
    return m


@pytest.mark.parametrize("kill_at", [12, 15])  # the first step of stage b (after the boundary checkpoint); mid-stage b
@pytest.mark.parametrize("name,kw", GROUP_STATE[:2] + GROUP_STATE[-1:])
def test_resume_of_a_continued_stage_is_bit_identical(tmp_path, name, kw, kill_at):
    """A run killed in a continue_optimizer stage resumes bit for bit, from the checkpoint at the
    stage boundary (which holds the carried state) or from one inside the continued stage."""
    ref = _continued_run(tmp_path / "ref", name, kw)
    with pytest.raises(_Killed):
        _continued_run(tmp_path / "run", name, kw, kill_at=kill_at)
    got = _continued_run(tmp_path / "run", name, kw, resume=True)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


def test_the_carried_state_is_dropped_once_the_continued_stage_has_its_optimizer(tmp_path):
    """Checkpoints at the stage boundary hold the carried state (what a resume there continues
    from); those inside the continued stage do not: its optimizer holds it (a copy would double
    the optimizer's memory and each checkpoint's size for the whole stage)."""
    carried = {}

    class Records(Trainer):
        def checkpoint(self):
            p = self.run.pos
            carried[(p.stage, p.epoch, p.batch)] = self.run.carried is not None
            super().checkpoint()

    train, val = _blobs()
    stages = [Stage("a", "adamw", epochs=2, batch_size=30, lr_schedule="constant"),
              Stage("b", "adamw", epochs=2, batch_size=30, lr_schedule="cosine", continue_optimizer=True)]
    Records(_mlp(), F.cross_entropy, train, val, stages, metrics={}, quiet=True, seed=0, run_dir=str(tmp_path / "run"),
            checkpoint_every=4).fit()
    boundary = [k for k in carried if k[0] == 1 and k[1:] == (0, 0)]
    inside = [k for k in carried if k[0] == 1 and k[1:] != (0, 0)]
    assert boundary and inside, carried
    assert all(carried[k] for k in boundary) and not any(carried[k] for k in inside), carried


def test_an_optimizer_that_refuses_per_layer_lrs_is_refused_before_anything_trains():
    """A stage whose layer_lr_decay gives the layer groups different LRs, with an optimizer that
    refuses them at its first step (Prodigy), is refused when the stage is made (a ValueError, and a
    one-line config error), not after the earlier stages have trained. With one LR, or with an
    optimizer that takes per-group LRs, the stage is accepted."""
    from oxoptim.training.config import ConfigError, check_stages

    with pytest.raises(ValueError, match="stage 'p': layer_lr_decay = 0.5 gives each layer group its own LR, "
                                         "which prodigy refuses: RuntimeError: Setting different lr values"):
        Stage("p", "prodigy", epochs=2, lr=1.0, layer_lr_decay=0.5)
    with pytest.raises(ConfigError, match="stage 'p': layer_lr_decay = 0.5 .* prodigy refuses") as e:
        check_stages([{"name": "warm", "optimizer": "adamw", "lr": 1e-2},
                      {"name": "p", "optimizer": "prodigy", "lr": 1.0, "layer_lr_decay": 0.5}], {})
    assert "\n" not in str(e.value)
    Stage("p", "prodigy", epochs=2, lr=1.0)
    Stage("p", "prodigy", epochs=2, lr=1.0, layer_lr_decay=0.5, trainable="head")  # one group trains
    for name in ("adamw", "sgd", "adamw_schedulefree", "adam8bit"):
        Stage("s", name, epochs=2, lr=1e-2, layer_lr_decay=0.5)


@pytest.mark.parametrize("name", ["sgd_schedulefree", "adamw_schedulefree"])
@pytest.mark.parametrize("average", ["ema", "swa"])
def test_schedule_free_with_average_is_refused(name, average):
    """An averager over a Schedule-Free stage would average the gradient points y the parameters
    hold while training, never Schedule-Free's own average x: refused when the stage is made (and
    as a one-line config error), instead of validating and ending the stage on averages of y."""
    from oxoptim.training.config import ConfigError, check_stages

    with pytest.raises(ValueError, match=f"stage 'sf': average = '{average}' cannot be used with {name}, a "
                                         "Schedule-Free optimizer"):
        Stage("sf", name, epochs=2, lr=0.1, average=average)
    with pytest.raises(ConfigError, match="average = .* Schedule-Free") as e:
        check_stages([{"name": "sf", "optimizer": name, "lr": 0.1, "average": average}], {})
    assert "\n" not in str(e.value)
    Stage("sf", name, epochs=2, lr=0.1)
    Stage("a", "adamw", epochs=2, lr=0.1, average=average)


def test_continue_optimizer_compares_optimizers_not_their_spelling():
    """``"adamw"``, ``"AdamW"`` and the class are one optimizer (it was refused); another is refused."""
    import oxoptim
    from oxoptim.training.stages import check_continuation

    first = Stage("a", "adamw", epochs=1, batch_size=2, lr=1e-3)
    for spelling in ("AdamW", oxoptim.AdamW):
        check_continuation(first, Stage("b", spelling, epochs=1, batch_size=2, lr=1e-3, continue_optimizer=True))
    with pytest.raises(ValueError, match="continue_optimizer needs the previous stage's optimizer \\('adamw'\\), not 'sgd'"):
        check_continuation(first, Stage("b", "sgd", epochs=1, batch_size=2, lr=1e-3, continue_optimizer=True))


def test_epoch_order_takes_every_seed_torch_takes():
    """seed * 1_000_003 left torch's seed range for seeds >= ~1.8e13 (a date-time seed such as
    20240101123456): the first epoch raised an OverflowError traceback after the run had written its
    config.json. Seeds that worked keep their order."""
    from oxoptim.training.batching import epoch_order

    for seed in (20240101123456, 2**64 - 1, -2**63):
        order = epoch_order(seed, 3, 50, 10)
        assert sorted(order.tolist()) == list(range(50))
    g = torch.Generator()
    g.manual_seed(7 * 1_000_003 + 2)
    assert torch.equal(epoch_order(7, 2, 50, 10), torch.randperm(50, generator=g))


def test_trainer_refuses_a_seed_torch_cannot_take():
    model = torch.nn.Linear(2, 2)
    data = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="seed"):
        Trainer(model, F.cross_entropy, data, data, [Stage("s", optimizer="sgd", lr=0.1)], seed=2**64, quiet=True)


@pytest.mark.parametrize("kw, fragment", [
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(checkpoint_every=-1), "checkpoint_every must be >= 0"),
    (dict(bucket=-3), "bucket must be >= 0"),
    (dict(eval_batch_size=2.5), "eval_batch_size must be an integer"),
])
def test_trainer_refuses_bad_settings_before_writing(tmp_path, kw, fragment):
    """eval_batch_size=0 was accepted and raised range()'s error at the first validation, after
    metrics.jsonl was written."""
    model = torch.nn.Linear(2, 2)
    data = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=fragment):
        Trainer(model, F.cross_entropy, data, data, [Stage("s", optimizer="sgd", lr=0.1)], quiet=True,
                run_dir=str(tmp_path / "run"), **kw)
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_stages_that_are_not_stages(tmp_path):
    """A TOML table handed over as it is raised an AttributeError from deep inside."""
    model = torch.nn.Linear(2, 2)
    data = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="stages must be oxoptim.training.Stage objects.*got dict"):
        Trainer(model, F.cross_entropy, data, data, [{"name": "s", "optimizer": "sgd", "lr": 0.1}], quiet=True,
                run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
