"""``oxoptim tune``: an Optuna search over a stage plan (see :mod:`.tune`), from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import List

__all__ = ["add_tune_parser", "run_tune"]


def add_tune_parser(subparsers):
    p = subparsers.add_parser(
        "tune", help="search over stage plans with Optuna (pruning after each evaluation)",
        description="Runs trials of a plan whose TOML gives distributions instead of values (lr = { log_uniform "
        "= [1e-4, 1e-2] }, optimizer = { choice = [\"adamw\", \"lion\"] }, ...) and a [tune] table; each trial "
        "trains through the normal Trainer, reports validation after every epoch and is pruned when the pruner "
        "says so. Then the best plan is written to best.toml and re-run with [tune] final_seeds seeds, each "
        "evaluated on the test split once. Running the same command again continues the study.",
    )
    p.add_argument("--config", metavar="PLAN.toml", required=True, help="the plan with its search space")
    p.add_argument("--trials", type=int, metavar="N", help="finished (completed or pruned) trials the study needs "
                   "(default: [tune] trials)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="worker processes on this machine (default 1)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage, e.g. postgresql://user:pw@host/db to share the "
                   "study between machines (default: sqlite:///RUN_DIR/study.db)")
    p.add_argument("--study", default="oxoptim", metavar="NAME", help="study name in the storage (default oxoptim)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: runs/tune-<timestamp>)")
    p.add_argument("--worker-only", action="store_true", help="only run trials of an existing study (another "
                   "machine's `oxoptim tune` writes the results)")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(run=run_tune)
    return p


def _fail(error: Exception) -> int:
    print(f"oxoptim tune: error: {error}", file=sys.stderr, flush=True)
    return 2


def _spawn_workers(args, n: int, storage: str, run_dir: str, trials: int) -> List[subprocess.Popen]:
    cmd = [sys.executable, "-m", "oxoptim", "tune", "--config", args.config, "--trials", str(trials),
           "--storage", storage, "--study", args.study, "--run-dir", run_dir, "--worker-only"]
    if args.quiet:
        cmd.append("--quiet")
    return [subprocess.Popen(cmd) for _ in range(n)]


def run_tune(args) -> int:
    from .config import check_sources
    from .errors import ConfigError, MissingDependency
    from .tune import load_plan, open_study

    try:
        plan = load_plan(args.config)
        trials = args.trials if args.trials is not None else plan.settings.trials
        if trials < 1 or args.jobs < 1:
            raise ConfigError(f"--trials and --jobs must be >= 1, not {trials} and {args.jobs}")
        check_sources(plan.job({p.name: p.candidates()[0] for p in plan.params}))
        run_dir = args.run_dir or os.path.join("runs", time.strftime("tune-%Y%m%d-%H%M%S"))
        os.makedirs(run_dir, exist_ok=True)
        storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'study.db'))}"
        study = open_study(plan, storage, args.study, create=not args.worker_only)
    except (ConfigError, MissingDependency) as e:
        return _fail(e)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    s = plan.settings
    say(f"study {args.study!r} in {storage}: {trials} trials of {len(plan.params)} settings "
        f"({', '.join(p.name for p in plan.params)}), {s.sampler} sampler, {s.pruner['name']} pruner, "
        f"{s.metric} on {'%d-fold cross-validation' % s.cv_folds if s.cv_folds else 'the validation split'}"
        f"{', ' + str(args.jobs) + ' workers' if args.jobs > 1 else ''}")
    from .tune import work

    children = _spawn_workers(args, args.jobs - 1, storage, run_dir, trials)
    try:
        work(plan, study, run_dir, trials, say)
        for c in children:
            c.wait()
    except BaseException:
        for c in children:
            c.terminate()
        raise
    if args.worker_only:
        return 0
    return _report(plan, study, run_dir, storage, trials, say)


def _report(plan, study, run_dir: str, storage: str, trials: int, say) -> int:
    from .tune import baseline_trial, final_runs, wait_for_others
    from .tune_report import (compute_spent, format_mean_sd, write_best_plan, write_plots, write_summary,
                              write_trials)

    wait_for_others(study)
    write_trials(study, os.path.join(run_dir, "trials.md"), os.path.join(run_dir, "trials.csv"))
    spent = compute_spent(study)
    missing = write_plots(study, run_dir)
    best = study.best_trial
    best_path = os.path.join(run_dir, "best.toml")
    write_best_plan(plan, study, best_path)
    base = baseline_trial(study)
    m = plan.settings.metric
    say(f"best: trial {best.number}, {m} {best.value:.4f}"
        + (f" (hand-written plan, trial {base.number}: {base.value:.4f})" if base is not None else "")
        + f"; {', '.join(f'{k}={v}' for k, v in best.params.items())}; written to {best_path}")
    if spent["fraction"] is not None:
        say(f"compute: {spent['epochs_run']} epochs run of {spent['epochs_unpruned']} unpruned "
            f"({spent['fraction']:.0%}); trials {json.dumps(spent['trials'])}")
    final = final_runs(plan, study, run_dir, say) if plan.settings.final_seeds else {}
    for label, r in final.items():
        say(f"{label} plan over seeds {[x['seed'] for x in r['runs']]}: test accuracy "
            f"{format_mean_sd(r['test_accuracy'])}, validation {format_mean_sd(r['val_accuracy'])}")
    write_summary(run_dir, {
        "study": study.study_name, "storage": storage, "trials": trials, "settings": asdict(plan.settings),
        "best": {"trial": best.number, "value": best.value, "params": best.params},
        "baseline": None if base is None else {"trial": base.number, "value": base.value},
        "compute": spent, "final": final, "missing_outputs": missing,
    })
    for name, why in missing.items():
        print(f"oxoptim tune: {name} not written: {why}", file=sys.stderr, flush=True)
    say(f"outputs in {run_dir}: best.toml, trials.md, trials.csv, tune_summary.json, plots")
    return 0
