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


@pytest.mark.parametrize("text, error", [
    ('[[stages]]\nname = "x"\nbatch_size = "half"\n', "batch_size"),
    ('[[stages]]\nname = "x"\nadjust = [{ rule = "magic" }]\n', "unknown adjust rule"),
    ('[model]\nembed_init = "glove"\n[[stages]]\nname = "x"\n', "embed_init"),
    ('[[stages]]\nname = "x"\nadversarial = -1\n', "adversarial"),
    ('sede = 1\n[[stages]]\nname = "x"\n', "unknown top-level"),
])
def test_bad_config_is_rejected(tmp_path, text, error):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_config(str(p))


DDP_JOB = """
seed = 3
threads = 1
checkpoint_every = 4

[data]
train = "{train}"
text_column = "text"
label_column = "label"
max_len = 10
split = [0.7, 0.15, 0.15]
bucket = 4

[model]
embed_dim = 8
hidden = 8
dropout = 0.2
pool = "max_mean"
embed_init = "cooccurrence"

[[stages]]
name = "explore"
optimizer = "adamw"
epochs = 3
batch_size = 16
lr = 1e-2
lr_schedule = "cosine"
grad_clip = 1.0
adversarial = 0.5
adjust = [
  {{ rule = "trial", param = "lr", candidates = [3e-3, 1e-2], epochs = 1, monitor = "val_loss" }},
  {{ rule = "restore_best", monitor = "val_accuracy" }},
]

[[stages]]
name = "average"
optimizer = "sgd"
epochs = 2
batch_size = 32
lr = 0.05
momentum = 0.9
average = "swa"
"""


def test_torchrun_ddp_two_processes(tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m oxoptim train`: DDP over gloo,
    rank 0 writes the outputs, both ranks end with the same parameters."""
    import csv

    rows = []
    for i in range(200):
        good = i % 2 == 0
        rows.append({"text": ("好棒赞" if good else "差烂坏")[i % 3] + "书" * (i % 4) + ("喜欢" if good else "失望"),
                     "label": "pos" if good else "neg"})
    data = tmp_path / "reviews.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(DDP_JOB.format(train=data.name))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "oxoptim", "train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("test accuracy") == 1  # only rank 0 reports
    for name in ("metrics.jsonl", "summary.json", "curves.png", "final.pt", "config.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_agree"] is True
    digests = summary["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == ["explore"] * 4 + ["average"] * 2  # 2 trial epochs + 2
    assert summary["test"]["accuracy"] > 0.8
    assert not list(run.glob("**/*.tmp*"))
