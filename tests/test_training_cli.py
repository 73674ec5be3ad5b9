"""oxoptim train: CLI smoke run on a tiny TOML config, resume through the CLI, config validation."""

import json
import os
import subprocess
import sys

import pytest

from oxoptim.__main__ import main
from oxoptim.training.config import DEFAULT_CONFIG_TOML, default_config, load_config

TINY = """
seed = 1
threads = 1
checkpoint_every = 5

[data]
train = "{train}"
text_column = "review"
label_column = "stars"
max_len = 12
split = [0.7, 0.15, 0.15]

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


def write_data(tmp_path, n=160):
    lines = []
    for i in range(n):
        good = i % 2 == 0
        text = ("好棒赞" if good else "差烂坏")[i % 3] + "书" * (i % 5) + ("喜欢" if good else "失望")
        lines.append(json.dumps({"review": text, "stars": 5 if good else 1}, ensure_ascii=False))
    p = tmp_path / "reviews.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_cli_smoke_and_outputs(tmp_path, capsys):
    data = write_data(tmp_path)
    cfg = tmp_path / "job.toml"
    cfg.write_text(TINY.format(train=data.name))  # relative to the config file
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    for name in ("metrics.jsonl", "summary.json", "curves.png", "final.pt", "config.json"):
        assert (run / name).exists(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["stage"] for l in lines] == ["warm", "warm", "polish", "polish"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] > 0.8
    # resuming a finished run is a no-op that reports the same result
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    summary2 = json.loads((run / "summary.json").read_text())
    assert summary2["test"] == summary["test"]


def test_python_m_oxoptim_train_help():
    r = subprocess.run([sys.executable, "-m", "oxoptim", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--config" in r.stdout


def test_default_config_parses_and_matches_shipped_file():
    cfg = default_config()
    assert [s["name"] for s in cfg["stages"]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = os.path.join(root, "configs", "default.toml")
    if os.path.exists(shipped):
        assert open(shipped, encoding="utf-8").read() == DEFAULT_CONFIG_TOML

