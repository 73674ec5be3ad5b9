"""`oxoptim train` under torchrun (2 processes, DDP over gloo): outputs, rank agreement, and resume
after every process was killed with SIGKILL, bit-identical to an uninterrupted 2-process run."""

import json
import os
import signal

import pytest
import torch

from oxoptim.training.checkpoint import list_checkpoints
from training_jobs import TORCHRUN, assert_same_run, evaluate_final, reviews, run_cli, summary, write_rows

pytestmark = pytest.mark.integration  # whole jobs in subprocesses


def job_header(seed: int, checkpoint_every: int) -> str:
    """The top of JOB and BF16_JOB: the settings, the data (length buckets) and the model's first
    lines (with dropout), up to where the jobs differ."""
    return f"""
seed = {seed}
threads = 1
checkpoint_every = {checkpoint_every}

[data]
train = "reviews.csv"
max_len = 12
split = [0.7, 0.15, 0.15]
bucket = 4

[model]
embed_dim = 8
hidden = 8
dropout = 0.2
"""


# Batches of 15 give the ranks shards of 8 and 7 rows, and length buckets give them different
# padded lengths: their dropout draws, so their random states, differ from the first step on.
JOB = job_header(seed=3, checkpoint_every=4) + """pool = "max_mean"
embed_init = "cooccurrence"

[[stages]]
name = "explore"
optimizer = "adamw"
epochs = 3
batch_size = 15
lr = 1e-2
lr_schedule = "cosine"
grad_clip = 1.0
adversarial = 0.5
adjust = [
  { rule = "trial", param = "lr", candidates = [3e-3, 1e-2], epochs = 1, monitor = "val_loss" },
  { rule = "restore_best", monitor = "val_accuracy" },
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

KILL_STEP = 14  # 10 steps an epoch: checkpoints at steps 4, 8, 10 and 12, so 2 steps are lost

# Each rank records its pid; at step KILL_STEP rank 0 sends SIGKILL to the torchrun launcher, to
# every other rank and to itself: the whole job dies at once, mid-epoch.
KILL_ALL_MID_RUN = """
import os, signal, sys
from oxoptim.training.trainer import Trainer
kill_dir, kill_step, rank = os.environ["KILL_DIR"], int(os.environ["KILL_STEP"]), int(os.environ["RANK"])
with open(os.path.join(kill_dir, f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
step = Trainer.train_step

def step_or_die(self, order, b):
    if rank == 0 and self.global_step == kill_step:
        others = [int(open(os.path.join(kill_dir, f"rank{r}.pid")).read()) for r in range(1, self.world)]
        for pid in [os.getppid()] + others + [os.getpid()]:
            os.kill(pid, signal.SIGKILL)
    return step(self, order, b)

Trainer.train_step = step_or_die
from oxoptim.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    write_rows(d / "reviews.csv", reviews(200, seed=3))
    (d / "job.toml").write_text(JOB)
    return d


@pytest.fixture(scope="module")
def reference(job_dir):
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--config", "job.toml", "--run-dir", "ref", "--quiet"],
                cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return job_dir / "ref", r


def test_torchrun_ddp_two_processes(reference):
    """Rank 0 writes the outputs and reports once; both ranks end with the same parameters, and the
    summary's figures are those of the weights in final.pt."""
    run, r = reference
    assert r.stdout.count("test accuracy") == 1  # only rank 0 reports
    for name in ("metrics.jsonl", "summary.json", "curves.png", "final.pt", "config.json"):
        assert (run / name).exists(), name
    s = summary(run)
    assert s["world_size"] == 2
    assert s["ranks_agree"] is True
    digests = s["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == final_digest(run)
    truth = evaluate_final(run)  # both ranks' shards together
    for split in ("val", "test"):
        assert s[split]["accuracy"] == pytest.approx(truth[split]["accuracy"], abs=1e-6)
        assert s[split]["loss"] == pytest.approx(truth[split]["loss"], rel=1e-5)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == ["explore"] * 4 + ["average"] * 2  # 2 trial epochs + 2
    assert not list(run.glob("**/*.tmp*"))


def final_digest(run):
    """The trainer's digest (Trainer.param_digest) of final.pt."""
    import hashlib

    h = hashlib.sha256()
    for k, v in torch.load(run / "final.pt").items():
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_torchrun_resume_after_kill_is_bit_identical(job_dir, reference, tmp_path):
    (tmp_path / "wrapper.py").write_text(KILL_ALL_MID_RUN)
    env = {**os.environ, "KILL_DIR": str(tmp_path), "KILL_STEP": str(KILL_STEP)}
    r = run_cli(TORCHRUN + [str(tmp_path / "wrapper.py"), "train", "--config", "job.toml", "--run-dir", str(tmp_path / "run"),
                            "--quiet"], cwd=job_dir, env=env, prefix=[])
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    assert list_checkpoints(str(run)) and not (run / "final.pt").exists()
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--resume", str(run), "--quiet"], cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" not in r.stdout  # --quiet
    assert_same_run(reference[0], run)
    assert summary(run)["rank_param_digests"] == summary(reference[0])["rank_param_digests"]


POLYAK_JOB = """
seed = 1
threads = 1
checkpoint_every = 0

[data]
train = "reviews.csv"
max_len = 12
split = [0.7, 0.15, 0.15]

[model]
embed_dim = 8
hidden = 8

[[stages]]
name = "sub"
optimizer = "subgradient"
batch_size = "full"
epochs = 3
lr = 0.5
step_rule = "polyak"
f_star = 0.0
"""


@pytest.mark.skipif(not hasattr(__import__("oxoptim"), "Subgradient"), reason="oxoptim.Subgradient missing")
def test_torchrun_full_batch_polyak_step_is_the_same_on_every_rank(job_dir):
    """Polyak's step size comes from the loss over all ranks' examples (each rank holds a shard):
    every rank takes the same step and the ranks end with the same weights."""
    (job_dir / "polyak.toml").write_text(POLYAK_JOB)
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--config", "polyak.toml", "--run-dir", "polyak", "--quiet"],
                cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks' final parameters differ" not in r.stderr
    s = summary(job_dir / "polyak")
    assert s["ranks_agree"] is True and s["rank_param_digests"][0] == final_digest(job_dir / "polyak")


def test_torchrun_trial_whose_winner_is_not_last_resumes_bit_identical(job_dir, tmp_path):
    """The winner (candidate 0) is not the last candidate: the main run takes back every rank's own
    random state from the winner's end; killed in candidate 1 (after the winner's checkpointed) and
    resumed, the run ends as the uninterrupted one."""
    job = JOB.replace("candidates = [3e-3, 1e-2], epochs = 1, monitor = \"val_loss\"",
                      "candidates = [1e-2, 1e-7], epochs = 1, monitor = \"val_loss\"")
    assert job != JOB
    (job_dir / "winner_first.toml").write_text(job)
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--config", "winner_first.toml", "--run-dir", str(tmp_path / "ref"),
                            "--quiet"], cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert summary(tmp_path / "ref")["events"][0].startswith("[explore e2] trial chose {'lr': 0.01}")
    (tmp_path / "wrapper.py").write_text(KILL_ALL_MID_RUN)
    env = {**os.environ, "KILL_DIR": str(tmp_path), "KILL_STEP": str(KILL_STEP)}
    r = run_cli(TORCHRUN + [str(tmp_path / "wrapper.py"), "train", "--config", "winner_first.toml", "--run-dir",
                            str(tmp_path / "run"), "--quiet"], cwd=job_dir, env=env, prefix=[])
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    assert list_checkpoints(str(run)) and not (run / "final.pt").exists()
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--resume", str(run), "--quiet"], cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_run(tmp_path / "ref", run)
    assert summary(run)["rank_param_digests"] == summary(tmp_path / "ref")["rank_param_digests"]


# A float32 stage, then bfloat16 ones: the cast between them replaces every parameter's data.
BF16_JOB = job_header(seed=2, checkpoint_every=0) + """
[[stages]]
name = "fp32"
optimizer = "adamw"
epochs = 1
batch_size = 15
lr = 1e-2

[[stages]]
name = "bf16"
optimizer = "adamw"
epochs = 2
batch_size = 15
lr = 1e-2
param_dtype = "bfloat16"
"""


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_torchrun_bfloat16_stage_keeps_the_ranks_in_agreement(job_dir, rounding):
    """A ``param_dtype = "bfloat16"`` stage after a float32 one still all-reduces the gradients (the
    cast detached DDP's hooks: every rank trained alone), and with stochastic rounding every rank
    draws the same rounding bits (each seeded its own stream from a generator that dropout on its
    own shard had moved): the ranks end with the same parameters."""
    job = BF16_JOB + ('stochastic_rounding = true\n' if rounding == "stochastic" else "")
    name = f"bf16_{rounding}"
    (job_dir / f"{name}.toml").write_text(job)
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--config", f"{name}.toml", "--run-dir", name, "--quiet"],
                cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(job_dir / name)
    assert s["ranks_agree"] is True, s["rank_param_digests"]
    assert s["rank_param_digests"][0] == final_digest(job_dir / name)


def test_torchrun_resume_in_a_bfloat16_stage_is_bit_identical(job_dir, tmp_path):
    """Killed in the bfloat16 stage and resumed: the resumed run casts the model before loading the
    weights, and its DDP must still all-reduce (it ends as the uninterrupted run, ranks agreeing)."""
    job = BF16_JOB.replace("checkpoint_every = 0", "checkpoint_every = 4")
    (job_dir / "bf16_resume.toml").write_text(job)
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--config", "bf16_resume.toml", "--run-dir", str(tmp_path / "ref"),
                            "--quiet"], cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (tmp_path / "wrapper.py").write_text(KILL_ALL_MID_RUN)
    env = {**os.environ, "KILL_DIR": str(tmp_path), "KILL_STEP": str(KILL_STEP)}  # 4 steps into the bf16 stage
    r = run_cli(TORCHRUN + [str(tmp_path / "wrapper.py"), "train", "--config", "bf16_resume.toml", "--run-dir",
                            str(tmp_path / "run"), "--quiet"], cwd=job_dir, env=env, prefix=[])
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_cli(TORCHRUN + ["-m", "oxoptim", "train", "--resume", str(tmp_path / "run"), "--quiet"], cwd=job_dir, prefix=[])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert summary(tmp_path / "ref")["ranks_agree"] is True
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    assert summary(tmp_path / "run")["rank_param_digests"] == summary(tmp_path / "ref")["rank_param_digests"]
