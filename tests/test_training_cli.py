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

