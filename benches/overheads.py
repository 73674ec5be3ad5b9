#!/usr/bin/env python3
"""Per-tensor cost of an optimizer step, where memory traffic is negligible.

    python benches/overheads.py [--tensors 2000] [--numel 16] [--rounds 7] [--out benches/results/overheads.md]

AdamW on ``--tensors`` parameters of ``--numel`` elements each (2,000 × 16 by default: 125 KiB per
array, 500 KiB for param, gradient and both moments, so the time is what every implementation
spends per tensor, not per byte), every contender of ``compare_torch.py``'s AdamW case, fresh
gradient tensors every step and the same ones reused, round-robin rounds, medians with min–max;
µs per tensor = ms per step / tensors.

It also times, in this process, the torch calls oxoptim makes per tensor to describe it and keep it
alive while a kernel runs without the GIL (``data_ptr``, ``is_contiguous``, ``numel``, ``is_neg``
and ``detach``, whose alias holds each uncached tensor's storage: fresh gradients get one every step),
so the part of the per-tensor cost that buys memory safety is visible. The in-flight registry's cost
per native call is a Rust bench: ``cargo bench -p oxoptim-core --bench kernels -- in_flight``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import oxoptim
from bench_report import machine_line, median, ratio_rounds, spread  # benches/ is on sys.path when run as a script
from compare_torch import cases, run_case

#: The torch calls a step makes per described tensor (see rust/python/src/tensors.rs).
DESCRIBE_CALLS = ("data_ptr", "is_contiguous", "numel", "is_neg", "detach")


def per_call_ns(name: str, number: int = 200_000) -> float:
    """Best-of-5 ns of one unbound ``Tensor.<name>`` call on a 16-element tensor (loop cost subtracted)."""
    t = torch.zeros(16)
    method = getattr(torch.Tensor, name)
    empty = min(timeit.repeat(lambda: None, number=number, repeat=5))
    best = min(timeit.repeat(lambda: method(t), number=number, repeat=5))
    return 1e9 * (best - empty) / number


def markdown(rows: List[dict], calls: Dict[str, float], meta: dict) -> str:
    by = {(r["impl"], r["mode"]): r for r in rows}
    out = [
        "# Per-tensor cost of an AdamW step",
        "",
        f"{meta['machine']}; torch {torch.__version__}, oxoptim {oxoptim.__version__} (`{oxoptim.simd_backend()}`), "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. AdamW on {meta['tensors']} parameters of "
        f"{meta['numel']} elements, {meta['rounds']} round-robin rounds of {meta['steps']} steps; only `step()` is timed; "
        "medians (min–max over rounds); ratios are per round (contender / oxoptim, > 1: oxoptim faster).",
        f"Command: `{meta['command']}`.",
        "",
        "| contender | µs per tensor, fresh gradients | vs oxoptim, fresh | µs per tensor, reused gradients | vs oxoptim, reused |",
        "|---|---:|---:|---:|---:|",
    ]
    n = meta["tensors"]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        cells = []
        for mode in ("fresh", "reused"):
            r, ours = by.get((impl, mode)), by.get(("oxoptim", mode))
            if not r or not r["ms"]:
                cells += [(r or {}).get("note", "") or "—", ""]
                continue
            us = [1e3 * ms / n for ms in r["ms"]]
            cells.append(spread(min(us), median(us), max(us), unit=""))
            cells.append("—" if impl == "oxoptim" else spread(*ratio_rounds(r["ms"], ours["ms"])))
        out.append(f"| {impl} | " + " | ".join(cells) + " |")
    out += ["", "torch calls oxoptim makes per described tensor (ns per call, best of 5):", ""]
    out += [f"- `Tensor.{name}`: {ns:.0f} ns" for name, ns in calls.items()]
    out += ["", "A cached tensor (parameter, optimizer state) is re-checked every step: `data_ptr`, `.dtype`, `.shape` "
            "(a step counter: `numel`), `is_contiguous` (not for one element) and `is_neg`, since each can change "
            "under the same data pointer; "
            "a fresh gradient is described in full, `detach` included (its alias keeps the storage alive while the "
            "kernel runs without the GIL)."]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.25, help="seconds per contender per mode per round")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "overheads.md")
    args = ap.parse_args(argv)
    (adamw,) = [c for c in cases([]) if c.name == "AdamW"]
    rows, steps = run_case([(args.numel,)] * args.tensors, adamw, args.rounds, args.target)
    calls = {name: per_call_ns(name) for name in DESCRIBE_CALLS}
    meta = dict(machine=machine_line(), tensors=args.tensors, numel=args.numel, rounds=args.rounds, steps=steps,
                command="python benches/overheads.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, calls, meta))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
