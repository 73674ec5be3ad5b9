"""oxoptim train: CLI run of a tiny TOML job (outputs, schedules, reported figures), resume of a
finished run, the default config."""

import json
import math
import os
import subprocess
import sys

import pytest

from oxoptim.__main__ import main
from oxoptim.training.config import DEFAULT_CONFIG_TOML, default_config
from oxoptim.training.stages import LRSchedule
from training_jobs import TINY_DATA, evaluate_final, reviews, write_rows

TINY = """
seed = 1
threads = 1
checkpoint_every = 5
""" + TINY_DATA + """
[model]
embed_dim = 8
hidden = 8
dropout = 0.1

[[stages]]
name = "warm"
optimizer = "adamw"
epochs = 2
batch_size = 16
lr = 1e-2
adjust = [{{ rule = "reduce_lr_on_plateau", patience = 1 }}]

[[stages]]
name = "polish"
optimizer = "sgd"
epochs = 2
batch_size = 32
lr = 0.05
momentum = 0.9
lr_schedule = {{ name = "cosine", warmup = 0.1 }}
adjust = [{{ rule = "restore_best", monitor = "val_accuracy" }}]
"""


def test_cli_smoke_and_outputs(tmp_path, capsys):
    rows = [(t, 5 if label == "pos" else 1) for t, label in reviews(240, seed=5)]
    write_rows(tmp_path / "reviews.jsonl", rows, text_key="review", label_key="stars")
    cfg = tmp_path / "job.toml"
    cfg.write_text(TINY.format(train="reviews.jsonl"))  # relative to the config file
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    for name in ("metrics.jsonl", "summary.json", "curves.png", "final.pt", "config.json"):
        assert (run / name).exists(), name
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["warm", "warm", "polish", "polish"]
    # each stage ran with its configured LR: constant, then cosine after a 10% warm-up (the LR of
    # an epoch's last step is logged)
    spe = math.ceil(168 / 32)  # 70% of 240 rows, batches of 32
    cosine = LRSchedule({"name": "cosine", "warmup": 0.1})
    expected = [1e-2, 1e-2] + [0.05 * cosine.factor(e * spe + spe - 1, 2 * spe) for e in range(2)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["missing_outputs"] == {}
    # the reported figures are those of final.pt on the config's own splits
    truth = evaluate_final(run)
    for split in ("val", "test"):
        assert summary[split]["accuracy"] == pytest.approx(truth[split]["accuracy"], abs=1e-6)  # << 1 example
        assert summary[split]["loss"] == pytest.approx(truth[split]["loss"], rel=1e-5)
    # resuming a finished run is a no-op that reports the same result
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    summary2 = json.loads((run / "summary.json").read_text())
    assert summary2["test"] == summary["test"] and summary2["val"] == summary["val"]


def test_python_m_oxoptim_train_help():
    r = subprocess.run([sys.executable, "-m", "oxoptim", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--config" in r.stdout


def test_default_config_parses_and_matches_shipped_file():
    cfg = default_config()
    assert [s["name"] for s in cfg["stages"]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = os.path.join(root, "configs", "default.toml")
    if not os.path.exists(shipped):
        pytest.skip("configs/ is not next to these tests (a copy run against an installed wheel)")
    assert open(shipped, encoding="utf-8").read() == DEFAULT_CONFIG_TOML



# ----- the run directory: refused before anything is written ------------------------------------

def _tiny_job(tmp_path, extra_stage=""):
    write_rows(tmp_path / "reviews.jsonl", [(t, 5 if l == "pos" else 1) for t, l in reviews(120, seed=5)],
               text_key="review", label_key="stars")
    cfg = tmp_path / "job.toml"
    cfg.write_text(TINY.format(train="reviews.jsonl").replace("epochs = 2", "epochs = 1") + extra_stage)
    return cfg


def _old_run(run):
    """A run directory as an interrupted run leaves it (contents need not be real for these checks)."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"an": "interrupted run"}\n')
    (run / "checkpoints" / "ckpt-0000000005.pt").write_bytes(b"old checkpoint")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("oxoptim train: error: ") and "Traceback" not in err, err
    return err


def test_fresh_run_in_a_directory_holding_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    cfg = _tiny_job(tmp_path)
    run = tmp_path / "run"
    before = _old_run(run)
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]) == 2
    err = _one_line(capsys)
    assert "already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # only the checkpoints: also a run
    (run / "config.json").unlink()
    (run / "metrics.jsonl").unlink()
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]) == 2
    assert "already holds a run (checkpoints)" in _one_line(capsys)
    # an empty directory is fine, and --overwrite starts afresh over an old run
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "empty"), "--quiet"]) == 0
    _old_run(tmp_path / "again")
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "again"), "--quiet", "--overwrite"]) == 0
    assert b"old checkpoint" not in b"".join(p.read_bytes() for p in (tmp_path / "again" / "checkpoints").iterdir())
    assert "interrupted" not in (tmp_path / "again" / "config.json").read_text()


def test_job_refused_at_start_up_leaves_the_run_directory_untouched(tmp_path, capsys):
    """A refusal by the Trainer's own checks (the model has no layer groups) comes before config.json
    is written: an interrupted run in the directory can still be resumed, even with --overwrite."""
    cfg = _tiny_job(tmp_path, '\n[[stages]]\nname = "head"\nepochs = 1\nbatch_size = 16\ntrainable = "head"\n')
    run = tmp_path / "run"
    before = _old_run(run)
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--quiet", "--overwrite"]) == 2
    assert "layer_groups" in _one_line(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    fresh = tmp_path / "fresh"
    assert main(["train", "--config", str(cfg), "--run-dir", str(fresh), "--quiet"]) == 2
    _one_line(capsys)
    assert not fresh.exists()


def test_resume_refuses_config_run_dir_and_overwrite(tmp_path, capsys):
    cfg = _tiny_job(tmp_path)
    run = tmp_path / "run"
    _old_run(run)
    for extra in (["--config", str(cfg)], ["--run-dir", str(tmp_path / "elsewhere")], ["--overwrite"]):
        assert main(["train", "--resume", str(run), "--quiet"] + extra) == 2
        err = _one_line(capsys)
        assert extra[0] in err and "--resume" in err
    assert not (tmp_path / "elsewhere").exists()


def test_run_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    cfg = _tiny_job(tmp_path)
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir), "--quiet"]) == 2
        assert "cannot make the run directory" in _one_line(capsys)
    assert (tmp_path / "afile").read_text() == "x"
