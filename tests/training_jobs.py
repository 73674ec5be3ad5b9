"""Shared by the training tests: small review data sets, running the `oxoptim` CLI, comparing runs."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

GOOD, BAD, FILLER = "好棒赞爱", "差烂坏烦", "书本店买送到了的很"
# torchrun's launcher: ``python -m torch.distributed.run`` is ``torchrun`` without relying on PATH.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


# The [data] table of the small jobs on a review file (``{train}``: its path), for str.format.
TINY_DATA = """
[data]
train = "{train}"
text_column = "review"
label_column = "stars"
max_len = 12
split = [0.7, 0.15, 0.15]
"""


def reviews(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` distinct (text, label) pairs; the label is the majority of GOOD vs BAD characters, so no
    single character decides it."""
    rng = random.Random(seed)
    out: Dict[str, str] = {}
    while len(out) < n:
        text = "".join(rng.choice(GOOD + BAD + FILLER * 2) for _ in range(rng.randint(4, 12)))
        good, bad = sum(c in GOOD for c in text), sum(c in BAD for c in text)
        if good != bad and text not in out:
            out[text] = "pos" if good > bad else "neg"
    return list(out.items())


def write_rows(path, rows: Sequence[Tuple[str, str]], text_key: str = "text", label_key: str = "label"):
    """Writes (text, label) rows as CSV or JSONL, by the file's extension."""
    path = str(path)
    if path.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow([text_key, label_key])
            w.writerows(rows)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({text_key: t, label_key: l}, ensure_ascii=False) + "\n" for t, l in rows)
    return path


def oxoptim_command() -> List[str]:
    """The installed ``oxoptim`` console script (what a user runs after ``pip install oxoptim``)."""
    script = os.path.join(os.path.dirname(sys.executable), "oxoptim")
    assert os.path.isfile(script), f"the oxoptim console script is not installed next to {sys.executable}"
    return [script]


def blocking_env(modules: Sequence[str], tmp_path) -> Dict[str, str]:
    """An environment whose Python processes cannot import ``modules``, as if they were not installed.

    A ``sitecustomize`` (imported by every interpreter at start-up) sets ``sys.modules[name] = None``:
    then ``import name`` raises ModuleNotFoundError and ``importlib.util.find_spec(name)`` returns
    None, exactly what an environment without the package gives.
    """
    d = tmp_path / "block-imports"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(f"import sys\nfor _m in {list(modules)!r}:\n    sys.modules[_m] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return env


def run_cli(args: Sequence[str], cwd, env: Optional[dict] = None, timeout: float = 120,
            prefix: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    cmd = (prefix if prefix is not None else oxoptim_command()) + list(args)
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def strip_times(text: str) -> List[dict]:
    """metrics.jsonl records without their wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "samples_per_s")}
            for line in text.splitlines()]


def assert_same_run(run_a, run_b) -> None:
    """Bit-identical final weights and identical metrics (times aside) in two run directories."""
    a, b = torch.load(os.path.join(run_a, "final.pt")), torch.load(os.path.join(run_b, "final.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    ma = strip_times(open(os.path.join(run_a, "metrics.jsonl"), encoding="utf-8").read())
    mb = strip_times(open(os.path.join(run_b, "metrics.jsonl"), encoding="utf-8").read())
    assert ma == mb


def summary(run) -> dict:
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def evaluate_final(run) -> Dict[str, Dict[str, float]]:
    """Loss and accuracy of a CLI run's final.pt on its validation and test splits, computed here
    from config.json alone (data rebuilt, model rebuilt, one batch): what summary.json must report."""
    import torch.nn.functional as F

    from oxoptim.training.data import build_text_data
    from oxoptim.training.model import BiGRUClassifier

    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    d = cfg["data"]
    data = build_text_data(train=d.get("train"), val=d.get("val"), test=d.get("test"),
                           text_column=d.get("text_column", "text"), label_column=d.get("label_column", "label"),
                           max_len=d.get("max_len", 100), split=tuple(d.get("split", (0.8, 0.1, 0.1))),
                           seed=d.get("split_seed", 0), min_freq=d.get("min_freq", 1))
    kwargs = {k: v for k, v in cfg.get("model", {}).items() if not k.startswith("embed_init")}
    model = BiGRUClassifier(len(data["vocab"]), data["num_classes"], **kwargs)
    model.load_state_dict(torch.load(os.path.join(run, "final.pt")))
    model.eval()
    out = {}
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = data[split].x, data[split].y
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.get("label_smoothing", 0.0))
            out[split] = {"loss": float(loss), "accuracy": float((logits.argmax(1) == y).double().mean())}
    return out


def synthetic_job(stages: str, vocab: int = 40, n: int = 1200, length: int = 12, n_train: int = 1000) -> str:
    """A Python script that trains a small embedding classifier (with dropout) on synthetic data
    with the plan ``stages`` (source of a list of Stages), run directory and resume flag from argv."""
    return f"""
import sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from oxoptim.training import *
run_dir, resume = sys.argv[1], sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
x = torch.randint(0, {vocab}, ({n}, {length}), generator=g)
y = (F.one_hot(x, {vocab}).float().sum(1) @ torch.randn({vocab}, 3, generator=g)).argmax(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding({vocab}, 8), torch.nn.Flatten(), torch.nn.Linear({8 * length}, 64),
                            torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 3))
stages = {stages}
Trainer(model, F.cross_entropy, (x[:{n_train}], y[:{n_train}]), (x[{n_train}:], y[{n_train}:]), stages,
        run_dir=run_dir, checkpoint_every=7, quiet=True).fit(resume=resume)
"""


def run_script(script_text: str, tmp_path, run_dir, resume: bool = False, kill_after: Optional[float] = None,
               checkpoints_first: int = 2) -> Optional[int]:
    """Runs a :func:`synthetic_job` script to the end, or (``kill_after`` seconds after it has
    written ``checkpoints_first`` checkpoints) kills it with SIGKILL and returns its exit code."""
    import signal
    import time

    from oxoptim.training.checkpoint import list_checkpoints

    script = tmp_path / "job.py"
    script.write_text(script_text)
    cmd = [sys.executable, str(script), str(run_dir), "1" if resume else "0"]
    if kill_after is None:
        subprocess.run(cmd, check=True, timeout=600)
        return None
    p = subprocess.Popen(cmd)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list_checkpoints(str(run_dir))) < checkpoints_first:
        time.sleep(0.02)
    time.sleep(kill_after)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return p.returncode
