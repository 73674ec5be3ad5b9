"""``oxoptim tune``: an Optuna search over a stage plan (see :mod:`.tune`), from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import List

__all__ = ["add_tune_parser", "run_tune", "STORAGE_ENV"]

STORAGE_ENV = "OXOPTIM_TUNE_STORAGE"  # how --jobs passes the storage on (a password stays off command lines)


def add_tune_parser(subparsers):
    p = subparsers.add_parser(
        "tune", help="search over stage plans with Optuna (pruning after each evaluation)",
        description="Runs trials of a plan whose TOML gives distributions instead of values (lr = { log_uniform "
        "= [1e-4, 1e-2] }, optimizer = { choice = [\"adamw\", \"lion\"] }, ...) and a [tune] table; each trial "
        "trains through the normal Trainer, reports validation after every epoch and is pruned when the pruner "
        "says so. Then the best plan is written to best.toml and re-run with [tune] final_seeds seeds (on --jobs "
        "processes), each evaluated on the test split once. Running the same command again with the same --run-dir (or --storage and "
        "--study) continues the study.",
    )
    p.add_argument("--config", metavar="PLAN.toml", required=True, help="the plan with its search space")
    p.add_argument("--trials", type=int, metavar="N", help="finished (completed or pruned) trials the study needs "
                   "(default: [tune] trials)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="worker processes on this machine (default 1)")
    p.add_argument("--storage", metavar="URL", default=os.environ.get(STORAGE_ENV),
                   help="Optuna storage, e.g. postgresql://user:pw@host/db to share the study between machines "
                   f"(default: ${STORAGE_ENV}, else sqlite:///RUN_DIR/study.db)")
    p.add_argument("--study", default="oxoptim", metavar="NAME", help="study name in the storage (default oxoptim)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: runs/tune-<timestamp>: a new study each time)")
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
           "--study", args.study, "--run-dir", run_dir, "--worker-only"]
    if args.quiet:
        cmd.append("--quiet")
    env = {**os.environ, STORAGE_ENV: storage}
    return [subprocess.Popen(cmd, env=env) for _ in range(n)]


def run_tune(args) -> int:
    from .config import check_sources
    from .errors import ConfigError, MissingDependency
    from .tune import TrialsFailing, load_plan, open_study, redact, sqlite_url

    made: List[str] = []  # what this command created, removed again when it refuses to go on
    try:
        if args.run_dir is not None and not args.run_dir.strip():
            raise ConfigError("--run-dir must name a directory, not an empty string")
        plan = load_plan(args.config)
        trials = args.trials if args.trials is not None else plan.settings.trials
        if trials < 1 or args.jobs < 1:
            raise ConfigError(f"--trials and --jobs must be >= 1, not {trials} and {args.jobs}")
        first = plan.job({p.name: p.candidates()[0] for p in plan.params})
        check_sources(first)
        plan.data_fingerprint()  # reads the users' data files and checks them as `oxoptim train` does
        if plan.settings.cv_folds:
            _check_folds(first, plan.settings.cv_folds)
        run_dir = args.run_dir or os.path.join("runs", time.strftime("tune-%Y%m%d-%H%M%S"))
        made.extend(_missing_dirs(run_dir if args.run_dir else os.path.dirname(run_dir)))
        try:
            if args.run_dir:
                os.makedirs(run_dir, exist_ok=True)
            else:  # a new directory, even for two commands started in the same second
                run_dir = _new_run_dir(run_dir)
                made.append(os.path.abspath(run_dir))
        except OSError as e:
            raise ConfigError(f"cannot make the run directory {run_dir}: {e.strerror or e}") from None
        default = sqlite_url(os.path.join(run_dir, "study.db"))
        storage = args.storage or default
        owner = {"study": args.study, "storage": None if storage == default else redact(storage)}
        _check_run_dir(run_dir, owner)  # before the study is made: a refused command leaves nothing
        db = _sqlite_file(storage)
        if db is not None and not os.path.exists(db):
            made.append(db)
        study = open_study(plan, storage, args.study, create=not args.worker_only)
        _claim_run_dir(run_dir, owner)
    except (ConfigError, MissingDependency) as e:
        _remove(made)
        return _fail(e)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    s = plan.settings
    say(f"study {args.study!r} in {redact(storage)}: {trials} trials of {len(plan.params)} settings "
        f"({', '.join(p.name for p in plan.params)}), {s.sampler} sampler, {s.pruner['name']} pruner, "
        f"{s.metric} on {'%d-fold cross-validation' % s.cv_folds if s.cv_folds else 'the validation split'}"
        f"{', ' + str(args.jobs) + ' workers' if args.jobs > 1 else ''}")
    from .tune import work

    children = _spawn_workers(args, args.jobs - 1, storage, run_dir, trials)
    if children:  # SIGTERM ends the workers too (through the BaseException path below)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        work(plan, study, run_dir, trials, say)
        for c in children:
            c.wait()
        if args.worker_only:
            return 0
        return _report(plan, study, run_dir, storage, trials, say, jobs=args.jobs)
    except TrialsFailing as e:
        for c in children:
            c.terminate()
        print(f"oxoptim tune: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the study is kept
        for c in children:
            c.terminate()
        print(f"oxoptim tune: interrupted; the study {args.study!r} in {redact(storage)} is kept: run the same "
              f"command again to continue it", file=sys.stderr, flush=True)
        return 130
    except BaseException:
        for c in children:
            c.terminate()
        raise


def _missing_dirs(path: str) -> List[str]:
    """The directories ``os.makedirs(path)`` would make, outermost first (absolute paths)."""
    missing: List[str] = []
    path = os.path.abspath(path) if path else ""
    while path and not os.path.exists(path):
        missing.insert(0, path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _sqlite_file(storage: str):
    """The file of a SQLite storage URL (absolute), or None."""
    if not storage.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(storage).database
    except Exception:  # not a URL: open_study says so
        return None
    return os.path.abspath(database) if database and database != ":memory:" else None


def _remove(made: List[str]) -> None:
    """Removes what a refused command made: its SQLite files, then its directories if empty."""
    for path in reversed(made):
        try:
            if os.path.isdir(path):
                os.rmdir(path)  # only when empty: nothing but what this command made
            else:
                for suffix in ("", "-journal", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.remove(path + suffix)
        except OSError:
            pass


def _new_run_dir(path: str) -> str:
    """Makes ``path``, or ``path-2``, ``path-3``, ... when it exists: created exclusively, so that
    commands started in the same second get directories (and studies) of their own."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    for n in range(1, 10000):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}-* all exist")


OWNER_FILE = "study.json"  # the study whose outputs a run directory holds


def _check_run_dir(run_dir: str, owner: dict) -> None:
    """One study per run directory: another's trial numbers restart at 0000 in the same trials/, and
    its best.toml, trials.md and summary would replace the first study's."""
    from .errors import ConfigError

    path = os.path.join(run_dir, OWNER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
    except FileNotFoundError:  # a new run directory, or one from before the file was written
        try:
            with open(os.path.join(run_dir, "tune_summary.json"), encoding="utf-8") as f:
                held = {"study": json.load(f).get("study"), "storage": owner["storage"]}
        except (OSError, ValueError):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(held, dict):
        raise ConfigError(f"cannot read {path}: not a JSON object")
    if {k: held.get(k) for k in owner} != owner:
        storage = held.get("storage") or os.path.join(run_dir, "study.db")
        this = f"study {owner['study']!r}" + (f" in {owner['storage']}" if owner["storage"] else "")
        raise ConfigError(f"{run_dir} holds the outputs of study {held.get('study')!r} in {storage}: give {this} "
                          f"another --run-dir (a run directory holds one study's trials and results)")


def _claim_run_dir(run_dir: str, owner: dict) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(os.path.join(run_dir, OWNER_FILE), (json.dumps(owner) + "\n").encode("utf-8"))


def _check_folds(job: dict, folds: int) -> None:
    """k-fold cross-validation needs at least k training examples (read now, before any trial)."""
    from .errors import ConfigError
    from .job import load_data

    data = load_data(job)
    if len(data["train"]) < folds:
        raise ConfigError(f"[tune] cv_folds = {folds} needs at least {folds} training examples, the data has "
                          f"{len(data['train'])}")


def _report(plan, study, run_dir: str, storage: str, trials: int, say, jobs: int = 1) -> int:
    from .tune import NoCompletedTrial, baseline_trial, best_trial, final_runs, redact, wait_for_others
    from .tune_report import (compute_spent, format_mean_sd, write_best_plan, write_plots, write_summary,
                              write_trials)

    wait_for_others(study)
    write_trials(study, os.path.join(run_dir, "trials.md"), os.path.join(run_dir, "trials.csv"))
    try:
        best = best_trial(study)
    except NoCompletedTrial as e:
        print(f"oxoptim tune: error: {e}; the trials are listed in {os.path.join(run_dir, 'trials.md')}",
              file=sys.stderr, flush=True)
        return 1
    spent = compute_spent(study)
    missing = write_plots(study, run_dir)
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
    final = final_runs(plan, study, run_dir, say, jobs=jobs) if plan.settings.final_seeds else {}
    for label, r in final.items():
        failed = f" ({r['failed']} of {len(r['runs'])} runs did not finish)" if r.get("failed") else ""
        say(f"{label} plan over seeds {[x['seed'] for x in r['runs']]}: test accuracy "
            f"{format_mean_sd(r['test_accuracy'])}, validation {format_mean_sd(r['val_accuracy'])}{failed}")
    write_summary(run_dir, {
        "study": study.study_name, "storage": redact(storage), "trials": trials, "settings": asdict(plan.settings),
        "best": {"trial": best.number, "value": best.value, "params": best.params},
        "baseline": None if base is None else {"trial": base.number, "value": base.value},
        "compute": spent, "final": final, "missing_outputs": missing,
    })
    for name, why in missing.items():
        print(f"oxoptim tune: {name} not written: {why}", file=sys.stderr, flush=True)
    say(f"outputs in {run_dir}: best.toml, trials.md, trials.csv, tune_summary.json, plots")
    # a final run that diverged or failed leaves the results incomplete: said, exit status 1
    unfinished = [f"{label} seed {r['seed']} {r['failed']}" for label, entry in final.items()
                  if not entry.get("same_as") for r in entry["runs"] if r.get("failed")]
    if unfinished:
        total = sum(len(entry["runs"]) for entry in final.values() if not entry.get("same_as"))
        print(f"oxoptim tune: error: {len(unfinished)} of {total} final runs did not finish ({', '.join(unfinished)}); "
              f"the means are over the finished ones, each run's outcome is in "
              f"{os.path.join(run_dir, 'tune_summary.json')}", file=sys.stderr, flush=True)
        return 1
    return 0
