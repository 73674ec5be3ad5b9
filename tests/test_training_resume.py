"""oxoptim.training: kill -9 mid-run then --resume is bit-identical; corrupt checkpoints are detected."""

import os
import signal
import sys

import pytest
import torch

from oxoptim.training.checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from training_jobs import run_script, synthetic_job

pytestmark = pytest.mark.integration  # whole jobs in subprocesses

# A small job with dropout (RNG), a trial, adversarial embedding steps, plateau rules, restore-best
# and three optimizers (Schedule-Free's train/eval switch around validation and checkpoints).
JOB = synthetic_job("""[
    Stage("a", "adamw", epochs=4, batch_size=16, lr=3e-3, lr_schedule="cosine", adversarial=0.5,
          adjust=[Trial([1e-3, 3e-3], epochs=1), RestoreBest("val_accuracy")]),
    Stage("b", "sgd", epochs=5, batch_size=8, lr=0.02, momentum=0.9,
          adjust=[ReduceLROnPlateau(patience=1), EarlyStop(patience=3)]),
    Stage("c", "adamw_schedulefree", epochs=2, batch_size=16, lr=2e-3, warmup_steps=20),
]""")


def run_job(tmp_path, run_dir, resume=False, kill_after=None):
    return run_script(JOB, tmp_path, run_dir, resume=resume, kill_after=kill_after)


def final_params(run_dir):
    return torch.load(os.path.join(run_dir, "final.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run_job(tmp, tmp / "run")
    return final_params(tmp / "run"), (tmp / "run" / "metrics.jsonl").read_text()


def strip_times(text):
    import json

    return [{k: v for k, v in json.loads(l).items() if k not in ("time_s", "samples_per_s")} for l in text.splitlines()]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """One run killed with SIGKILL mid-way (shared: each test resumes its own copy of it)."""
    tmp = tmp_path_factory.mktemp("killed")
    rc = run_job(tmp, tmp / "run", kill_after=0.3)
    return tmp / "run", rc


def copy_killed(killed, tmp_path):
    import shutil

    src, rc = killed
    # The kill lands once two checkpoints exist, with most of the job left to run.
    assert rc == -signal.SIGKILL, f"the job was not killed mid-run (exit code {rc})"
    assert not (src / "final.pt").exists(), "run was killed before finishing"
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run


def test_resume_after_kill_is_bit_identical(tmp_path, reference, killed):
    ref, ref_metrics = reference
    run = copy_killed(killed, tmp_path)
    assert list_checkpoints(str(run))
    run_job(tmp_path, run, resume=True)
    got = final_params(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert strip_times((run / "metrics.jsonl").read_text()) == strip_times(ref_metrics)


def test_resume_twice_with_corrupt_latest_checkpoint(tmp_path, reference, killed, capfd):
    ref, _ = reference
    run = copy_killed(killed, tmp_path)
    ckpts = list_checkpoints(str(run))
    assert len(ckpts) >= 2, "the killed run must have left two checkpoints"
    with open(ckpts[0], "r+b") as f:  # flip a byte in the newest checkpoint's payload
        f.seek(-10, os.SEEK_END)
        b = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    run_job(tmp_path, run, resume=True)
    err = capfd.readouterr().err
    assert "checksum mismatch" in err and "previous good checkpoint" in err
    got = final_params(run)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_checkpoint_checksum_partial_and_fallback(tmp_path):
    d = str(tmp_path)
    save_checkpoint(d, 1, {"a": torch.arange(5)})
    p2 = save_checkpoint(d, 2, {"a": torch.arange(6)})
    assert load_checkpoint(p2)["a"].numel() == 6
    data = open(p2, "rb").read()
    open(p2, "wb").write(data[: len(data) // 2])  # a partial write
    with pytest.raises(CheckpointError, match="partial"):
        load_checkpoint(p2)
    msgs = []
    path, state = latest_good_checkpoint(d, warn=msgs.append)
    assert state["a"].numel() == 5 and path.endswith("ckpt-0000000001.pt")
    assert any("partial" in m for m in msgs) and any("previous good" in m for m in msgs)
    open(path, "wb").write(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_good_checkpoint(d, warn=msgs.append)
    # no leftover temp files from the atomic writes; only the newest `keep` are kept
    for i in range(3, 8):
        save_checkpoint(d, i, {"i": i}, keep=3)
    names = sorted(os.listdir(os.path.join(d, "checkpoints")))
    assert names == ["ckpt-0000000005.pt", "ckpt-0000000006.pt", "ckpt-0000000007.pt"]


# ----- through the CLI: a run killed before its first checkpoint ------------------------------

from training_jobs import assert_same_run, reviews, run_cli, write_rows  # noqa: E402

CLI_JOB = """
seed = 2
threads = 1
checkpoint_every = 100   # the first checkpoint comes at the end of epoch 1

[data]
train = "reviews.jsonl"
max_len = 12

[model]
embed_dim = 8
hidden = 8
dropout = 0.2
embed_init = "cooccurrence"

[[stages]]
name = "a"
epochs = 2
batch_size = 16
lr = 1e-2

[[stages]]
name = "b"
optimizer = "sgd"
epochs = 1
batch_size = 32
lr = 0.05
"""

# Runs `oxoptim train` with the trainer's first checkpoint replaced by SIGKILL: the process dies
# at the latest moment at which it has no checkpoint (an epoch trained, its metrics line written).
KILL_AT_FIRST_CHECKPOINT = """
import os, signal, sys
from oxoptim.training.trainer import Trainer
Trainer.checkpoint = lambda self: os.kill(os.getpid(), signal.SIGKILL)
from oxoptim.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_of_run_killed_before_first_checkpoint_equals_uninterrupted(tmp_path):
    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(300, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB)
    killed = run_cli(["train", "--config", "job.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path,
                     prefix=[sys.executable, "-c", KILL_AT_FIRST_CHECKPOINT])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    assert not list_checkpoints(str(run)) and not (run / "final.pt").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch had been trained
    # the uninterrupted run and the resume run in this process (the CLI's main), to save start-ups
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "ref"), "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(tmp_path / "ref", run)


def test_resume_with_another_process_count_is_refused_and_changes_nothing(tmp_path, capsys):
    """A checkpoint of a 2-process run (every rank's state) cannot be continued exactly by one
    process: `oxoptim train --resume` says so in one line and leaves the run as it was."""
    from oxoptim.__main__ import main
    from oxoptim.training.checkpoint import load_checkpoint

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB.replace('embed_init = "cooccurrence"', ""))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    latest = list_checkpoints(str(run))[0]
    state = load_checkpoint(latest)
    assert len(state["ranks"]) == 1
    state["ranks"] = state["ranks"] * 2  # as a 2-process run writes it
    save_checkpoint(str(run), int(latest[-13:-3]), state)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "state of 2 process(es), this run has 1" in err
    assert "--nproc-per-node 2" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_run_whose_data_changed(tmp_path, capsys):
    """--resume checks that the data is what the checkpoints were trained on (a fingerprint saved at
    the start): changed files give one line, not a mixed run or a load_state_dict traceback. Runs
    saved without a fingerprint resume as before."""
    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB.replace('embed_init = "cooccurrence"', ""))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    latest = list_checkpoints(str(run))[0]
    assert len(load_checkpoint(latest)["meta"]["data_fingerprint"]) == 64
    good = (tmp_path / "reviews.jsonl").read_bytes()
    write_rows(tmp_path / "reviews.jsonl", reviews(150, seed=7))  # other texts: another vocabulary too
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on other data" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # one label flipped: same vocabulary and shapes, still refused
    rows = reviews(120, seed=1)
    rows[0] = (rows[0][0], "neg" if rows[0][1] == "pos" else "pos")
    write_rows(tmp_path / "reviews.jsonl", rows)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "trained on other data" in capsys.readouterr().err
    (tmp_path / "reviews.jsonl").write_bytes(good)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    # a checkpoint from before fingerprints: resumed as before
    state = load_checkpoint(latest)
    del state["meta"]["data_fingerprint"]
    save_checkpoint(str(run), int(latest[-13:-3]), state)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0


def test_stale_checkpoint_temp_files_are_removed_on_resume(tmp_path):
    """A process killed while writing a checkpoint leaves checkpoints/.ckpt-<step>.pt.tmp<pid>: the
    next resume (or fresh start) removes such files, and only them."""
    from oxoptim.__main__ import main
    from oxoptim.training.checkpoint import remove_stale_temp_files

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB.replace('embed_init = "cooccurrence"', ""))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    ckdir = run / "checkpoints"
    stale = ckdir / ".ckpt-0000000123.pt.tmp999999"
    keep = [ckdir / "notes.txt", ckdir / ".ckpt-0000000123.pt.tmpx", run / ".summary.json.tmp999999",
            ckdir / f".ckpt-0000000124.pt.tmp{os.getpid()}"]  # not the pattern, or this process's own
    for p in [stale] + keep:
        p.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not stale.exists() and all(p.exists() for p in keep)
    stale.write_bytes(b"x")
    assert remove_stale_temp_files(str(run)) == [str(stale)]


class _Killed(Exception):
    pass


def _dies_at(kill_at):
    """A Trainer that dies before step ``kill_at`` (nothing is written after), as under SIGKILL."""
    from oxoptim.training import Trainer

    class Dies(Trainer):
        def train_step(self, order, b):
            if self.global_step == kill_at:
                raise _Killed
            return super().train_step(order, b)

    return Dies


def _trial_run(run_dir, kill_at=None, resume=False):
    """A Trial whose winner (candidate 0) is not the last candidate, in a dropout model: the main
    run takes the winner's RNG state and data order back. ``kill_at``: the run dies before that
    step (nothing is written after a kill), as it would under SIGKILL."""
    import torch.nn.functional as F

    from oxoptim.training import Stage, Trainer, Trial

    Dies = _dies_at(kill_at)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 2))
    stages = [Stage("s", "adamw", epochs=3, batch_size=32, lr=1e-2,
                    adjust=[Trial([1e-2, 1e-7, 1e-7], epochs=1, monitor="val_accuracy")])]
    t = Dies(model, F.cross_entropy, (x[:300], y[:300]), (x[300:], y[300:]), stages, run_dir=str(run_dir),
             quiet=True, checkpoint_every=4)
    t.fit(resume=resume)
    return t


@pytest.mark.parametrize("kill_at", [14, 26, 33])  # in the second and third candidates, in the main run
def test_resume_around_a_trial_whose_winner_is_not_last_is_bit_identical(tmp_path, kill_at):
    ref = _trial_run(tmp_path / "ref")
    assert ref.run.events[0].startswith("[s e2] trial chose {'lr': 0.01}")
    with pytest.raises(_Killed):
        _trial_run(tmp_path / "run", kill_at=kill_at)
    assert list_checkpoints(str(tmp_path / "run"))
    got = _trial_run(tmp_path / "run", resume=True)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "run" / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert strip_times((tmp_path / "run" / "metrics.jsonl").read_text()) == strip_times(
        (tmp_path / "ref" / "metrics.jsonl").read_text())
    assert got.run.events == ref.run.events


def _stopped_run(run_dir, die_after_stop=False, resume=False):
    """A rule stops the run in stage ``a``; stage ``b`` (bfloat16 weights) never begins. With
    ``die_after_stop``, the run dies right after the checkpoint written at the stop, whose position
    is past the last stage."""
    import torch.nn.functional as F

    from oxoptim.training import EarlyStop, Stage, Trainer

    class Dies(Trainer):
        def checkpoint(self):
            super().checkpoint()
            if die_after_stop and self.run.stopped:
                raise _Killed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    stages = [Stage("a", "adamw", epochs=5, batch_size=32, lr=3e-3,
                    adjust=[EarlyStop("val_loss", patience=1, min_delta=100.0)]),
              Stage("b", "adamw", epochs=1, batch_size=32, lr=1e-3, param_dtype="bfloat16")]
    t = Dies(model, F.cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]), stages, run_dir=str(run_dir),
             quiet=True, checkpoint_every=5)
    t.fit(resume=resume)
    return t


def test_resume_after_an_early_stop_keeps_the_dtype_of_the_stages_that_ran(tmp_path):
    """The checkpoint written at an early stop points past the last stage: resuming it must not
    cast the model to a later stage's param_dtype that never began (it rounded the weights)."""
    ref = _stopped_run(tmp_path / "ref")
    assert ref.run.stopped and all(p.dtype == torch.float32 for p in ref.model.parameters())
    with pytest.raises(_Killed):
        _stopped_run(tmp_path / "run", die_after_stop=True)
    got = _stopped_run(tmp_path / "run", resume=True)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "run" / "final.pt")
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert got.param_digest() == ref.param_digest()


def _plan_run(run_dir, resume=False, kill_at=None, **stage):
    """Two epochs of one stage whose settings ``stage`` overrides; ``kill_at``: dies before that step."""
    import torch.nn.functional as F

    from oxoptim.training import Stage, Trainer

    Dies = _dies_at(kill_at)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    settings = dict(epochs=3, batch_size=32, lr=1e-2, lr_schedule="cosine", adjust=[{"rule": "early_stop", "patience": 2}])
    settings.update(stage)
    t = Dies(model, F.cross_entropy, (x[:150], y[:150]), (x[150:], y[150:]), [Stage("s", "adamw", **settings)],
             run_dir=str(run_dir), quiet=True, checkpoint_every=3)
    t.fit(resume=resume)
    return t


@pytest.mark.parametrize("changed", [
    {"lr_schedule": "linear"},
    {"adjust": [{"rule": "early_stop", "patience": 2, "min_delta": 5.0}]},
    {"adjust": [{"rule": "restore_best"}]},
    {"average": "ema", "average_decay": 0.9},
    {"grad_clip": 1.0, "grad_clip_mode": "global"},
], ids=["schedule", "min_delta", "rule", "average", "clip"])
def test_resume_refuses_stage_settings_its_checkpoint_was_not_written_for(tmp_path, changed):
    """What describe() leaves out (schedule, rules and their settings, averaging details) is checked
    too: a changed plan is refused in one error, not continued under the new settings."""
    with pytest.raises(_Killed):
        _plan_run(tmp_path / "run", kill_at=6, **({"average": "ema"} if "average_decay" in changed else {}))
    assert list_checkpoints(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="other settings of stage 's'|different plan"):
        _plan_run(tmp_path / "run", resume=True, **changed)
    _plan_run(tmp_path / "run", resume=True, **({"average": "ema"} if "average_decay" in changed else {}))


@pytest.mark.parametrize("edit", [
    lambda cfg: cfg.update(seed=3),
    lambda cfg: cfg.update(label_smoothing=0.1),
    lambda cfg: cfg["model"].update(hidden=12),
    lambda cfg: cfg["stages"][0].update(lr_schedule="linear"),
], ids=["seed", "label_smoothing", "model", "stage-schedule"])
def test_resume_refuses_an_edited_config_json(tmp_path, capsys, edit):
    import json

    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB.replace('embed_init = "cooccurrence"', ""))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "was written for another job" in err or "was written for other settings of stage" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_may_change_the_thread_count(tmp_path):
    import json

    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    (tmp_path / "job.toml").write_text(CLI_JOB.replace('embed_init = "cooccurrence"', ""))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["threads"] = 2
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--quiet"]) == 0


def test_a_second_process_in_a_run_directory_is_refused(tmp_path):
    """A run holds its directory while it trains: another process (a second --resume) is refused."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".oxoptim.lock", "a") as held:  # what a training process holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CheckpointError, match="in use by another process"):
            _plan_run(run)
    _plan_run(run)  # free again


def test_overwrite_removes_the_earlier_runs_results(tmp_path, capsys):
    """--overwrite then a run that diverges: no summary.json or final.pt of the run before it."""
    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    job = CLI_JOB.replace('embed_init = "cooccurrence"', "")
    (tmp_path / "job.toml").write_text(job)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    assert (run / "summary.json").exists() and (run / "final.pt").exists()
    (tmp_path / "diverges.toml").write_text(job.replace("lr = 0.05", "lr = 3e38"))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "diverges.toml"), "--run-dir", str(run), "--overwrite", "--quiet"]) == 2
    assert not (run / "summary.json").exists() and not (run / "final.pt").exists()


def test_a_job_refused_for_a_held_run_directory_writes_nothing_there(tmp_path, capsys):
    """The job holds its directory from config.json to summary.json: an --overwrite started while
    another process trains there is refused before it replaces that run's config.json."""
    import fcntl

    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", reviews(120, seed=1))
    job = CLI_JOB.replace('embed_init = "cooccurrence"', "")
    (tmp_path / "job.toml").write_text(job)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    (tmp_path / "other.toml").write_text(job.replace("seed = 2", "seed = 7"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    with open(run / ".oxoptim.lock", "a") as held:  # the first job, still training
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["train", "--config", str(tmp_path / "other.toml"), "--run-dir", str(run), "--overwrite", "--quiet"]) == 2
    assert "in use by another process" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_takes_a_user_rule_whose_repr_changes_between_processes(tmp_path):
    """A user's rule is checked by its type: its attributes (a function, a set) may print
    differently in the resuming process."""
    import torch.nn.functional as F

    from oxoptim.training import Rule, Stage, Trainer

    class Notify(Rule):
        def __init__(self, seen):
            self.fn, self.names = (lambda record: None), set(seen)

    def run(resume, kill_at=None, names=("a", "b")):
        Dies = _dies_at(kill_at)

        g = torch.Generator().manual_seed(0)
        x = torch.randn(100, 4, generator=g)
        y = (x[:, 0] > 0).long()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        stage = Stage("s", "adamw", epochs=2, batch_size=16, lr=1e-2, adjust=[Notify(names)])
        Dies(model, F.cross_entropy, (x[:80], y[:80]), (x[80:], y[80:]), [stage], run_dir=str(tmp_path / "run"),
             quiet=True, checkpoint_every=2).fit(resume=resume)

    with pytest.raises(_Killed):
        run(False, kill_at=5)
    run(True, names=("b", "a", "c"))  # another lambda, another set: the same rule type
