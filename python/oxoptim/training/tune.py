"""The adjust step as a search: Optuna studies over stage plans, pruned after each evaluation.

A plan is a job's TOML with distributions in place of values (:mod:`.search_space`) and a
``[tune]`` table (:data:`TUNE_KEYS`). Each Optuna trial runs the plan through the normal job and
Trainer with sampled settings, reports the validation metric after every evaluation (or, with
cross-validation, the running mean after every fold) and stops when the pruner says so. The test
split is never seen by a trial. Studies live in an Optuna RDB storage (a SQLite file by default,
PostgreSQL to share one study between machines) with heartbeats: the trial of a killed worker is
marked failed and run again from the start under a new number, by whichever worker asks next.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import METRICS, _read_toml, parse_config, resolve_paths
from .errors import ConfigError, MissingDependency, integer, unknown_name
from .rules import monitorable
from .search_space import Param, as_optuna_params, check_space, default_values, find_params, substitute, suggest

__all__ = ["Plan", "TuneSettings", "TrialsFailing", "NoCompletedTrial", "best_trial", "redact", "sqlite_url", "load_plan", "open_study", "work", "finished_count", "TUNE_KEYS", "PRUNERS",
           "SAMPLERS", "trial_values", "planned_epochs"]

TUNE_KEYS = ("trials", "metric", "sampler", "pruner", "cv_folds", "final_seeds", "seed", "heartbeat")
SAMPLERS = ("tpe", "random")
VALIDATION_METRICS = {k: v for k, v in monitorable(METRICS).items() if k.startswith("val_")}
_PRUNER_MINIMA = {"startup_trials": 0, "warmup_epochs": 0, "min_resource": 1, "reduction_factor": 2}
PRUNERS = {  # name → its settings (Optuna's argument names) and defaults
    "median": {"startup_trials": 4, "warmup_epochs": 1},
    "successive_halving": {"min_resource": 1, "reduction_factor": 3},
    "hyperband": {"min_resource": 1, "reduction_factor": 3},
    "none": {},
}


@dataclass
class TuneSettings:
    """The ``[tune]`` table. ``heartbeat``: seconds between a running trial's heartbeats; a trial
    silent for two of them is failed and run again."""

    trials: int = 24
    metric: str = "val_accuracy"
    sampler: str = "tpe"
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    cv_folds: int = 0
    final_seeds: int = 3
    seed: int = 0
    heartbeat: int = 30

    @property
    def direction(self) -> str:
        return "maximize" if VALIDATION_METRICS[self.metric] == "max" else "minimize"


def _settings(table: Any, job_seed: int) -> TuneSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"[tune] must be a table, not {table!r}")
    for key in table:
        if key not in TUNE_KEYS:
            raise ConfigError(unknown_name("[tune] key", key, TUNE_KEYS))
    s = TuneSettings(seed=job_seed)
    try:
        s.trials = integer("trials", table.get("trials", s.trials), 1)
        s.metric = table.get("metric", s.metric)
        if not isinstance(s.metric, str) or s.metric not in VALIDATION_METRICS:  # a list is unhashable
            raise ValueError(unknown_name("metric", s.metric, VALIDATION_METRICS) + " (a validation score)")
        s.sampler = table.get("sampler", s.sampler)
        if s.sampler not in SAMPLERS:
            raise ValueError(unknown_name("sampler", s.sampler, SAMPLERS))
        pruner = table.get("pruner", s.pruner)
        pruner = {"name": pruner} if isinstance(pruner, str) else dict(pruner) if isinstance(pruner, dict) else pruner
        if not isinstance(pruner, dict) or not isinstance(pruner.get("name"), str) or pruner["name"] not in PRUNERS:
            name = pruner.get("name") if isinstance(pruner, dict) else pruner
            raise ValueError(unknown_name("pruner", name, PRUNERS) + " (a name or a table with a name)")
        for key in pruner:
            if key != "name":
                if key not in PRUNERS[pruner["name"]]:
                    raise ValueError(unknown_name(f"{pruner['name']} pruner setting", key, PRUNERS[pruner["name"]]))
                integer(f"pruner {key}", pruner[key], _PRUNER_MINIMA[key])
        s.pruner = {"name": pruner["name"], **{k: v for k, v in PRUNERS[pruner["name"]].items()},
                    **{k: v for k, v in pruner.items() if k != "name"}}
        s.cv_folds = integer("cv_folds", table.get("cv_folds", 0), 0)
        if s.cv_folds == 1:
            raise ValueError("cv_folds is 0 (no cross-validation) or at least 2, not 1")
        s.final_seeds = integer("final_seeds", table.get("final_seeds", s.final_seeds), 0)
        s.seed = integer("seed", table.get("seed", s.seed))
        s.heartbeat = integer("heartbeat", table.get("heartbeat", s.heartbeat), 1)
    except ValueError as e:
        raise ConfigError(f"[tune] {e}") from e
    return s


@dataclass
class Plan:
    """A searchable job: the job with its distributions, the parameters, the search settings."""

    raw: dict
    params: List[Param]
    settings: TuneSettings
    base_dir: str = "."
    _prints: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)  # the data, read once

    def job(self, values: Dict[str, Any]) -> dict:
        """The runnable job for one assignment of the parameters (checked as ``oxoptim train`` checks)."""
        return resolve_paths(parse_config(substitute(self.raw, self.params, values)), self.base_dir)

    @property
    def defaults(self) -> Optional[Dict[str, Any]]:
        return default_values(self.params)

    def data_fingerprint(self) -> Optional[str]:
        """The fingerprint ``oxoptim train --resume`` checks (:func:`.data.data_fingerprint`) of the
        data the plan's files give, read with the first candidates' ``[data]`` settings and, when
        ``[data]`` settings are searched (``max_len``, ``min_freq``), with each of their other
        candidates too (a change that only a longer ``max_len`` reads is a change); None for the
        built-in data (the installed package's, not the user's files). Reading the data checks it
        as ``oxoptim train`` does (:func:`.job.load_data`): a split left empty is a ConfigError."""
        return self._data_fingerprints()[0]

    def _data_fingerprints(self) -> tuple:
        """(the fingerprint, the first candidates' alone: what studies from before the other
        candidates were read saved)."""
        if self._prints is None:
            self._prints = self._read_data_fingerprints()
        return self._prints

    def _read_data_fingerprints(self) -> tuple:
        first = {p.name: p.candidates()[0] for p in self.params}
        job = self.job(first)
        if "train" not in job["data"]:
            return None, None
        from .data import data_fingerprint
        from .job import load_data

        tables = [job["data"]]
        for p in self.params:
            if p.path[0] == "data":
                for value in p.candidates()[1:]:
                    table = self.job(dict(first, **{p.name: value}))["data"]
                    if table not in tables:
                        tables.append(table)
        prints = [data_fingerprint(load_data({"data": t})) for t in tables]
        if len(prints) == 1:
            return prints[0], prints[0]
        return hashlib.sha256(json.dumps(prints).encode()).hexdigest(), prints[0]

    def fingerprint(self) -> str:
        """Equal for plans that search the same space, scored and pruned the same way (the number of
        trials, the final runs and the heartbeat may change between runs of one study)."""
        settings = {k: v for k, v in asdict(self.settings).items() if k in ("metric", "pruner", "cv_folds")}
        blob = json.dumps({"job": self.raw, "tune": settings}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_plan(path: str) -> Plan:
    """Reads and checks a plan file: the job under every candidate value, the ``[tune]`` table."""
    try:
        raw = _read_toml(path, ())
    except ValueError as e:  # ConfigError, TOML syntax
        raise ConfigError(f"{path}: {e}") from e
    return make_plan(raw, os.path.dirname(os.path.abspath(path)), where=path)


def make_plan(raw: dict, base_dir: str = ".", where: str = "plan") -> Plan:
    raw = dict(raw)
    try:
        table = raw.pop("tune", {})
        params = find_params(raw)
        if not params:
            raise ConfigError("nothing to search: give some setting a distribution, e.g. "
                              "lr = { log_uniform = [1e-4, 1e-2] }")
        seed = raw.get("seed", 0)
        settings = _settings(table, seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
        check_space(raw, params, parse_config)
        plan = Plan(raw, params, settings, base_dir)
        try:  # the best plan is written as TOML at the end: what TOML cannot hold is refused now
            from .toml_writer import dumps

            dumps(substitute(raw, params, {p.name: p.candidates()[0] for p in params}))
        except ValueError as e:
            raise ConfigError(f"the best plan could not be written to best.toml: {e}") from e
        try:
            _pruner(settings)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[tune] pruner {settings.pruner}: {e}") from e
        if settings.cv_folds and plan.job({p.name: p.candidates()[0] for p in params}).get("job") == "language_model":
            raise ConfigError("[tune] cv_folds is for classification jobs, not the language-model job")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return plan


def pretrained_in_study(job: dict, run_dir: str) -> dict:
    """``job`` as the study runs it: a language-model job keeps its pretrained models in the
    study's ``<run dir>/pretrained`` (unless ``[pretrain] cache_dir`` names a folder), so that the
    trials and the final runs, each in a folder of its own, pretrain once per pretraining setting."""
    if job.get("job") != "language_model" or job["pretrain"].get("cache_dir"):
        return job
    return dict(job, pretrain=dict(job["pretrain"], cache_dir=os.path.join(os.path.abspath(run_dir), "pretrained")))


def planned_epochs(job: dict, folds: int) -> int:
    """Epochs a trial runs if nothing stops it early: every stage's, where a Trial rule's K
    candidates run its first ``trial.epochs`` K times before the chosen one goes on."""
    stages = job["finetune"]["stages"] if job.get("job") == "language_model" else job["stages"]
    total = 0
    for st in stages:
        total += int(st.get("epochs", 1))
        for rule in st.get("adjust", []) or []:
            if isinstance(rule, dict) and rule.get("rule") == "trial":
                total += int(rule.get("epochs", 1)) * (len(rule.get("candidates", [])) - 1)
    return total * max(1, folds)


# ----- the study ---------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError:
        raise MissingDependency("oxoptim tune", "optuna") from None
    import warnings

    # ERROR: a failed trial is reported by the worker in one line, its traceback in error.txt
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats (fail_stale_trials) and the matplotlib plots are marked experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _retry():
    """(the RDBStorage argument, the callback): a trial whose worker died runs again, under a new
    number, with its settings and attributes (the baseline's mark too), at most 3 times."""
    optuna = _optuna()
    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters:  # >= 4.9
        return "heartbeat_stale_trial_callback", optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    return "failed_trial_callback", optuna.storages.RetryFailedTrialCallback(max_retry=3)


def _storage(url: str, heartbeat: int):
    optuna = _optuna()
    key, retry = _retry()
    engine: Dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                          grace_period=2 * heartbeat, **{key: retry})
    except ImportError:  # the database driver SQLAlchemy picks for the URL
        scheme = url.split(":")[0]
        hint = ' (pip install "oxoptim[postgres]")' if scheme.startswith("postgresql") else ""
        raise ConfigError(f"the storage {scheme}:// needs its database driver, which is not installed{hint}") from None
    except Exception as e:  # SQLAlchemy's errors: a bad URL, a server that does not answer
        raise ConfigError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0]}") from None


def sqlite_url(path: str) -> str:
    """The SQLAlchemy URL of the SQLite file at ``path``, escaped (a ``?`` would start the URL's
    query, ``%41`` would be read as ``A``, ``#`` and spaces kept as they are)."""
    from sqlalchemy.engine import URL, make_url

    path = os.path.abspath(path)
    url = URL.create("sqlite", database=path).render_as_string(hide_password=False)
    if make_url(url).database != path:  # an SQLAlchemy that does not read back what it wrote
        raise ConfigError(f"cannot name {path} in a SQLite URL: give a --run-dir without ?, % or # in its "
                          f"path, or --storage")
    return url


def redact(url: str) -> str:
    """The storage URL without its password (for messages and files)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: show the scheme only
        return url.split("://")[0] + "://..."


def _sampler(settings: TuneSettings, seed: int):
    optuna = _optuna()
    seed %= 2 ** 32  # numpy's range; the plan's seed may be any integer torch.manual_seed takes
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _sampler_seed(settings: TuneSettings, trials_so_far: int, fresh: bool) -> int:
    """The plan's seed for a new study's first process (a one-process search is reproducible);
    any other process (a worker, a restart) mixes in its host, process and the study's progress,
    so that no two propose the same settings."""
    if fresh:
        return settings.seed
    key = f"{settings.seed}:{trials_so_far}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def _pruner(settings: TuneSettings):
    optuna = _optuna()
    p = settings.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"], n_warmup_steps=p["warmup_epochs"])
    if p["name"] == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_resource"],
                                                      reduction_factor=p["reduction_factor"])
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p["min_resource"], reduction_factor=p["reduction_factor"])
    return optuna.pruners.NopPruner()


def open_study(plan: Plan, url: str, name: str, create: bool):
    """The study ``name`` in the storage at ``url``; ``create`` makes it (and queues the hand-written
    plan as its first trial) if it does not exist. A study searched with another plan, or on data
    that has changed since, is refused."""
    optuna = _optuna()
    data, first_only = plan._data_fingerprints()
    storage = _storage(url, plan.settings.heartbeat)
    kw = dict(storage=storage, study_name=name, pruner=_pruner(plan.settings))
    if not create:
        try:
            study = optuna.load_study(**kw)
        except KeyError:
            raise ConfigError(f"no study {name!r} in {redact(url)}: start it with `oxoptim tune` (without "
                              f"--worker-only) first") from None
    else:
        study = optuna.create_study(direction=plan.settings.direction, load_if_exists=True, **kw)
    fingerprint = study.user_attrs.get("plan_fingerprint")
    fresh = create and fingerprint is None and not study.trials
    study.sampler = _sampler(plan.settings, _sampler_seed(plan.settings, len(study.trials), fresh))
    if fingerprint is None and create:
        study.set_user_attr("plan_fingerprint", plan.fingerprint())
        study.set_user_attr("plan", plan.raw)
        study.set_user_attr("tune", asdict(plan.settings))
        study.set_user_attr("data_fingerprint", data)
        if plan.defaults is not None:  # the baseline: the hand-written plan runs first
            study.enqueue_trial(as_optuna_params(plan.params, plan.defaults), user_attrs={"baseline": True})
    elif fingerprint is None:
        raise ConfigError(f"study {name!r} in {redact(url)} is not ready yet: start its `oxoptim tune` first")
    elif fingerprint != plan.fingerprint():
        raise ConfigError(f"study {name!r} in {redact(url)} searches another plan (fingerprint {fingerprint}, this plan "
                          f"{plan.fingerprint()}): give another --study name or the same plan")
    # Studies from before data fingerprints were saved have none: they continue as they did.
    saved = study.user_attrs.get("data_fingerprint")
    # a study from before every searched [data] candidate was read saved the first candidates' alone
    if saved is not None and data is not None and saved not in (data, first_only):
        raise ConfigError(f"study {name!r} in {redact(url)} was searched on other data: the data files (or what is "
                          f"loaded from them: splits, vocabulary, labels) changed since it started (fingerprint "
                          f"{saved[:12]}, now {data[:12]}); restore them to continue it, or start a new study "
                          f"(another --run-dir or --study)")
    return study


def _states(*names: str):
    from optuna.trial import TrialState

    return tuple(getattr(TrialState, n) for n in names)


def finished_count(study) -> int:
    return len(study.get_trials(deepcopy=False, states=_states("COMPLETE", "PRUNED")))


def trial_values(plan: Plan, params: Dict[str, Any]) -> Dict[str, Any]:
    """A trial's settings as the plan's values (choices of tables decoded from their JSON)."""
    return {p.name: json.loads(params[p.name]) if p.encoded_choices else params[p.name] for p in plan.params}


class TrialsFailing(RuntimeError):
    """Trials keep failing: the worker stops (``oxoptim tune`` says so in one line, exit status 1)."""


class NoCompletedTrial(RuntimeError):
    """The study has no completed trial, so no best plan (``oxoptim tune`` says so in one line,
    exit status 1)."""


def best_trial(study):
    """The study's best completed trial; :class:`NoCompletedTrial` (with the trials' states) when none completed."""
    if not study.get_trials(deepcopy=False, states=_states("COMPLETE")):
        counts: Dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            if not t.user_attrs.get("surplus"):
                state = {"FAIL": "failed"}.get(t.state.name, t.state.name.lower())
                counts[state] = counts.get(state, 0) + 1
        listed = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials"
        raise NoCompletedTrial(f"no trial completed ({listed}), so there is no best plan")
    return study.best_trial


class _Surplus(Exception):
    """The study already has its trials (finished or under way) without this one."""


# ----- one worker ----------------------------------------------------------------------------------

@dataclass
class Worker:
    """Runs trials of one study until it has ``trials`` finished (completed or pruned) ones."""

    plan: Plan
    study: Any
    run_dir: str
    trials: int
    say: Callable[[str], None] = print
    run_job: Optional[Callable[..., Optional[dict]]] = None

    def __post_init__(self) -> None:
        if self.run_job is None:
            from .job import run_job

            self.run_job = run_job
        self.metric = self.plan.settings.metric
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.failures, self.last_failure = 0, ""
        self.running: Optional[int] = None  # the number of the trial under way here

    def work(self) -> None:
        optuna = _optuna()
        poll = max(0.2, self.plan.settings.heartbeat / 4)
        while True:
            optuna.storages.fail_stale_trials(self.study)
            done = finished_count(self.study)
            if done >= self.trials:
                return
            busy = self.study.get_trials(deepcopy=False, states=_states("RUNNING", "WAITING"))
            waiting = any(t.state.name == "WAITING" for t in busy)
            if done + len(busy) >= self.trials and not waiting:
                time.sleep(poll)  # the last trials are under way elsewhere: wait, in case one dies
                continue
            # a trial that raises is recorded as failed; three failures in a row stop the worker
            self.running = None
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self._announce])
            except KeyboardInterrupt:
                self._retry_interrupted()
                raise
            if self.failures >= 3:
                raise TrialsFailing(f"3 trials in a row failed here; the last: {self.last_failure}")

    def _retry_interrupted(self) -> None:
        """The trial a Ctrl-C stopped (recorded as failed) is queued again, as the trial of a
        killed worker is: the next worker, or the same command run again, runs it from the start
        (the baseline too, which nothing else would run again)."""
        if self.running is None:
            return
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.running)
        if trial.state.name == "FAIL" and not trial.user_attrs.get("surplus"):
            _retry()[1](self.study, trial)

    def objective(self, trial) -> float:
        optuna = _optuna()
        self.running = trial.number
        try:
            return self._run_trial(trial)
        except (_Surplus, optuna.TrialPruned):
            raise
        except Exception as e:  # recorded with the trial: Optuna's callbacks do not see the error
            import traceback

            trial.set_user_attr("error", f"{type(e).__name__}: {e}".splitlines()[0])
            trial_dir = self._trial_dir(trial)
            os.makedirs(trial_dir, exist_ok=True)
            with open(os.path.join(trial_dir, "error.txt"), "w", encoding="utf-8") as fh:
                fh.write(traceback.format_exc())
            raise

    def _trial_dir(self, trial) -> str:
        return os.path.join(self.run_dir, "trials", f"{trial.number:04d}")

    def _run_trial(self, trial) -> float:
        optuna = _optuna()
        earlier = [t for t in self.study.get_trials(deepcopy=False,
                                                    states=_states("COMPLETE", "PRUNED", "RUNNING", "WAITING"))
                   if t.number < trial.number and not t.user_attrs.get("surplus")]
        if len(earlier) >= self.trials:  # another worker took the last trial meanwhile
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"the study has its {self.trials} trials")
        values = suggest(trial, self.plan.params)
        try:
            job = pretrained_in_study(self.plan.job(values), self.run_dir)
        except ConfigError as e:  # settings that are valid one by one but not together
            trial.set_user_attr("infeasible", str(e))
            trial.set_user_attr("epochs_run", 0)
            raise optuna.TrialPruned(f"infeasible: {e}") from None
        from .trainer import NonFiniteLoss

        folds = self.plan.settings.cv_folds
        trial_dir = self._trial_dir(trial)
        planned = planned_epochs(job, folds)
        trial.set_user_attr("worker", self.worker_id)
        trial.set_user_attr("run_dir", os.path.abspath(trial_dir))
        trial.set_user_attr("seed", int(job["seed"]))
        trial.set_user_attr("epochs_planned", planned)
        spent = {"epochs": 0}
        t0 = time.time()
        run_job = self.run_job
        assert run_job is not None  # set by __post_init__

        def on_record(record: dict) -> None:
            spent["epochs"] += 1
            if not folds:
                trial.report(float(record[self.metric]), int(record["global_epoch"]) - 1)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {record['global_epoch']}")

        try:
            if not folds:
                summary = run_job(job, trial_dir, quiet=True, on_record=on_record, evaluate_test=False,
                                       announce=False)
                return self._score(summary)
            scores = []
            for i in range(folds):
                summary = run_job(job, os.path.join(trial_dir, f"fold{i}"), quiet=True, on_record=on_record,
                                       evaluate_test=False, fold=(folds, i), announce=False)
                scores.append(self._score(summary))
                trial.set_user_attr("fold_scores", scores)
                trial.report(statistics.fmean(scores), i)
                if i + 1 < folds and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {i + 1} of {folds}")
            return statistics.fmean(scores)
        except NonFiniteLoss as e:  # a setting that diverges loses: not a failure, run again
            spent["epochs"] += 1  # the epoch it diverged in was trained (in whole or in part) without a record
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            trial.set_user_attr("epochs_run", spent["epochs"])
            trial.set_user_attr("train_s", round(time.time() - t0, 2))
            for root, dirs, _ in os.walk(trial_dir):  # a trial keeps its record, not its checkpoints
                if "checkpoints" in dirs:
                    shutil.rmtree(os.path.join(root, "checkpoints"), ignore_errors=True)

    def _score(self, summary: Optional[dict]) -> float:
        if summary is None:
            raise RuntimeError("the trial's job ended without a summary")
        value = float(summary["val"][self.metric[len("val_"):]])
        if not math.isfinite(value):
            raise ValueError(f"the trial cannot be scored: {self.metric} is {value}")
        return value

    def _announce(self, study, trial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        state = trial.state.name.lower()
        if state == "fail":
            self.failures += 1
            self.last_failure = trial.user_attrs.get("error", "unknown error")
            self.say(f"trial {trial.number} failed: {self.last_failure} (traceback in "
                     f"{os.path.join(self._trial_dir(trial), 'error.txt')})")
            return
        self.failures = 0
        if trial.user_attrs.get("infeasible"):
            self.say(f"trial {trial.number} pruned before training, infeasible: {trial.user_attrs['infeasible']}")
            return
        if trial.user_attrs.get("diverged"):
            self.say(f"trial {trial.number} pruned: {trial.user_attrs['diverged']} "
                     f"({', '.join(f'{k}={_short(v)}' for k, v in trial.params.items())})")
            return
        value = trial.value if trial.value is not None else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        shown = f"{self.metric} {value:.4f}" if value is not None else "no score"
        run = trial.user_attrs.get("epochs_run", 0)
        try:
            best = f"; best #{study.best_trial.number} {study.best_value:.4f}"
        except ValueError:
            best = ""
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        self.say(f"trial {trial.number} {state}: {shown} after {run}/{trial.user_attrs.get('epochs_planned', '?')} "
                 f"epochs, {trial.user_attrs.get('train_s', 0):.0f}s ({params}){best}  "
                 f"[{finished_count(study)}/{self.trials}]")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def work(plan: Plan, study, run_dir: str, trials: int, say: Callable[[str], None] = print) -> None:
    """Runs trials of ``study`` in this process until it has ``trials`` finished ones."""
    Worker(plan, study, run_dir, trials, say).work()


def wait_for_others(study, poll: float = 1.0) -> None:
    """Until no trial of the study is running (stale ones are failed)."""
    optuna = _optuna()
    while True:
        optuna.storages.fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=_states("RUNNING")):
            return
        time.sleep(poll)


def seeds_for(job: dict, n: int, used: Sequence[int] = ()) -> List[int]:
    """The final runs' training seeds: the ``n`` seeds after the plan's (``seed + 1``, ``seed + 2``,
    ...), skipping any in ``used`` (the seeds the study's trials trained with), so that no final run
    re-trains a trial: the best plan's selected trial would otherwise come back as its first final
    run, its validation score the maximum over the trials. The split stays."""
    taken = {int(job["seed"]), *(int(s) for s in used)}
    seeds: List[int] = []
    seed = int(job["seed"])
    while len(seeds) < n:
        seed += 1
        if seed not in taken:
            seeds.append(seed)
    return seeds


def mean_sd(xs: Sequence[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(xs) if xs else None, "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs), "values": list(xs)}


# ----- after the search ------------------------------------------------------------------------------

def baseline_trial(study):
    """The hand-written plan's trial (queued first when the space gives defaults), if it finished."""
    for t in study.get_trials(deepcopy=False, states=_states("COMPLETE")):
        if t.user_attrs.get("baseline"):
            return t
    return None


def _final_run(run_job: Optional[Callable[..., Optional[dict]]], cfg: dict, run_dir: str) -> dict:
    """One final run (module-level: worker processes run it too)."""
    if run_job is None:
        from .job import run_job as default_run_job

        run_job = default_run_job
    summary = run_job(cfg, run_dir, quiet=True, announce=False)
    assert summary is not None
    return summary


def _outcome(run: Callable[[], dict]):
    """``(summary, None)`` from a final run, or ``(None, the exception)`` when it raised."""
    try:
        return run(), None
    except Exception as e:  # NonFiniteLoss (diverged), or any error: the other runs go on
        return None, e


def _write_error(run_dir: str, error: BaseException) -> None:
    import traceback

    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "error.txt"), "w", encoding="utf-8") as fh:
            fh.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    except OSError:
        pass


def final_runs(plan: Plan, study, run_dir: str, say: Callable[[str], None] = print,
               run_job: Optional[Callable[..., Optional[dict]]] = None, jobs: int = 1) -> Dict[str, Any]:
    """The best plan (and the hand-written one, if the space gives it) re-run with
    ``final_seeds`` training seeds that no trial trained with (:func:`seeds_for`), each evaluated
    on the test split once; when the best plan
    is the hand-written one its runs serve both (``"same_as": "best"``). With ``jobs`` > 1 the
    runs go to that many worker processes (each run sets its own threads and seeds, so the
    results are those of running them one after another); ``run_job`` must then be picklable.
    A run that diverges or raises is recorded (``"failed": "diverged"`` or ``"error"``, with the
    error's first line; the traceback in its ``error.txt``), the others go on, and each plan's
    means are over its finished runs (``"failed"``: how many did not finish)."""
    n = plan.settings.final_seeds
    plans = {"best": trial_values(plan, best_trial(study).params)}
    if plan.defaults is not None:
        plans["default"] = plan.defaults
    if plans.get("default") == plans["best"]:  # the search kept the hand-written plan: run it once
        del plans["default"]
    # the same seeds for both plans (a fair comparison), none that a trial trained with
    used = {int(t.user_attrs["seed"]) for t in study.get_trials(deepcopy=False) if "seed" in t.user_attrs}
    seeds = seeds_for(plan.job(plans["best"]), n, sorted(used))
    runs_of = [(label, values, seed, dict(pretrained_in_study(plan.job(values), run_dir), seed=seed))
               for label, values in plans.items() for seed in seeds]
    dirs = [os.path.join(run_dir, "final", label, f"seed{seed}") for label, _, seed, _ in runs_of]
    pool = None
    if jobs > 1 and len(runs_of) > 1:
        import concurrent.futures
        import multiprocessing

        # spawn: a forked child would inherit torch's thread pools mid-state
        pool = concurrent.futures.ProcessPoolExecutor(min(jobs, len(runs_of)), mp_context=multiprocessing.get_context("spawn"))
    try:
        if pool is not None:
            pending = [pool.submit(_final_run, run_job, cfg, d) for (_, _, _, cfg), d in zip(runs_of, dirs)]
            outcomes = (_outcome(f.result) for f in pending)  # in submission order: best plan first, by seed
        else:
            outcomes = (_outcome(lambda: _final_run(run_job, cfg, d)) for (_, _, _, cfg), d in zip(runs_of, dirs))
        out: Dict[str, Any] = {}
        for (label, values, seed, _), d, (summary, error) in zip(runs_of, dirs, outcomes):
            entry = out.setdefault(label, {"values": values, "runs": []})
            if error is not None:  # recorded; the other runs go on and the means are over the finished ones
                diverged = type(error).__name__ == "NonFiniteLoss"
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                entry["runs"].append({"seed": seed, "failed": "diverged" if diverged else "error",
                                      "error": message})
                _write_error(d, error)
                say(f"final {label} plan, seed {seed}: {'diverged' if diverged else 'failed'}: {message} "
                    f"(traceback in {os.path.join(d, 'error.txt')})")
                continue
            entry["runs"].append({"seed": seed, "val": summary["val"], "test": summary.get("test"),
                                  "wall_time_s": summary.get("wall_time_s")})
            test = summary.get("test") or {}
            say(f"final {label} plan, seed {seed}: test accuracy {test.get('accuracy', float('nan')):.4f}, "
                f"validation {summary['val']['accuracy']:.4f}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for entry in out.values():
        runs = [r for r in entry["runs"] if not r.get("failed")]
        entry["failed"] = len(entry["runs"]) - len(runs)
        entry["test_accuracy"] = mean_sd([r["test"]["accuracy"] for r in runs if r["test"]])
        entry["val_accuracy"] = mean_sd([r["val"]["accuracy"] for r in runs])
    if "default" in plans or plan.defaults is None:
        return out
    return {**out, "default": dict(out["best"], same_as="best")}
