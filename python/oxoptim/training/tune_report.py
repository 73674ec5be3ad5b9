"""What a search leaves in its run directory: the best plan as TOML, the table of trials, the
compute it spent against what its trials would have cost unpruned, Optuna's plots, a summary."""

from __future__ import annotations

import csv
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional

from .checkpoint import atomic_write_bytes
from .toml_writer import dumps

__all__ = ["write_best_plan", "trial_rows", "write_trials", "compute_spent", "write_plots", "write_summary"]


def write_best_plan(plan, study, path: str) -> dict:
    """The best trial's job as a TOML file ``oxoptim train --config`` runs; returns that job."""
    from .tune import best_trial, trial_values

    best = best_trial(study)
    values = trial_values(plan, best.params)
    job = plan.job(values)
    scored = (f"mean over {plan.settings.cv_folds}-fold cross-validation of the training split"
              if plan.settings.cv_folds else "on the validation split")
    header = (f"The best plan of study {study.study_name!r}: trial {best.number}, "
              f"{plan.settings.metric} {best.value:.6g}, {scored}.\n"
              "Run it with: oxoptim train --config " + os.path.basename(path))
    atomic_write_bytes(path, dumps(job, header).encode("utf-8"))
    return job


def trial_rows(study) -> List[Dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "value": t.value, "last_reported": last,
            "epochs_run": t.user_attrs.get("epochs_run"), "epochs_planned": t.user_attrs.get("epochs_planned"),
            "train_s": t.user_attrs.get("train_s"), "baseline": bool(t.user_attrs.get("baseline")),
            "retry_of": t.system_attrs.get("failed_trial"), "worker": t.user_attrs.get("worker"),
            "error": t.user_attrs.get("error"), **{f"param:{k}": v for k, v in t.params.items()},
        })
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_trials(study, md_path: str, csv_path: str) -> None:
    rows = trial_rows(study)
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in columns if c not in ("worker", "error", "retry_of") or any(r.get(c) for r in rows)]
    lines = ["| " + " | ".join(c.replace("param:", "") for c in shown) + " |",
             "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode("utf-8"))


def compute_spent(study) -> Dict[str, Any]:
    """Epochs the finished trials ran, against what they would have run unpruned: a completed trial
    its own epochs, a pruned one its plan's (an upper bound when early stopping would have ended
    it sooner, so the fraction errs towards less compute spent). Also in seconds, a pruned trial's
    missing epochs at the pace of its own (its batch size and model decide what an epoch costs).
    Trials killed with their worker and run again are not counted."""
    run = unpruned = 0
    counts: Dict[str, int] = {}
    seconds = seconds_unpruned = 0.0
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        state = t.state.name.lower()
        counts[state] = counts.get(state, 0) + 1
        if state not in ("complete", "pruned"):
            continue
        ran = int(t.user_attrs.get("epochs_run", 0))
        planned = ran if state == "complete" else max(ran, int(t.user_attrs.get("epochs_planned", ran)))
        run += ran
        unpruned += planned
        spent = float(t.user_attrs.get("train_s", 0.0))
        seconds += spent
        seconds_unpruned += spent * planned / ran if ran else 0.0  # a pruned trial's epochs at its own pace
    return {"epochs_run": run, "epochs_unpruned": unpruned,
            "fraction": round(run / unpruned, 4) if unpruned else None, "trial_seconds": round(seconds, 1),
            "trial_seconds_unpruned_estimate": round(seconds_unpruned, 1),
            "seconds_fraction": round(seconds / seconds_unpruned, 4) if seconds_unpruned else None,
            "trials": counts}


def write_plots(study, run_dir: str) -> Dict[str, str]:
    """Optuna's optimisation history, parameter importances and intermediate values as PNGs;
    returns the plots that could not be drawn, with the reason."""
    missing: Dict[str, str] = {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ov
    except ImportError as e:
        return {"plots": f"matplotlib is not installed ({e})"}
    plots: Dict[str, Callable[[Any], Any]] = {"optimization_history.png": ov.plot_optimization_history,
             "param_importances.png": ov.plot_param_importances,
             "intermediate_values.png": ov.plot_intermediate_values}
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(os.path.join(run_dir, name), dpi=100)
            plt.close(fig)
        except Exception as e:  # e.g. importances need two completed trials that differ
            missing[name] = f"{type(e).__name__}: {e}".splitlines()[0]
    return missing


def write_summary(run_dir: str, summary: dict) -> None:
    atomic_write_bytes(os.path.join(run_dir, "tune_summary.json"),
                       (json.dumps(summary, indent=2, default=str) + "\n").encode("utf-8"))


def format_mean_sd(stats: Optional[dict], scale: float = 100.0) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    sd = stats.get("sd")
    return f"{scale * stats['mean']:.2f}" + (f" ± {scale * sd:.2f}" if sd is not None else "") + f" (n={stats['n']})"
