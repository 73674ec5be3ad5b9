"""oxoptim tune: search spaces, start-up checks, the Worker (reports, pruning, cross-validation,
the test split never seen), the CLI end to end on SQLite, resume after a killed coordinator, and
two workers sharing one study on a real PostgreSQL server with one of them killed."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")

from oxoptim.training.config import DEFAULT_CONFIG_TOML, _toml_loads, parse_config  # noqa: E402
from oxoptim.training.data import build_text_data, cv_fold, fold_indices  # noqa: E402
from oxoptim.training.errors import ConfigError  # noqa: E402
from oxoptim.training.search_space import find_params  # noqa: E402
from oxoptim.training.toml_writer import dumps  # noqa: E402
from oxoptim.training.tune import Worker, make_plan, open_study  # noqa: E402
from oxoptim.training.tune_report import compute_spent  # noqa: E402
from postgres_server import postgres_bin, postgres_server  # noqa: E402
from training_jobs import TINY_DATA, reviews, run_cli, write_rows  # noqa: E402

PLAN = """
seed = 1
threads = 1
checkpoint_every = 0

[tune]
trials = {trials}
pruner = {pruner}
final_seeds = {final_seeds}
heartbeat = 1
""" + TINY_DATA.replace("{train}", "reviews.jsonl") + """
[model]
embed_dim = 8
hidden = {{ choice = [8, 16], default = 8 }}
dropout = 0.1

[[stages]]
name = "warm"
optimizer = {{ choice = ["adamw", "lion", "sgd"], default = "adamw" }}
epochs = {epochs}
batch_size = {{ choice = [16, 32], default = 16 }}
lr = {{ log_uniform = [1e-3, 3e-2], default = 1e-2 }}
adjust = [{{ rule = "restore_best", monitor = "val_accuracy" }}]
"""


# The smallest model and one-epoch stage the plans below search around.
WARM_STAGE = """[model]
embed_dim = 8
hidden = 8
[[stages]]
name = "warm"
epochs = 1
"""


def write_plan(tmp_path, n_reviews=240, trials=6, pruner='"median"', final_seeds=2, epochs=3):
    rows = [(t, 5 if label == "pos" else 1) for t, label in reviews(n_reviews, seed=5)]
    write_rows(tmp_path / "reviews.jsonl", rows, text_key="review", label_key="stars")
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.format(trials=trials, pruner=pruner, final_seeds=final_seeds, epochs=epochs))
    return path


# ----- search spaces and start-up checks --------------------------------------------------------

def test_space_names_kinds_and_defaults():
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][0]["lr"] = {"log_uniform": [1e-4, 1e-2], "default": 3e-3}
    raw["stages"][1]["optimizer"] = {"choice": ["adamw", "lion"], "default": "adamw"}
    raw["stages"][1]["adjust"][1]["patience"] = {"int": [1, 3], "default": 2}
    raw["model"]["hidden"] = {"int": [32, 128], "step": 32, "default": 64}
    raw["stages"][0]["lr_schedule"] = {"choice": ["cosine", {"name": "linear", "warmup": 0.1}], "default": "cosine"}
    params = {p.name: p for p in find_params(raw)}
    assert set(params) == {"explore.lr", "swa.optimizer", "swa.adjust.1.patience", "model.hidden",
                           "explore.lr_schedule"}
    assert params["model.hidden"].contains(96) and not params["model.hidden"].contains(100)
    assert params["explore.lr_schedule"].encoded_choices and not params["swa.optimizer"].encoded_choices
    plan = make_plan(raw)
    assert plan.settings.direction == "maximize" and plan.settings.trials == 24
    # the defaults are the hand-written plan: the job they make is the default job
    assert plan.job(plan.defaults) == parse_config(_toml_loads(DEFAULT_CONFIG_TOML))


@pytest.mark.parametrize("spec, message", [
    ({"log_uniform": [0.0, 1e-2]}, "needs low > 0"),
    ({"uniform": [0.5, 0.1]}, "needs low < high"),
    ({"int": [1.5, 3]}, "two finite integers"),
    ({"choice": []}, "non-empty list"),
    ({"choice": [1, 1]}, "lists a value twice"),
    ({"uniform": [0.1, 0.5], "choice": [1]}, "one distribution per setting"),
    ({"uniform": [0.1, 0.5], "defualt": 0.2}, "did you mean 'default'"),
    ({"uniform": [0.1, 0.5], "default": 0.7}, "is not in uniform"),
    ({"uniform": [0.1, 0.5], "step": 2}, "step is a positive integer of an int distribution"),
])
def test_bad_distributions_name_the_setting(spec, message):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][0]["weight_decay"] = spec
    with pytest.raises(ConfigError, match="explore.weight_decay") as e:
        make_plan(raw)
    assert message in str(e.value)


@pytest.mark.parametrize("spec", [{"int": [1, 3], "step": 5}, {"int": [1, 10], "step": 4}])
def test_an_int_step_that_does_not_reach_the_high_bound_is_refused(spec):
    """Optuna replaces [1, 10] with step 4 by [1, 9] (and [1, 3] with step 5 by [1, 1]): the high
    bound the plan names is never tried, and a space of one value searches nothing."""
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["model"]["hidden"] = spec
    with pytest.raises(ConfigError, match=r"model.hidden: .*step") as e:
        make_plan(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", [{"uniform": [1e308, 1.7e308]}, {"log_uniform": [1e200, 1e300]}])
def test_huge_float_bounds_are_a_config_error_not_an_overflow(spec):
    """The value checked between the bounds overflowed to inf (int(inf): OverflowError, a traceback)."""
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["model"]["dropout"] = spec  # a fraction: these bounds are refused, in one line
    with pytest.raises(ConfigError, match="model.dropout"):
        make_plan(raw)


def test_a_plan_whose_best_plan_cannot_be_written_as_toml_is_refused_at_start_up():
    """A seed of 2**63 or more runs (torch.manual_seed takes up to 2**64 - 1), but best.toml cannot
    hold it (TOML integers are 64-bit): the search ran every trial, then ended in a traceback."""
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["seed"] = 2 ** 63
    raw["stages"][0]["lr"] = {"log_uniform": [1e-4, 1e-2]}
    with pytest.raises(ConfigError, match=r"best\.toml.*64-bit") as e:
        make_plan(raw)
    assert "\n" not in str(e.value)
    raw["seed"] = 2 ** 63 - 1
    make_plan(raw)


@pytest.mark.integration
def test_every_candidate_is_checked_at_start_up(tmp_path):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][1]["optimizer"] = {"choice": ["adamw", "adamww"]}  # the second is misspelled
    with pytest.raises(ConfigError, match=r"swa.optimizer = \"adamww\".*did you mean 'adamw'"):
        make_plan(raw)
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][0]["lr"] = {"uniform": [-1e-3, 1e-2]}  # the low bound is not a valid lr
    with pytest.raises(ConfigError, match="explore.lr = -0.001"):
        make_plan(raw)
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["tune"] = {"pruner": "medain"}
    raw["stages"][0]["lr"] = {"uniform": [1e-3, 1e-2]}
    with pytest.raises(ConfigError, match="did you mean 'median'"):
        make_plan(raw)
    with pytest.raises(ConfigError, match="nothing to search"):
        make_plan(_toml_loads(DEFAULT_CONFIG_TOML))
    some = _toml_loads(DEFAULT_CONFIG_TOML)
    some["stages"][0]["lr"] = {"uniform": [1e-3, 1e-2], "default": 3e-3}
    some["stages"][1]["lr"] = {"uniform": [1e-3, 1e-2]}
    with pytest.raises(ConfigError, match="not for swa.lr"):
        make_plan(some)
    # from the command line: one line, exit status 2, nothing made
    path = write_plan(tmp_path)
    path.write_text(path.read_text().replace('"sgd"]', '"sgdd"]'))
    r = run_cli(["tune", "--config", str(path), "--run-dir", str(tmp_path / "run")], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "did you mean 'sgd'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", [DEFAULT_CONFIG_TOML, open(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                         "lm.toml"), encoding="utf-8").read()])
def test_toml_writer_round_trips(text):
    cfg = parse_config(_toml_loads(text))
    assert _toml_loads(dumps(cfg, "a header\nof two lines")) == cfg
    odd = {"s": 'quote " back\\slash \n 中文', "f": [1e-300, -0.0, 2.5e20, math.inf], "b": True,
           "t": {"odd key": 1, "nested": {"x": [1, 2]}}, "rows": [{"a": 1}, {"a": {"b": "c"}}], "e": {}}
    back = _toml_loads(dumps(odd))
    assert back == odd and math.copysign(1.0, back["f"][1]) == -1.0
    assert _toml_loads(dumps({"del\x7f": "a\x7fb\x00"})) == {"del\x7f": "a\x7fb\x00"}
    with pytest.raises(ValueError, match="64-bit"):
        dumps({"big": 2 ** 63})


# ----- the Worker ------------------------------------------------------------------------------

class FakeJob:
    """Stands in for run_job: validation accuracy per epoch from the trial's lr, records the calls."""

    def __init__(self, epochs=4):
        self.calls, self.epochs = [], epochs

    def __call__(self, cfg, run_dir, quiet=False, on_record=None, evaluate_test=True, fold=None, announce=True):
        self.calls.append({"lr": cfg["stages"][0]["lr"], "evaluate_test": evaluate_test, "fold": fold,
                           "seed": cfg["seed"]})
        lr = cfg["stages"][0]["lr"]
        acc = 0.0
        for e in range(self.epochs):
            acc = min(1.0, lr * 10 * (e + 1) / self.epochs) + (fold[1] * 0.01 if fold else 0.0)
            on_record({"global_epoch": e + 1, "val_accuracy": acc})
        return {"val": {"accuracy": acc, "loss": 1 - acc}}


def fake_plan(tune: dict, epochs=4):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], epochs=epochs, lr={"uniform": [0.0, 0.1]})]
    raw["tune"] = dict({"heartbeat": 1}, **tune)
    return make_plan(raw)


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 2 ** 63])
def test_any_seed_the_job_takes_seeds_the_sampler(tmp_path, seed):
    """[tune] seed (by default the plan's seed, any integer torch.manual_seed takes) seeded Optuna's
    sampler as it was: numpy refused one outside [0, 2**32 - 1] with a traceback, once the study
    file was made."""
    plan = fake_plan({"seed": seed})
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "s", create=True)
    Worker(plan, study, str(tmp_path), trials=2, say=lambda *a: None, run_job=FakeJob(epochs=1)).work()
    assert len(study.get_trials()) == 2
    again = fake_plan({"seed": seed})  # a one-process search is reproducible with it
    study2 = open_study(again, f"sqlite:///{tmp_path}/s2.db", "s", create=True)
    Worker(again, study2, str(tmp_path / "2"), trials=2, say=lambda *a: None, run_job=FakeJob(epochs=1)).work()
    assert [t.params for t in study2.get_trials()] == [t.params for t in study.get_trials()]


def test_worker_reports_prunes_and_never_tests(tmp_path):
    plan = fake_plan({"pruner": {"name": "median", "startup_trials": 2, "warmup_epochs": 0}, "seed": 3})
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "w", create=True)
    job = FakeJob()
    Worker(plan, study, str(tmp_path), trials=12, say=lambda *a: None, run_job=job).work()
    trials = study.get_trials()
    assert len(trials) == 12 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(not c["evaluate_test"] for c in job.calls)  # the search never sees the test split
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, "a median pruner with these scores must prune some trials"
    for t in trials:
        lr = t.params["explore.lr"]
        expected = [min(1.0, lr * 10 * (e + 1) / 4) for e in range(4)]
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps)))  # a report after every epoch
        assert [t.intermediate_values[s] for s in steps] == pytest.approx(expected[:len(steps)])
        assert t.user_attrs["epochs_run"] == len(steps)
        if t.state.name == "PRUNED":
            assert len(steps) < 4  # stopped before the plan's end
            # pruned only when below the median of the earlier completed trials at that epoch
            s = steps[-1]
            earlier = [u.intermediate_values[s] for u in trials if u.number < t.number and u.state.name == "COMPLETE"]
            assert len(earlier) >= 2 and t.intermediate_values[s] < statistics.median(earlier)
        else:
            assert t.value == pytest.approx(expected[-1])
    spent = compute_spent(study)
    assert spent["epochs_run"] == sum(t.user_attrs["epochs_run"] for t in trials)
    assert spent["epochs_unpruned"] == 4 * len(trials) and spent["fraction"] < 1


@pytest.mark.parametrize("default", [{"warmup": 0.1, "name": "cosine"}, {"name": "cosine", "warmup": 0}])
def test_the_baseline_runs_when_a_table_default_lists_its_keys_in_another_order(tmp_path, default):
    """The hand-written plan (trial 0) is enqueued as the matching choice's own encoding: a
    default with the keys in another order, or 0 for 0.0, is the same choice, not a failed trial."""
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], epochs=2, lr={"uniform": [0.0, 0.1], "default": 0.05},
                          lr_schedule={"choice": [{"name": "constant"}, {"name": "cosine", "warmup": 0.1 if
                                                   default["warmup"] else 0.0}], "default": default})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 1}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "order", create=True)
    Worker(plan, study, str(tmp_path), trials=2, say=lambda *a: None, run_job=FakeJob()).work()
    first = study.get_trials()[0]
    assert first.state.name == "COMPLETE" and first.user_attrs["baseline"], first.user_attrs.get("error")
    assert json.loads(first.params["explore.lr_schedule"]) == default


def test_a_trial_stopped_by_ctrl_c_runs_again_the_baseline_too(tmp_path):
    """Ctrl-C in trial 0 (the hand-written plan) records it as failed and queues it again, as a
    killed worker's trial is: the same command run again runs the baseline, which the summary names."""
    from oxoptim.training.tune import baseline_trial

    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], epochs=2, lr={"uniform": [0.0, 0.1], "default": 0.05})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none"}))
    url = f"sqlite:///{tmp_path}/s.db"

    def interrupted(cfg, run_dir, quiet=False, on_record=None, **kw):
        on_record({"global_epoch": 1, "val_accuracy": 0.1})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Worker(plan, open_study(plan, url, "c", create=True), str(tmp_path), 3, lambda *a: None, interrupted).work()
    study = open_study(plan, url, "c", create=True)  # the same command again
    Worker(plan, study, str(tmp_path), 3, lambda *a: None, FakeJob()).work()
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] + ["COMPLETE"] * 3
    assert trials[1].params == {"explore.lr": 0.05} and trials[1].system_attrs["failed_trial"] == 0
    assert baseline_trial(study).number == 1


def test_worker_cross_validation(tmp_path):
    plan = fake_plan({"cv_folds": 3, "pruner": "none"})
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "cv", create=True)
    job = FakeJob()
    Worker(plan, study, str(tmp_path), trials=2, say=lambda *a: None, run_job=job).work()
    assert [c["fold"] for c in job.calls] == [(3, 0), (3, 1), (3, 2)] * 2
    for t in study.get_trials():
        lr = t.params["explore.lr"]
        scores = [min(1.0, lr * 10) + 0.01 * i for i in range(3)]
        assert t.user_attrs["fold_scores"] == pytest.approx(scores)
        assert t.value == pytest.approx(sum(scores) / 3)
        assert sorted(t.intermediate_values) == [0, 1, 2]  # the running mean after each fold
        assert t.user_attrs["epochs_run"] == 12 and t.user_attrs["epochs_planned"] == 12


def test_cv_folds_come_from_the_training_split_only(tmp_path):
    write_rows(tmp_path / "r.jsonl", reviews(200, seed=2))
    data = build_text_data(train=str(tmp_path / "r.jsonl"), max_len=12, split=(0.6, 0.2, 0.2), seed=0)
    folds = fold_indices(len(data["raw"]["train"]), 4, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(data["raw"]["train"])))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    outside = {t for t, _ in data["raw"]["val"] + data["raw"]["test"]}
    seen_as_val = []
    for i in range(4):
        d = cv_fold(data, 4, i, seed=0, max_len=12)
        train, val = [t for t, _ in d["raw"]["train"]], [t for t, _ in d["raw"]["val"]]
        assert not set(train) & set(val) and not (set(train) | set(val)) & outside
        assert len(train) + len(val) == len(data["raw"]["train"])
        # the vocabulary is the fold's training texts' characters, nothing of the held-out fold
        assert set(d["vocab"].itos[2:]) == {c for t in train for c in t}
        assert len(d["train"]) == len(train) and len(d["val"]) == len(val)
        seen_as_val += val
    assert sorted(seen_as_val) == sorted(t for t, _ in data["raw"]["train"])


# ----- the CLI on SQLite ---------------------------------------------------------------------------

@pytest.mark.integration
def test_tune_end_to_end_two_jobs(tmp_path):
    plan = write_plan(tmp_path, trials=6, pruner='{ name = "median", startup_trials = 2, warmup_epochs = 0 }')
    run = tmp_path / "run"
    r = run_cli(["tune", "--config", str(plan), "--run-dir", str(run), "--jobs", "2"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("best.toml", "trials.md", "trials.csv", "tune_summary.json", "study.db",
                 "optimization_history.png", "param_importances.png", "intermediate_values.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "tune_summary.json").read_text())
    assert summary["missing_outputs"] == {}
    study = optuna.load_study(study_name="oxoptim", storage=f"sqlite:///{run}/study.db")
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6  # exactly the trials asked for, between the two processes
    # the two processes' samplers are seeded apart: no settings proposed twice
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 6
    first = study.trials[0]
    assert first.user_attrs["baseline"] and first.params == {"model.hidden": 8, "warm.optimizer": "adamw",
                                                             "warm.batch_size": 16, "warm.lr": 1e-2}
    for t in finished:  # the search never evaluated the test split
        records = (tmp_path / t.user_attrs["run_dir"] / "metrics.jsonl").read_text()
        assert "val_accuracy" in records and "test" not in records
        if t.state.name == "COMPLETE":
            s = json.loads((tmp_path / t.user_attrs["run_dir"] / "summary.json").read_text())
            assert "test" not in s and "val" in s
    # the best plan reproduces its trial's validation score exactly when trained from best.toml
    best = study.best_trial
    r2 = run_cli(["train", "--config", str(run / "best.toml"), "--run-dir", str(tmp_path / "again"), "--quiet"],
                 cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["val"]["accuracy"] == best.value
    # the final runs: best and hand-written plans, 2 seeds each, tested once each
    final = summary["final"]
    assert set(final) == {"best", "default"}
    for label in final:
        assert [x["seed"] for x in final[label]["runs"]] == [2, 3]  # not the trials' seed 1
        assert all(x["test"] is not None for x in final[label]["runs"])
    assert summary["compute"]["epochs_run"] == sum(t.user_attrs["epochs_run"] for t in finished)
    assert "best: trial" in r.stdout and "compute:" in r.stdout


def _wait_for(predicate, timeout, what):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _trials(url, name="oxoptim"):
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except Exception:  # not created yet
        return []


def _spawn(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "oxoptim")] + list(args)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_mid_trial(proc, read_trials, epochs, mine=lambda t: True):
    """SIGKILLs ``proc`` once it has finished a trial and is inside another with epochs to spare,
    and returns that trial. One read as running in its last epoch may be finishing as the signal
    lands, so the victim must have reported at most epochs - 3; read again after the kill, it must
    not have finished (it is running, or failed as stale by a surviving worker)."""
    seen = {}

    def running_mid_trial():
        ts = [t for t in read_trials() if mine(t)]
        busy = [t for t in ts if t.state.name == "RUNNING" and 1 <= len(t.intermediate_values) <= epochs - 3]
        if busy and any(t.state.name == "COMPLETE" for t in ts):
            seen["victim"] = busy[0]
        return seen

    _wait_for(running_mid_trial, 300, "a trial done and another one mid-way")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    victim = seen["victim"]
    after = next(t for t in read_trials() if t.number == victim.number)
    assert after.state.name in ("RUNNING", "FAIL"), (after.state.name, len(victim.intermediate_values))
    return victim


def _check_killed_trial_retried(trials, n, victim_trial):
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n
    failed = [t for t in trials if t.state.name == "FAIL" and not t.user_attrs.get("surplus")]
    assert [t.number for t in failed] == [victim_trial.number]  # only the running trial was lost
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == victim_trial.number]
    assert len(retries) == 1 and retries[0].params == victim_trial.params  # and it ran again, once


@pytest.mark.integration
def test_resume_after_the_coordinator_is_killed(tmp_path):
    plan = write_plan(tmp_path, n_reviews=600, trials=4, pruner='"none"', final_seeds=0, epochs=6)
    run = tmp_path / "run"
    url = f"sqlite:///{run}/study.db"
    args = ["tune", "--config", str(plan), "--run-dir", str(run)]
    p = _spawn(args, tmp_path)
    victim = _kill_mid_trial(p, lambda: _trials(url), epochs=6)
    r = run_cli(args, cwd=tmp_path, timeout=600)  # the same command again continues the study
    assert r.returncode == 0, r.stdout + r.stderr
    _check_killed_trial_retried(_trials(url), 4, victim)
    # the restarted sampler does not replay the first run's proposals
    lrs = [t.params["warm.lr"] for t in _trials(url) if t.number != victim.number]  # its retry stays
    assert len(set(lrs)) == len(lrs)
    assert (run / "best.toml").is_file()



def test_continuing_a_study_whose_data_changed_is_refused(tmp_path, capsys):
    """As `oxoptim train --resume` refuses a run whose data changed: trials on the old and the new
    data would be compared as one search. The same data continues the study."""
    from oxoptim.__main__ import main
    from oxoptim.training.tune import load_plan

    path = write_plan(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    url = f"sqlite:///{run}/study.db"  # where `oxoptim tune --run-dir run` keeps its study
    open_study(load_plan(str(path)), url, "oxoptim", create=True)
    open_study(load_plan(str(path)), url, "oxoptim", create=True)  # the same data: continued
    rows = (tmp_path / "reviews.jsonl").read_text().splitlines()
    (tmp_path / "reviews.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # one review fewer
    with pytest.raises(ConfigError, match="was searched on other data"):
        open_study(load_plan(str(path)), url, "oxoptim", create=False)  # a worker is refused too
    capsys.readouterr()
    rc = main(["tune", "--config", str(path), "--run-dir", str(run), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "study 'oxoptim'" in err[0] and "was searched on other data: the data files" in err[0]
    assert not (run / "trials").exists()

def test_a_data_change_that_only_a_later_candidate_reads_is_refused(tmp_path):
    """The data fingerprint reads every searched [data] setting's candidates, not the first alone:
    texts changed past the first candidate's max_len are other data for the trials with a longer one."""
    from oxoptim.training.tune import load_plan

    rows = [(t * 3, 5 if label == "pos" else 1) for t, label in reviews(120, seed=5)]
    write_rows(tmp_path / "reviews.jsonl", rows, text_key="review", label_key="stars")
    path = tmp_path / "plan.toml"
    path.write_text("seed = 1\n[tune]\ntrials = 1\n" + TINY_DATA.replace("{train}", "reviews.jsonl").replace(
        "max_len = 12", "max_len = { choice = [12, 100] }") + WARM_STAGE + """
lr = { log_uniform = [1e-3, 3e-2] }
""")
    url = f"sqlite:///{tmp_path}/study.db"
    open_study(load_plan(str(path)), url, "oxoptim", create=True)
    # the same characters, so the same vocabulary; the first 12 of every review unchanged
    write_rows(tmp_path / "reviews.jsonl", [(t[:12] + t[12:][::-1], y) for t, y in rows], text_key="review",
               label_key="stars")
    with pytest.raises(ConfigError, match="was searched on other data"):
        open_study(load_plan(str(path)), url, "oxoptim", create=True)


# ----- PostgreSQL: two workers on one study, one killed ------------------------------------------

@pytest.fixture(scope="module")
def postgres_url():
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: install Debian's postgresql package (.ci/run does)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    with postgres_server() as url:
        yield url


@pytest.mark.integration
def test_two_workers_share_a_postgres_study_and_survive_a_kill(tmp_path, postgres_url):
    n = 6  # trials long enough (several seconds) for worker b to join, finish one and start another
    plan = write_plan(tmp_path, n_reviews=1500, trials=n, pruner='"none"', final_seeds=0, epochs=24)
    common = ["tune", "--config", str(plan), "--storage", postgres_url, "--study", "shared"]
    a = _spawn(common + ["--run-dir", str(tmp_path / "a")], tmp_path)
    _wait_for(lambda: _trials(postgres_url, "shared"), 120, "the study")
    b = _spawn(common + ["--run-dir", str(tmp_path / "b"), "--worker-only"], tmp_path)
    victim = _kill_mid_trial(b, lambda: _trials(postgres_url, "shared"), epochs=24,
                             mine=lambda t: t.user_attrs.get("worker", "").endswith(f":{b.pid}"))
    out, _ = a.communicate(timeout=600)
    assert a.returncode == 0, out
    trials = _trials(postgres_url, "shared")
    _check_killed_trial_retried(trials, n, victim)
    workers = {t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2  # both did trials
    # no settings ran twice but the killed trial's retry (the workers' samplers are seeded apart)
    settings = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    assert len(set(settings)) == len(settings)
    assert (tmp_path / "a" / "best.toml").is_file()


def test_a_fold_runs_through_the_real_job(tmp_path):
    from oxoptim.training.job import run_job
    from oxoptim.training.tune import load_plan

    plan = load_plan(str(write_plan(tmp_path, epochs=2)))
    job = plan.job(plan.defaults)
    records = []
    summary = run_job(job, str(tmp_path / "fold"), quiet=True, on_record=records.append, evaluate_test=False,
                      fold=(3, 1), announce=False)
    kept = summary["data"]["kept"]["train"]
    assert summary["fold"] == [3, 1] and "test" not in summary
    assert summary["data"]["fold"] == {"k": 3, "index": 1, "train": kept - kept // 3, "val": kept // 3}
    assert [r["global_epoch"] for r in records] == [1, 2]


@pytest.mark.integration
def test_tune_the_language_model_job(tmp_path):
    """A search over fine-tuning settings of the LM job: every trial reuses one pretrained model
    (pretrained once, under the lock), the stages are named by phase and stage."""
    from test_training_lm import TINY

    raw = _toml_loads(TINY)
    plan = tmp_path / "lm_plan.toml"
    plan.write_text(TINY.replace('[finetune]', '[tune]\ntrials = 3\npruner = "none"\nfinal_seeds = 1\n\n[finetune]', 1))
    lr = raw["finetune"]["stages"][1]["lr"]
    head, tail = plan.read_text().split('name = "all"', 1)
    tail = re.sub(r"(?m)^lr = .*$", f"lr = {{ log_uniform = [{lr / 3!r}, {lr * 3!r}] }}", tail, count=1)
    plan.write_text(head + 'name = "all"' + tail)
    run = tmp_path / "run"
    r = run_cli(["tune", "--config", str(plan), "--run-dir", str(run)], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study = optuna.load_study(study_name="oxoptim", storage=f"sqlite:///{run}/study.db")
    assert [set(t.params) for t in study.trials] == [{"finetune.all.lr"}] * 3
    reused = [json.loads((tmp_path / t.user_attrs["run_dir"] / "summary.json").read_text())["pretrain"]["reused"]
              for t in study.trials]
    assert reused == [False, True, True]
    summary = json.loads((run / "tune_summary.json").read_text())
    assert summary["final"]["best"]["runs"][0]["test"] is not None



def test_trials_and_final_runs_of_the_language_model_job_share_one_pretraining_cache(tmp_path, monkeypatch):
    """Each trial and final run has a folder of its own; the pretrained models are the study's,
    in <run dir>/pretrained, so one pretraining serves them all (not one per folder's parent)."""
    from oxoptim.training import lm_job
    from oxoptim.training.tune import final_runs
    from test_training_lm import TINY

    seen = []

    def pretraining(cfg, corpus, pdir, quiet, say):  # where the run looks for its pretrained model
        seen.append(pdir)
        raise optuna.TrialPruned("stub: not pretrained")

    monkeypatch.setattr(lm_job, "_pretrain_locked", pretraining)
    raw = _toml_loads(TINY)
    lr = raw["finetune"]["stages"][1]["lr"]
    raw["finetune"]["stages"][1]["lr"] = {"log_uniform": [lr / 3, lr * 3], "default": lr}
    plan = make_plan(dict(raw, tune={"pruner": "none", "final_seeds": 1, "heartbeat": 1}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "lm", create=True)
    Worker(plan, study, str(tmp_path), trials=1, say=lambda *a: None).work()
    study.add_trial(optuna.trial.create_trial(params={"finetune.all.lr": lr * 2}, value=0.9, user_attrs={"seed": 0},
                                              distributions=study.trials[0].distributions))
    final = final_runs(plan, study, str(tmp_path), say=lambda *a: None)
    assert set(final) == {"best", "default"}  # two plans' final runs, and the trial
    assert len(seen) == 3 and {os.path.dirname(d) for d in seen} == {str(tmp_path / "pretrained")}


@pytest.mark.parametrize("spaces, message", [
    # a bad first choice or lower bound fails the base plan itself: the setting is still named
    ({"optimizer": {"choice": ["adamww", "adamw"]}}, 'with explore.optimizer = "adamww": stage \'explore\': '
     "unknown optimizer 'adamww'"),
    ({"batch_size": {"int": [0, 64]}}, "with explore.batch_size = 0: "),
    ({"optimizer": {"choice": ["adamw", "adamww"]}}, 'with explore.optimizer = "adamww": '),
    # two bad first choices: each is refused on its own (the first in the plan is named)
    ({"optimizer": {"choice": ["adamww", "adamw"]}, "batch_size": {"int": [0, 64]}},
     'with explore.optimizer = "adamww": stage \'explore\': unknown optimizer'),
    # nothing parses, whatever the values: the plan at its first candidates is listed
    ({"optimizer": {"choice": ["adamww", "adamwww"]}},
     'the plan with every searched setting at its first candidate (model.hidden = 8, explore.optimizer = "adamww") '
     "fails, as does every combination tried: "),
])
def test_a_bad_first_candidate_names_its_setting(spaces, message):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["model"]["hidden"] = {"choice": [8, 16]}  # searched first: not the culprit
    raw["stages"] = [dict(raw["stages"][0], **spaces)]
    with pytest.raises(ConfigError) as e:
        make_plan(raw)
    assert message in str(e.value), str(e.value)
    assert "model.hidden" not in str(e.value) or "first candidate (" in str(e.value)


@pytest.mark.parametrize("order", [0, 1])
def test_the_start_up_verdict_does_not_depend_on_the_order_of_the_choices(order):
    """A candidate passes when some combination of the others' candidates takes it, so listing the
    choices in another order changes nothing: values infeasible only together are left to the
    trials (which prune them), a value that no combination takes is refused."""
    def plan(stage):
        raw = _toml_loads(DEFAULT_CONFIG_TOML)
        raw["stages"] = [dict(raw["stages"][0], lr=1e-3, **stage)]
        return make_plan(dict(raw, tune={"pruner": "none"}))

    def listed(*values):
        return list(values) if order == 0 else list(reversed(values))

    plan({"epochs": 2, "batch_size": {"choice": listed(16, 2)}, "accumulate": {"choice": listed(1, 4)}})
    plan({"epochs": {"int": [2, 6]}, "adjust": [{"rule": "trial", "candidates": [1e-3, 3e-3],
                                                 "epochs": {"choice": listed(1, 2)}}]})
    with pytest.raises(ConfigError, match=re.escape("with explore.epochs = 1: stage 'explore': trial epochs")):
        plan({"epochs": {"choice": listed(1, 6)}, "adjust": [{"rule": "trial", "candidates": [1e-3, 3e-3],
                                                              "epochs": {"choice": listed(1, 2)}}]})
    with pytest.raises(ConfigError, match=re.escape("with explore.accumulate = 32: ")):  # above every batch size
        plan({"epochs": 2, "batch_size": {"choice": listed(16, 2)}, "accumulate": {"choice": listed(1, 32)}})


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["tune"].update(metric="train_loss"), "unknown metric 'train_loss'"),
    (lambda raw: raw["model"].update(hidden={"uniform": [8, 16]}), "hidden must be an integer"),
    (lambda raw: raw["tune"].update(pruner={"name": "hyperband", "min_resource": 0}), "min_resource must be >= 1"),
    (lambda raw: raw["tune"].update(pruner={"name": "hyperband", "reduction_factor": 1}),
     "reduction_factor must be >= 2"),
    (lambda raw: raw["data"].update(split_seed={"int": [0, 3]}), "data.split_seed cannot be searched"),
    (lambda raw: raw.update(seed={"int": [0, 3]}), "seed cannot be searched"),
    # the rows a column lacks are dropped: another column reads other rows, so another split
    (lambda raw: raw["data"].update(text_column={"choice": ["text", "title"]}), "data.text_column cannot be searched"),
    (lambda raw: raw["data"].update(label_column={"choice": ["label", "stars"]}),
     "data.label_column cannot be searched"),
])
def test_start_up_refuses_plans_whose_trials_would_all_fail(change, message):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["tune"] = {}
    raw["stages"][0]["lr"] = {"log_uniform": [1e-4, 1e-2]}
    change(raw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_plan(raw)



@pytest.mark.parametrize("change, message", [
    # the whole [data] table searched, its choices on different splits: other trials would train on
    # the final plan's test examples
    (lambda d: {"choice": [dict(d, split_seed=0), dict(d, split_seed=1)], "default": dict(d, split_seed=0)},
     "data.split_seed cannot be searched"),
    (lambda d: {"choice": [dict(d, max_len=50), dict(d, max_len=100)]}, "data.split cannot be searched"),
    (lambda d: dict(d, split=[{"uniform": [0.7, 0.8]}, 0.1, 0.1]),
     "data.split cannot be searched: it decides which examples are validation and test (data.split.0 is part of it)"),
])
def test_fixed_settings_cannot_be_searched_inside_a_table_or_in_part(change, message):
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][0]["lr"] = {"log_uniform": [1e-4, 1e-2], "default": 1e-3}
    raw["data"] = change(raw["data"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_plan(raw)


@pytest.mark.parametrize("line, message", [
    ('[tune]\nmetric = ["val_accuracy"]', "[tune] unknown metric ['val_accuracy']"),
    ('[tune]\npruner = { name = ["median"] }', "[tune] unknown pruner ['median']"),
    ('[model]\nembed_dim = 8\nhidden = { choice = [8, 1979-05-27] }', "model.hidden: choice values are numbers, "
     "strings, booleans, arrays or tables, not TOML dates or times (1979-05-27)"),
    ('[model]\nembed_dim = 8\nhidden = { choice = [8, { at = 07:32:00 }] }', "not TOML dates or times (07:32:00)"),
])
def test_plan_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, line, message):
    """Not a traceback (an unhashable list, a date Optuna cannot store): exit status 2, one line."""
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text("seed = 1\n" + TINY_DATA.replace("{train}", "reviews.jsonl") + line + """
[[stages]]
name = "warm"
epochs = 1
lr = { log_uniform = [1e-3, 3e-2] }
""")
    capsys.readouterr()
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t").exists()

def test_settings_infeasible_together_prune_the_trial(tmp_path):
    """Each value is valid alone, the combination is not: the trial is pruned before training
    (it counts as finished, costs nothing), the search goes on."""
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], batch_size={"choice": [16, 2]}, accumulate={"choice": [1, 4]},
                          lr={"uniform": [0.0, 0.1]}, adversarial=0.0)]
    raw["tune"] = {"heartbeat": 1, "pruner": "none"}
    plan = make_plan(raw)
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "inf", create=True)
    lines = []
    Worker(plan, study, str(tmp_path), trials=12, say=lines.append, run_job=FakeJob()).work()
    infeasible = [t for t in study.trials if t.user_attrs.get("infeasible")]
    assert infeasible and all(t.state.name == "PRUNED" and t.params["explore.batch_size"] == 2
                              and t.params["explore.accumulate"] == 4 for t in infeasible)
    assert "accumulate (4) must be <= batch_size (2)" in infeasible[0].user_attrs["infeasible"]
    assert sum("infeasible" in line for line in lines) == len(infeasible)
    assert len(study.trials) == 12


def final_job(cfg, run_dir, quiet=False, announce=True):
    """A picklable stand-in for run_job in the final runs: scores from the seed and lr, and the process."""
    lr, seed = cfg["stages"][0]["lr"], cfg["seed"]
    return {"val": {"accuracy": lr + seed / 100}, "test": {"accuracy": lr - seed / 100, "pid": os.getpid()},
            "wall_time_s": 0.0}


def test_final_runs_on_worker_processes_are_the_runs_one_after_another(tmp_path):
    from oxoptim.training.tune import final_runs

    raw = _toml_loads(DEFAULT_CONFIG_TOML)  # a default lr: the hand-written plan is re-run too
    raw["stages"] = [dict(raw["stages"][0], epochs=4, lr={"uniform": [0.0, 0.1], "default": 0.05})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 3}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "f", create=True)
    Worker(plan, study, str(tmp_path), trials=3, say=lambda *a: None, run_job=FakeJob()).work()
    lines = {1: [], 2: []}
    out = {jobs: final_runs(plan, study, str(tmp_path), lines[jobs].append, run_job=final_job, jobs=jobs)
           for jobs in (1, 2)}
    pids = {jobs: {r["test"].pop("pid") for label in out[jobs] for r in out[jobs][label]["runs"]} for jobs in (1, 2)}
    assert pids[1] == {os.getpid()} and len(pids[2]) == 2 and os.getpid() not in pids[2]
    assert out[1] == out[2] and lines[1] == lines[2]  # same results, same order: best plan first, by seed
    assert list(out[2]) == ["best", "default"] and [r["seed"] for r in out[2]["best"]["runs"]] == [1, 2, 3]
    assert out[2]["default"]["values"] == {"explore.lr": 0.05}


def test_final_runs_of_a_search_that_kept_the_hand_written_plan_run_it_once(tmp_path):
    from oxoptim.training.tune import final_runs

    raw = _toml_loads(DEFAULT_CONFIG_TOML)  # the default lr scores 1.0 from the first epoch: nothing beats it
    raw["stages"] = [dict(raw["stages"][0], epochs=4, lr={"uniform": [0.0, 0.1], "default": 0.1})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 2}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "kept", create=True)
    Worker(plan, study, str(tmp_path), trials=3, say=lambda *a: None, run_job=FakeJob()).work()
    assert study.best_trial.number == 0 and study.best_trial.user_attrs["baseline"]
    calls = []

    def job(cfg, run_dir, quiet=False, announce=True):
        calls.append(cfg["seed"])
        return final_job(cfg, run_dir)

    out = final_runs(plan, study, str(tmp_path), lambda *a: None, run_job=job)
    assert calls == [1, 2]  # two seeds (not the trials' 0), once: not again for the hand-written plan
    assert out["default"]["same_as"] == "best"
    assert out["default"]["runs"] == out["best"]["runs"] and out["default"]["values"] == {"explore.lr": 0.1}


@pytest.mark.parametrize("cv_folds", [0, 3])
def test_final_runs_use_seeds_no_trial_trained_with(tmp_path, cv_folds):
    """The best plan's first final run must not be its selected trial re-run (that run's validation
    score is the maximum over the trials): both plans get the same seeds, none a trial's."""
    from oxoptim.training.tune import final_runs

    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["seed"] = 7
    raw["stages"] = [dict(raw["stages"][0], epochs=2, lr={"uniform": [0.0, 0.1], "default": 0.01})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 3, "cv_folds": cv_folds}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "seeds", create=True)
    job = FakeJob()
    Worker(plan, study, str(tmp_path), trials=3, say=lambda *a: None, run_job=job).work()
    trained = {t.user_attrs["seed"] for t in study.get_trials()} | {c["seed"] for c in job.calls}
    assert trained == {7}
    out = final_runs(plan, study, str(tmp_path), lambda *a: None, run_job=final_job)
    assert study.best_trial.number != 0 and list(out) == ["best", "default"]
    seeds = {label: [r["seed"] for r in out[label]["runs"]] for label in out}
    assert seeds["best"] == seeds["default"] == [8, 9, 10] and not trained & set(seeds["best"])


def flaky_final_job(cfg, run_dir, quiet=False, announce=True):
    """final_job, except that seed 2 diverges and seed 3 raises (picklable, for --jobs)."""
    from oxoptim.training.trainer import NonFiniteLoss

    if cfg["seed"] == 2:
        raise NonFiniteLoss("training diverged in stage 'explore' epoch 1, by step 3: the training loss is inf")
    if cfg["seed"] == 3:
        raise RuntimeError("disk full")
    return final_job(cfg, run_dir)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_final_run_that_fails_is_recorded_and_the_others_go_on(tmp_path, jobs):
    from oxoptim.training.tune import final_runs

    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], epochs=4, lr={"uniform": [0.0, 0.1], "default": 0.05})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 4}))
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "f", create=True)
    Worker(plan, study, str(tmp_path), trials=2, say=lambda *a: None, run_job=FakeJob()).work()
    lines = []
    out = final_runs(plan, study, str(tmp_path), lines.append, run_job=flaky_final_job, jobs=jobs)
    for label in ("best", "default"):
        runs = out[label]["runs"]
        assert [r["seed"] for r in runs] == [1, 2, 3, 4] and out[label]["failed"] == 2
        assert runs[1]["failed"] == "diverged" and "NonFiniteLoss: training diverged" in runs[1]["error"]
        assert runs[2] == {"seed": 3, "failed": "error", "error": "RuntimeError: disk full"}
        assert out[label]["test_accuracy"]["n"] == 2
        assert out[label]["test_accuracy"]["values"] == [runs[0]["test"]["accuracy"], runs[3]["test"]["accuracy"]]
        assert (tmp_path / "final" / label / "seed3" / "error.txt").exists()
    assert sum("diverged" in line for line in lines) == 2 and sum("failed: RuntimeError" in line for line in lines) == 2


def test_the_report_writes_the_summary_when_a_final_run_fails(tmp_path, capsys, monkeypatch):
    """Exit status 1 with one line saying which final runs did not finish, after the summary."""
    import oxoptim.training.job as job_module
    from oxoptim.training.tune_cli import _report

    monkeypatch.setattr(job_module, "run_job", flaky_final_job)
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [dict(raw["stages"][0], epochs=4, lr={"uniform": [0.0, 0.1]})]
    plan = make_plan(dict(raw, tune={"heartbeat": 1, "pruner": "none", "final_seeds": 2}))
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(plan, url, "r", create=True)
    Worker(plan, study, str(tmp_path), trials=1, say=lambda *a: None, run_job=FakeJob()).work()
    capsys.readouterr()
    lines = []
    assert _report(plan, study, str(tmp_path), url, 1, say=lines.append) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (not: plots not written)
    assert err == [f"oxoptim tune: error: 1 of 2 final runs did not finish (best seed 2 diverged); the means are over "
                   f"the finished ones, each run's outcome is in {tmp_path / 'tune_summary.json'}"], err
    final = json.loads((tmp_path / "tune_summary.json").read_text())["final"]
    assert final["best"]["failed"] == 1 and final["best"]["runs"][1]["failed"] == "diverged"
    assert any("(1 of 2 runs did not finish)" in line for line in lines), lines


def test_planned_epochs_counts_a_trial_rule_once_per_extra_candidate():
    from oxoptim.training.tune import planned_epochs

    job = {"stages": [{"epochs": 3, "adjust": [{"rule": "trial", "epochs": 1, "candidates": [1e-3, 3e-3]}]},
                      {"epochs": 2}]}
    assert planned_epochs(job, 0) == 3 + 1 + 2  # candidate 1's epoch again, then the stage goes on
    assert planned_epochs(job, 4) == 4 * 6


@pytest.mark.parametrize("name", ["tune.toml", "tune_full.toml"])
def test_the_example_plans_comments_name_the_final_seeds_and_pruning_epochs(name):
    """The comments in configs/tune*.toml say what the code does: the final runs' seeds (the ones
    after the plan's seed) and the epochs after which successive halving decides (its rungs are
    0-based report steps min_resource * reduction_factor ** k, so epochs one later)."""
    from oxoptim.training.tune import load_plan, seeds_for

    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    plan = load_plan(path)
    text = open(path, encoding="utf-8").read()
    said = re.search(r"(?m)^final_seeds = \d+ +#.* seeds ([\d, ]+\d)", text).group(1)
    assert [int(x) for x in said.split(",")] == seeds_for(plan.job(plan.defaults), plan.settings.final_seeds)
    p = plan.settings.pruner
    if p["name"] == "successive_halving":
        said = re.search(r"goes on past epochs (\d+), (\d+) and (\d+)", text).groups()
        assert [int(x) for x in said] == [p["min_resource"] * p["reduction_factor"] ** k + 1 for k in range(3)]


def test_fingerprint_ignores_what_does_not_change_the_search_and_urls_lose_passwords():
    from oxoptim.training.tune import redact

    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"][0]["lr"] = {"log_uniform": [1e-4, 1e-2]}
    a = make_plan(dict(raw, tune={"final_seeds": 3, "heartbeat": 30, "trials": 5}))
    b = make_plan(dict(raw, tune={"final_seeds": 1, "heartbeat": 5, "trials": 50}))
    c = make_plan(dict(raw, tune={"pruner": "none"}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert redact("postgresql://bob:s3cret@db.example:5432/tune") == "postgresql://bob:***@db.example:5432/tune"
    assert "s3cret" not in redact("postgresql://bob:s3cret@db/x")


def test_distributed_stage_checks():
    from oxoptim.training.cli import _check_for_processes
    from oxoptim.training.distributed import check_distributed_stage
    from oxoptim.training.stages import Stage

    check_distributed_stage(Stage("s", batch_size=32), 168, 2)  # last batch of 8: fine
    with pytest.raises(ValueError, match="leaves a last batch of 1"):
        check_distributed_stage(Stage("s", batch_size=167), 168, 2)
    with pytest.raises(ValueError, match="every batch needs >= 4"):
        check_distributed_stage(Stage("s", batch_size=2), 168, 4)
    # DDP wrapped every parameter as trainable: it would wait for the frozen ones' gradients mid-run
    with pytest.raises(ValueError, match="trainable = 'head' is not supported under DDP"):
        check_distributed_stage(Stage("s", batch_size=32, trainable="head"), 168, 2)
    raw = _toml_loads(DEFAULT_CONFIG_TOML)
    raw["stages"] = [{"name": "s", "optimizer": "adamw", "batch_size": 32, "step_in_backward": True,
                      "accumulate": 2, "accumulation": "optimizer"}]
    cfg = parse_config(raw)
    _check_for_processes(cfg, 1)
    with pytest.raises(ConfigError, match="under DDP, step_in_backward accumulates gradients"):
        _check_for_processes(cfg, 2)


# ----- divergence, and a study without a completed trial ---------------------------------------------

class DivergingJob(FakeJob):
    """FakeJob, except that a trial with lr above ``limit`` diverges in its second epoch."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def __call__(self, cfg, run_dir, quiet=False, on_record=None, evaluate_test=True, fold=None, announce=True):
        from oxoptim.training.trainer import NonFiniteLoss

        if cfg["stages"][0]["lr"] > self.limit:
            on_record({"global_epoch": 1, "val_accuracy": 0.5})
            raise NonFiniteLoss("training diverged in stage 'explore' epoch 2, by step 9: the training loss is nan")
        return super().__call__(cfg, run_dir, quiet, on_record, evaluate_test, fold, announce)


def test_a_diverging_trial_is_pruned_not_failed(tmp_path):
    """A trial whose training diverges (NonFiniteLoss) is pruned with the reason: the search goes on
    (three in a row do not stop the worker as failures would), its epochs counted up to the one
    that diverged."""
    plan = fake_plan({"pruner": "none", "sampler": "random", "seed": 2})
    study = open_study(plan, f"sqlite:///{tmp_path}/s.db", "div", create=True)
    lines = []
    Worker(plan, study, str(tmp_path), trials=8, say=lines.append, run_job=DivergingJob(limit=0.0)).work()
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state.name == "PRUNED" and "diverged" in t.user_attrs for t in trials)
    # the epoch that diverged (trained, with no record) counts in the compute spent
    assert all(t.user_attrs["epochs_run"] == 2 for t in trials)
    assert compute_spent(study)["epochs_run"] == 16
    assert sum("pruned: training diverged" in line for line in lines) == 8


def test_no_completed_trial_is_a_one_line_error(tmp_path, capsys):
    """Every trial pruned: the report says so in one line (how many pruned, failed), exit status 1,
    after writing trials.md; best.toml and the final runs are refused with the same error."""
    from oxoptim.training.tune import NoCompletedTrial, final_runs
    from oxoptim.training.tune_cli import _report
    from oxoptim.training.tune_report import write_best_plan

    plan = fake_plan({"pruner": "none", "sampler": "random", "seed": 2})
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(plan, url, "none", create=True)
    Worker(plan, study, str(tmp_path), trials=2, say=lambda *a: None, run_job=DivergingJob(limit=0.0)).work()
    capsys.readouterr()
    assert _report(plan, study, str(tmp_path), url, 2, say=print) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"oxoptim tune: error: no trial completed (2 pruned), so there is no best plan; "
                                f"the trials are listed in {tmp_path / 'trials.md'}"]
    assert (tmp_path / "trials.md").exists() and not (tmp_path / "best.toml").exists()
    with pytest.raises(NoCompletedTrial, match=r"no trial completed \(2 pruned\)"):
        write_best_plan(plan, study, str(tmp_path / "best.toml"))
    with pytest.raises(NoCompletedTrial):
        final_runs(plan, study, str(tmp_path), run_job=final_job)


# Its only trial (random sampler, seed 1) draws settings infeasible together: pruned before training.
INFEASIBLE_PLAN = """
seed = 2
threads = 1
[tune]
trials = 1
sampler = "random"
seed = 1
pruner = "none"
final_seeds = 1
heartbeat = 1
""" + TINY_DATA.replace("{train}", "reviews.jsonl") + """
""" + WARM_STAGE + """batch_size = { choice = [16, 2] }
accumulate = { choice = [1, 4] }
lr = 1e-2
"""


def test_tune_cli_without_a_completed_trial(tmp_path, capsys):
    """The CLI end to end: the only trial draws settings infeasible together (pruned before training)."""
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)
    capsys.readouterr()
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines() == [f"oxoptim tune: error: no trial completed (1 pruned), so there is no best "
                                        f"plan; the trials are listed in {tmp_path / 't' / 'trials.md'}"], err


def test_a_run_directory_holds_one_study(tmp_path, capsys):
    """Another study's trials would restart at trials/0000 and its best.toml replace the first
    one's: refused in one line, before the study is made; the first study continues."""
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)
    run = tmp_path / "t"

    def tune(*extra):
        capsys.readouterr()
        rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(run), "--quiet", *extra])
        return rc, capsys.readouterr().err.strip().splitlines()

    assert tune("--study", "a")[0] == 1  # no trial completed, but trials/0000 is study a's
    made = sorted(os.listdir(run))
    for extra in (["--study", "b"], ["--study", "a", "--storage", f"sqlite:///{tmp_path}/other.db"]):
        rc, err = tune(*extra)
        assert rc == 2 and len(err) == 1, err
        assert f"{run} holds the outputs of study 'a' in {run / 'study.db'}: give study " in err[0], err
        assert sorted(os.listdir(run)) == made and not (tmp_path / "other.db").exists()
    studies = optuna.get_all_study_names(f"sqlite:///{run}/study.db")
    assert studies == ["a"]
    assert tune("--study", "a")[0] == 1  # the same study continues (its one trial is there)


@pytest.mark.parametrize("name", ["r?mode=ro", "p%41", "h#x", "with space"])
def test_the_default_study_lands_in_a_run_directory_with_odd_characters(tmp_path, capsys, name):
    """The default SQLite URL escapes the path: a ? would start the URL's query (the study in ./r),
    %41 would be read as A."""
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)
    before = set(os.listdir(tmp_path))
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / name), "--quiet"])
    assert rc == 1, capsys.readouterr().err  # its one trial is infeasible: the study ran, no best plan
    assert set(os.listdir(tmp_path)) == before | {name}
    assert (tmp_path / name / "study.db").exists()


def test_commands_started_in_the_same_second_get_run_directories_of_their_own(tmp_path, capsys, monkeypatch):
    """Without --run-dir: runs/tune-<timestamp>, made exclusively (a suffix when it exists), not one
    study shared by two commands."""
    import oxoptim.training.tune_cli as tune_cli
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)
    monkeypatch.chdir(tmp_path)
    strftime = time.strftime  # the same second for every command
    monkeypatch.setattr(tune_cli.time, "strftime",
                        lambda fmt, *a: "tune-20260101-000000" if fmt.startswith("tune-") else strftime(fmt, *a))
    for _ in range(3):
        assert main(["tune", "--config", "plan.toml", "--quiet"]) == 1
    made = sorted(os.listdir(tmp_path / "runs"))
    assert made == ["tune-20260101-000000", "tune-20260101-000000-2", "tune-20260101-000000-3"]
    assert all(len(_trials(f"sqlite:///{tmp_path / 'runs' / d / 'study.db'}")) == 1 for d in made)


def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path, capsys, monkeypatch):
    import oxoptim.training.tune as tune
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "work", interrupted)
    capsys.readouterr()
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1 and err[0].startswith("oxoptim tune: interrupted; the study 'oxoptim' in "), err
    assert "run the same command again to continue it" in err[0]


@pytest.mark.parametrize("extra", [["--run-dir", "new/t"], [], ["--run-dir", "t", "--storage", "sqlite:///x.db"]])
def test_a_refused_command_leaves_nothing_behind(tmp_path, capsys, monkeypatch, extra):
    """--worker-only without a study: refused in one line, and the run directory (and runs/), the
    study.db or the --storage file it made are removed again."""
    from oxoptim.__main__ import main

    write_plan(tmp_path)  # the data
    (tmp_path / "plan.toml").write_text(INFEASIBLE_PLAN)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert main(["tune", "--config", "plan.toml", "--worker-only", "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study 'oxoptim' in" in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


def test_cross_validation_data_with_a_test_only_label_is_a_one_line_error(tmp_path, capsys):
    """Checked before any trial as the job checks it: a label the training split lacks is a config
    error (exit status 2, one line), not a traceback."""
    from oxoptim.__main__ import main

    rows = [(t, 5 if label == "pos" else 1) for t, label in reviews(60, seed=5)]
    write_rows(tmp_path / "train.jsonl", rows[:40], text_key="review", label_key="stars")
    write_rows(tmp_path / "val.jsonl", rows[40:50], text_key="review", label_key="stars")
    write_rows(tmp_path / "test.jsonl", rows[50:] + [("an odd one", 3)], text_key="review", label_key="stars")
    (tmp_path / "plan.toml").write_text("""
seed = 1
threads = 1
[tune]
trials = 1
cv_folds = 2
[data]
train = "train.jsonl"
val = "val.jsonl"
test = "test.jsonl"
text_column = "review"
label_column = "stars"
""" + WARM_STAGE + """lr = { log_uniform = [1e-3, 3e-2], default = 1e-2 }
""")
    capsys.readouterr()
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "the test split has label" in err[0], err


def test_data_the_job_refuses_is_refused_at_start_up(tmp_path, capsys):
    """A split left empty (12 reviews, 5% each for validation and test) is refused as `oxoptim train`
    refuses it: in one line, exit status 2, before anything is made; not by every trial failing
    (a worker stopped after three, its study and trials left behind)."""
    from oxoptim.__main__ import main

    write_rows(tmp_path / "reviews.jsonl", [(t, 5 if label == "pos" else 1) for t, label in reviews(12, seed=5)],
               text_key="review", label_key="stars")
    (tmp_path / "plan.toml").write_text("seed = 1\nthreads = 1\n[tune]\ntrials = 2\npruner = \"none\"\n"
                                        + TINY_DATA.replace("{train}", "reviews.jsonl").replace(
                                            "[0.7, 0.15, 0.15]", "[0.9, 0.05, 0.05]")
                                        + WARM_STAGE + "lr = { log_uniform = [1e-3, 3e-2] }\n")
    capsys.readouterr()
    rc = main(["tune", "--config", str(tmp_path / "plan.toml"), "--run-dir", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "[data] no test texts left after the split" in err[0], err
    assert not (tmp_path / "t").exists()
