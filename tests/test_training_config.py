"""Config validation: every name and value of a job is checked before anything trains, and the CLI
says what is wrong in one line that lists the valid names."""

import os
import re

import pytest

from oxoptim.__main__ import main
from oxoptim.training import ReduceLROnPlateau, RestoreBest, Stage, Trainer
from oxoptim.training.config import load_config
from oxoptim.training.stages import OPTIMIZERS
from training_jobs import reviews, run_cli, write_rows

# Every name the error message must list.
VALID_OPTIMIZERS = ", ".join(sorted(OPTIMIZERS))

JOB = """
seed = 0
threads = 1

[data]
train = "reviews.jsonl"
max_len = 12

[model]
embed_dim = 8
hidden = 8
dropout = 0.1

[[stages]]
name = "warm"
optimizer = "adamw"
epochs = 1
batch_size = 16
lr = 1e-2
adjust = [{ rule = "reduce_lr_on_plateau", monitor = "val_loss", patience = 1 }]

[[stages]]
name = "last"
optimizer = "sgd"
epochs = 2
batch_size = 32
lr = 0.05
momentum = 0.9
lr_schedule = "cosine"
adjust = [{ rule = "restore_best", monitor = "val_accuracy" }, { rule = "early_stop", patience = 2 }]
"""

# (text in JOB, its replacement, fragments the one-line message must hold). Most edits are in the
# LAST stage: a lazy check would only fire after the first stage had trained.
BAD = [
    # misspelled names: the message lists the valid ones
    ('seed = 0', 'sede = 0', ["top-level key 'sede'", "did you mean 'seed'", "checkpoint_every, data,"]),
    ('max_len = 12', 'max_length = 12', ["[data] key 'max_length'", "max_len, min_freq"]),
    ('hidden = 8', 'hiden = 8', ["[model] key 'hiden'", "embed_init, embed_init_window, hidden"]),
    ('dropout = 0.1', 'dropout = 0.1\nembed_init = "glove"', ["embed_init", "'glove'", "cooccurrence, random"]),
    ('dropout = 0.1', 'dropout = 0.1\npool = "attention"', ["pool", "'attention'", "last, max, max_mean, mean"]),
    ('optimizer = "sgd"', 'optimizer = "sgdm"', ["stage 'last'", "'sgdm'", VALID_OPTIMIZERS]),
    ('epochs = 2', 'epoch = 2', ["stage 'last'", "key 'epoch'", "did you mean 'epochs'", "momentum, nesterov"]),
    ('momentum = 0.9', 'momentun = 0.9', ["key 'momentun'", "did you mean 'momentum'", "batch_size"]),
    ('rule = "early_stop"', 'rule = "early_stopping"', ["adjust rule 'early_stopping'",
                                                       "early_stop, next_stage_on_plateau, reduce_lr_on_plateau"]),
    ('patience = 2 }', 'patient = 2 }', ["early_stop", "key 'patient'", "min_delta, mode, monitor, patience"]),
    ('monitor = "val_accuracy"', 'monitor = "val_acc"', ["'val_acc'", "train_loss, val_accuracy, val_loss"]),
    ('lr_schedule = "cosine"', 'lr_schedule = "cosin"', ["'cosin'", "constant, cosine, linear"]),
    ('lr_schedule = "cosine"', 'lr_schedule = { name = "cosine", warmpu = 0.1 }', ["'warmpu'", "final, name, warmup"]),
    ('lr_schedule = "cosine"', 'average = "swb"', ["average", "'swb'", "ema, swa"]),
    # values out of range or of the wrong type
    ('lr = 0.05', 'lr = -0.05', ["stage 'last'", "learning rate", "-0.05"]),
    ('lr = 0.05', 'lr = "fast"', ["stage 'last'", "lr", "'fast'"]),
    ('momentum = 0.9', 'momentum = -0.9', ["stage 'last'", "momentum", "-0.9"]),
    ('epochs = 2', 'epochs = 0', ["stage 'last'", "epochs", ">= 1"]),
    ('epochs = 2', 'epochs = 2.5', ["stage 'last'", "epochs", "2.5"]),
    ('batch_size = 32', 'batch_size = 0', ["stage 'last'", "batch_size"]),
    ('batch_size = 32', 'batch_size = "half"', ["stage 'last'", "batch_size", "'half'"]),
    ('lr_schedule = "cosine"', 'grad_clip = 0', ["grad_clip"]),
    ('lr_schedule = "cosine"', 'param_dtype = "float16"', ["param_dtype", "'float16'", "bfloat16, float32"]),
    ('lr_schedule = "cosine"', 'stochastic_rounding = true', ["stochastic_rounding", 'param_dtype = "bfloat16"']),
    ('lr_schedule = "cosine"', 'adversarial = -1', ["adversarial"]),
    ('lr_schedule = "cosine"', 'average = "ema"\naverage_decay = 1.5', ["average_decay", "1.5"]),
    ('patience = 2 }', 'patience = -1 }', ["early_stop", "patience", "-1"]),
    ('rule = "restore_best", monitor = "val_accuracy"', 'rule = "reduce_lr_on_plateau", factor = 2.0',
     ["reduce_lr_on_plateau", "factor", "2.0"]),
    ('adjust = [{ rule = "restore_best"', 'adjust = [{ rule = "trial", candidates = [1e-3, -1.0] }, { rule = "restore_best"',
     ["stage 'last'", "trial", "learning rate", "-1.0"]),
    ('adjust = [{ rule = "restore_best"', 'adjust = [{ rule = "trial", candidates = [1e-3, 1e-2], epochs = 2 }, { rule = "restore_best"',
     ["stage 'last'", "trial epochs (2)", "stage epochs (2)"]),
    ('dropout = 0.1', 'dropout = 1.5', ["[model]", "dropout", "1.5"]),
    ('hidden = 8', 'hidden = 0', ["[model]", "hidden", ">= 1"]),
    ('max_len = 12', 'max_len = 0', ["[data]", "max_len", ">= 1"]),
    ('max_len = 12', 'max_len = 12\nsplit = [0.8, 0.3]', ["[data]", "split", "sum to 1"]),
    # an empty validation or test split was scored 0.0 (and restore_best followed that score)
    ('max_len = 12', 'max_len = 12\nsplit = [0.9, 0.1, 0.0]', ["[data]", "split fractions must be > 0"]),
    ('max_len = 12', 'max_len = 12\nsplit = [1.0, 0.0]', ["[data]", "split fractions must be > 0"]),
    ('max_len = 12', 'max_len = 12\nsplit = [0.99, 0.008, 0.002]', ["[data]", "no test texts left"]),
    ('threads = 1', 'threads = -1', ["threads", ">= 0"]),
    ('threads = 1', 'threads = 1\nlabel_smoothing = 1.0', ["label_smoothing", "[0, 1)"]),
    ('train = "reviews.jsonl"', 'train = "review.jsonl"', ["[data] train", "review.jsonl", "no such file"]),
    # numbers that torch's own checks let through: infinite, or true/false
    ('lr = 0.05', 'lr = inf', ["stage 'last'", "lr must be a finite number, not inf"]),
    ('lr = 0.05', 'lr = true', ["stage 'last'", "lr must be a number, not true"]),
    ('momentum = 0.9', 'momentum = nan', ["stage 'last'", "momentum must be a finite number, not nan"]),
    ('adjust = [{ rule = "restore_best"', 'adjust = [{ rule = "trial", candidates = [1e-2, inf], epochs = 1 }, { rule = "restore_best"',
     ["stage 'last'", "trial candidate {'lr': inf}", "lr must be a finite number"]),
    # a tuple argument with too few values (was an IndexError traceback)
    ('lr = 1e-2', 'lr = 1e-2\nbetas = [0.9]', ["stage 'warm'", "betas must be 2 numbers", "[0.9]"]),
    # Polyak steps need the loss at the current weights: full-batch stages only (was a crash after
    # the earlier stages had trained)
    ('optimizer = "sgd"\nepochs = 2\nbatch_size = 32\nlr = 0.05\nmomentum = 0.9',
     'optimizer = "subgradient"\nepochs = 2\nbatch_size = 32\nlr = 0.05\nstep_rule = "polyak"\nf_star = 0.0',
     ["stage 'last'", 'step_rule = "polyak"', 'batch_size = "full"']),
    # values of the wrong type that were a TypeError traceback, or read as a rule name letter by letter
    ('lr_schedule = "cosine"', 'param_dtype = ["bfloat16"]', ["stage 'last'", "param_dtype", "['bfloat16']"]),
    ('lr_schedule = "cosine"', 'state_dtype = { name = "bfloat16" }', ["stage 'last'", "state_dtype"]),
    ('adjust = [{ rule = "restore_best", monitor = "val_accuracy" }, { rule = "early_stop", patience = 2 }]',
     'adjust = 3', ["stage 'last'", "adjust must be a list", "3"]),
    ('adjust = [{ rule = "restore_best", monitor = "val_accuracy" }, { rule = "early_stop", patience = 2 }]',
     'adjust = "early_stop"', ["stage 'last'", "adjust must be a list", "'early_stop'"]),
    ('rule = "early_stop"', 'rule = ["early_stop"]', ["stage 'last'", "adjust rule", "['early_stop']"]),
    # a boolean optimizer argument given as a string was truthy: amsgrad = "false" trained with AMSGrad
    ('momentum = 0.9', 'momentum = 0.9\nnesterov = "false"', ["stage 'last'", "nesterov must be true or false", "'false'"]),
    ('lr = 1e-2', 'lr = 1e-2\namsgrad = "false"', ["stage 'warm'", "amsgrad must be true or false"]),
    ('lr = 1e-2', 'lr = 1e-2\nfused = 0', ["stage 'warm'", "fused must be true or false"]),
    # a seed torch cannot take was a traceback from torch.manual_seed
    ('seed = 0', 'seed = 18446744073709551616', ["seed must be", "18446744073709551616"]),
]


@pytest.fixture
def job_dir(tmp_path):
    write_rows(tmp_path / "reviews.jsonl", reviews(200))
    return tmp_path


def write_job(job_dir, old, new):
    assert old in JOB, old
    (job_dir / "job.toml").write_text(JOB.replace(old, new, 1))


@pytest.mark.parametrize("old, new, fragments", BAD, ids=[new.split("\n")[-1][:40] for _, new, _ in BAD])
def test_cli_rejects_bad_config_at_start_in_one_line(job_dir, capsys, old, new, fragments):
    write_job(job_dir, old, new)
    run = job_dir / "run"
    rc = main(["train", "--config", str(job_dir / "job.toml"), "--run-dir", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("oxoptim train: error: ")
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert not run.exists()  # nothing trained, nothing written


def test_the_valid_job_runs(job_dir, capsys):
    """The base of the table above is a good job: each case fails for its own edit only."""
    write_job(job_dir, "epochs = 2", "epochs = 1")
    assert main(["train", "--config", str(job_dir / "job.toml"), "--run-dir", str(job_dir / "run"), "--quiet"]) == 0
    assert (job_dir / "run" / "final.pt").exists()


@pytest.mark.parametrize("old, new, fragment", [
    ('optimizer = "sgd"', 'optimizer = "sgdm"', VALID_OPTIMIZERS),
    ('lr = 0.05', 'lr = -0.05', "Invalid learning rate: -0.05"),
])
def test_real_cli_process_fails_before_the_first_epoch(job_dir, old, new, fragment):
    """The `oxoptim` script itself: exit code 2, one line on stderr, no traceback, no metrics."""
    write_job(job_dir, old, new)
    r = run_cli(["train", "--config", "job.toml", "--run-dir", "run"], cwd=job_dir)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert fragment in r.stderr
    assert r.stdout == "" and not (job_dir / "run").exists()


def test_config_json_of_a_run_is_checked_on_resume(job_dir, capsys):
    write_job(job_dir, "epochs = 2", "epochs = 1")
    run = job_dir / "run"
    assert main(["train", "--config", str(job_dir / "job.toml"), "--run-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    saved = (run / "config.json").read_text()
    (run / "config.json").write_text(saved.replace('"sgd"', '"sgdm"'))
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "'sgdm'" in err


def test_python_api_checks_names_and_values_when_objects_are_made():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamx' \(did you mean 'adamax'\?\).*" + re.escape(VALID_OPTIMIZERS)):
        Stage("s", optimizer="adamx")
    with pytest.raises(ValueError, match=r"key 'epoch'.*did you mean 'epochs'"):
        Stage("s", epoch=3)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Stage("s", optimizer="sgd", lr=-1.0)
    with pytest.raises(ValueError, match=r"patience"):
        ReduceLROnPlateau(patience=-2)
    import torch
    import torch.nn.functional as F

    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"'val_acc'.*train_loss, val_accuracy, val_loss"):
        Trainer(torch.nn.Linear(3, 2), F.cross_entropy, (x, y), (x, y),
                [Stage("s", adjust=[RestoreBest("val_acc")])], quiet=True)


@pytest.mark.parametrize("text, error", [
    ('[[stages]]\nname = "x"\nbatch_size = "half"\n', "batch_size"),
    ('[[stages]]\nname = "x"\nadjust = [{ rule = "magic" }]\n', "unknown adjust rule"),
    ('[model]\nembed_init = "glove"\n[[stages]]\nname = "x"\n', "embed_init"),
    ('[[stages]]\nname = "x"\nadversarial = -1\n', "adversarial"),
    ('sede = 1\n[[stages]]\nname = "x"\n', "unknown top-level"),
    ('[[stages]]\nepochs = 1\n', "needs a name"),
    ('seed = 1\n', "at least one \\[\\[stages\\]\\]"),
    ('seed = \n', "bad.toml"),
])
def test_load_config_raises_value_errors(tmp_path, text, error):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_config(str(p))


def test_data_left_empty_by_cleaning_fails_at_start(tmp_path, capsys):
    rows = reviews(40)
    write_rows(tmp_path / "train.jsonl", rows)
    write_rows(tmp_path / "val.jsonl", rows[:10])  # every validation text is also a training text
    (tmp_path / "job.toml").write_text(JOB.replace('train = "reviews.jsonl"', 'train = "train.jsonl"\nval = "val.jsonl"'))
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no val texts left" in err and "'val_in_train': 10" in err
    assert not (tmp_path / "run").exists()


def test_numeric_optimizer_arguments_in_python():
    with pytest.raises(ValueError, match="lr must be a finite number, not inf"):
        Stage("s", optimizer="sgd", lr=float("inf"))
    with pytest.raises(ValueError, match="lr must be a number, not true"):
        Stage("s", optimizer="subgradient", lr=True)
    with pytest.raises(ValueError, match=r"betas must be 2 numbers.*not \[0.9, 0.99, 0.9\]"):
        Stage("s", optimizer="adam", betas=(0.9, 0.99, 0.9))
    with pytest.raises(ValueError, match="polyak"):
        Stage("s", optimizer="subgradient", lr=1.0, step_rule="polyak", f_star=0.0,
              adjust=[{"rule": "trial", "candidates": [{"step_rule": "sqrt"}, {"step_rule": "polyak"}], "epochs": 1}],
              epochs=2)
    # still fine: an infinite default (Prodigy's growth_rate), booleans where booleans belong, Polyak
    # steps in a full-batch stage
    Stage("s", optimizer="prodigy", growth_rate=float("inf"))
    Stage("s", optimizer="adam", amsgrad=True, lr=1e-3, betas=(0.8, 0.9))
    Stage("s", optimizer="subgradient", batch_size="full", lr=1.0, step_rule="polyak", f_star=0.0)


def test_relative_data_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """Like `base =`: a same-named file in the working directory is never taken instead."""
    (tmp_path / "exp").mkdir()
    write_rows(tmp_path / "exp" / "reviews.jsonl", reviews(50, seed=1))
    write_rows(tmp_path / "reviews.jsonl", reviews(90, seed=9))  # an unrelated file in the working directory
    (tmp_path / "exp" / "job.toml").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("exp/job.toml")
    assert os.path.realpath(cfg["data"]["train"]) == os.path.realpath(tmp_path / "exp" / "reviews.jsonl")
    (tmp_path / "exp" / "reviews.jsonl").unlink()  # not there: an error, not the working directory's file
    cfg = load_config("exp/job.toml")
    assert os.path.realpath(cfg["data"]["train"]) == os.path.realpath(tmp_path / "exp" / "reviews.jsonl")


def test_cli_seed_out_of_torch_range_is_refused_in_one_line(job_dir, capsys):
    (job_dir / "job.toml").write_text(JOB)
    run = job_dir / "run"
    rc = main(["train", "--config", str(job_dir / "job.toml"), "--run-dir", str(run), "--quiet", "--seed", str(2**64)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--seed" in err, err
    assert not run.exists()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_an_empty_run_dir_is_refused_in_one_line(job_dir, capsys, monkeypatch, command):
    """``--run-dir ""`` is a mistake (an unset variable), not a request for the default directory."""
    (job_dir / "job.toml").write_text(JOB)
    monkeypatch.chdir(job_dir)
    extra = ["--trials", "1"] if command == "tune" else []
    rc = main([command, "--config", str(job_dir / "job.toml"), "--run-dir", "", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--run-dir must name a directory" in err, err
    assert not (job_dir / "runs").exists()
