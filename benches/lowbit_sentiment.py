"""Low-precision weights and optimizer state on the default sentiment job, over several seeds.

    .venv/bin/python benches/lowbit_sentiment.py --seeds 0 1 2 [--variants fp32 adamw8bit bf16_sr bf16_nearest]
        [--run-root runs/lowbit_sentiment] [--out benches/results/lowbit_sentiment.json]
        [--md benches/results/lowbit_sentiment.md] [--reuse]

Each run is ``configs/default.toml`` (the default BiGRU job: two stages, 12 epochs, 1 thread) with
one change in every stage:

* ``fp32``: unchanged (fp32 weights, AdamW with fp32 moments);
* ``adamw8bit``: ``optimizer = "adamw8bit"`` (8-bit block-wise moments, fp32 weights);
* ``bf16_sr``: ``param_dtype = "bfloat16"``, ``stochastic_rounding = true`` (bfloat16 weights, no
  fp32 master copy, AdamW storing each update with stochastic rounding);
* ``bf16_nearest``: ``param_dtype = "bfloat16"`` rounded to nearest (the control: what
  stochastic rounding should beat).

Seeds vary initialisation, data order and dropout; the review split is fixed (``split_seed`` 0), so
the spread is the variant's own. Every setting is the default job's (chosen on validation); each run
evaluates the test split once, on the weights its plan selected on validation. Results are rewritten
after every run; ``--reuse`` keeps runs in --out whose configuration is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from typing import Dict, List, Optional

from seeded_runs import Results, aggregate, config_digest, pct  # benches/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "fp32": ("fp32 AdamW (the default job)", {}),
    "adamw8bit": ("AdamW8bit, fp32 weights", {"optimizer": "adamw8bit"}),
    "bf16_sr": ("bf16 weights + stochastic rounding (AdamW)", {"param_dtype": "bfloat16", "stochastic_rounding": True}),
    "bf16_nearest": ("bf16 weights rounded to nearest (AdamW, the control)", {"param_dtype": "bfloat16"}),
}


def variant_config(base: dict, variant: str, seed: int) -> dict:
    cfg = copy.deepcopy(base)
    cfg["seed"] = int(seed)
    for stage in cfg["stages"]:
        stage.update(VARIANTS[variant][1])
    return cfg


def run_one(variant: str, seed: int, cfg: dict, run_root: str, quiet: bool) -> dict:
    from oxoptim.training.job import run_job

    run_dir = os.path.join(run_root, f"{variant}-seed{seed}")
    digest = config_digest(cfg)  # before the job fills in its defaults
    summary = run_job(copy.deepcopy(cfg), run_dir, quiet=quiet)
    return {
        "variant": variant, "seed": seed, "config_digest": digest,
        "test_accuracy": summary["test"]["accuracy"], "val_accuracy": summary["val"]["accuracy"],
        "wall_time_s": summary["wall_time_s"], "run_dir": run_dir,
    }


def markdown(rows: List[dict], agg: Dict[str, dict], meta: dict) -> str:
    import torch

    out = [
        "# Low precision on the default sentiment job", "",
        f"`benches/lowbit_sentiment.py --seeds {' '.join(map(str, meta['seeds']))}`: `configs/default.toml` with one "
        f"change in both stages; split 0, seeds vary initialisation and data order; test evaluated once per run. "
        f"{meta['cpus']} CPU(s), torch {torch.__version__}, Python {platform.python_version()}, runs one after another "
        "(training seconds depend on what else ran on the machine).", "",
        "| variant | test acc (mean ± sd) | val acc (mean ± sd) | seeds | test acc − fp32's (points) |",
        "|---|---:|---:|---|---:|",
    ]
    fp32 = agg.get("fp32")
    for variant, a in agg.items():
        delta = "—"
        if fp32 is not None and variant != "fp32":
            delta = f"{100 * (a['test_accuracy']['mean'] - fp32['test_accuracy']['mean']):+.2f}"
        out.append(f"| {VARIANTS[variant][0]} | {pct(a['test_accuracy']['mean'], a['test_accuracy']['sd'])} | "
                   f"{pct(a['val_accuracy']['mean'], a['val_accuracy']['sd'])} | {', '.join(map(str, a['seeds']))} | {delta} |")
    out += ["", "sd: sample standard deviation over the seeds (n − 1).", "", "Per run:", "",
            "| variant | seed | test acc | val acc | training s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {VARIANTS[r['variant']][0]} | {r['seed']} | {100 * r['test_accuracy']:.2f}% | "
                   f"{100 * r['val_accuracy']:.2f}% | {r['wall_time_s']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="benches/results/lowbit_sentiment.json")
    ap.add_argument("--md", default="benches/results/lowbit_sentiment.md")
    ap.add_argument("--run-root", default="runs/lowbit_sentiment")
    ap.add_argument("--reuse", action="store_true", help="keep runs already in --out whose config is unchanged")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from oxoptim.training.config import load_config

    meta = {"seeds": args.seeds, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = Results(args.out, args.md, meta, "variant", args.reuse,
                      lambda rows: aggregate(rows, "variant", ("test_accuracy", "val_accuracy", "wall_time_s")),
                      lambda rows, agg: markdown(rows, agg, meta))
    base = load_config(os.path.join(ROOT, "configs", "default.toml"))
    for seed in args.seeds:  # seed-major: a partial run already compares every variant
        for variant in args.variants:
            cfg = variant_config(base, variant, seed)
            row = results.earlier(variant, seed, cfg) or run_one(variant, seed, cfg, args.run_root, args.quiet)
            results.add(row)
            print(f"{variant:<14} seed {seed}: test {row['test_accuracy']:.4f} val {row['val_accuracy']:.4f} "
                  f"training {row['wall_time_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
