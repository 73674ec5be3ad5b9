#!/usr/bin/env python3
"""8-bit AdamW against fp32 AdamW: one ``step()`` on GPT-2-small shapes.

Contenders, each owning its parameters and state, all fp32 weights:
torch ``AdamW(fused=True)`` (the reference of every ratio), ``oxoptim.AdamW``,
``oxoptim.AdamW8bit``, and, when they import and run on this CPU,
``bitsandbytes.optim.AdamW8bit`` and ``torchao.optim.AdamW8bit`` (their
error is reported otherwise). Before every step each parameter gets a fresh
gradient tensor (a copy made outside the timer, at a new address). Each
round times every contender for ``--steps`` steps, starting contender
rotating; reported: median ms per step over rounds with min–max, and the
per-round ratio to torch fused with its min–max. State bytes per parameter
are measured by summing the bytes of every tensor in ``optimizer.state``.

GPT-2 small (124.4M parameters, 148 tensors): wte 50257×768, wpe 1024×768,
12 blocks of [ln_1 w/b 768, attn.c_attn 768×2304 + bias 2304, attn.c_proj
768×768 + bias 768, ln_2 w/b 768, mlp.c_fc 768×3072 + bias 3072, mlp.c_proj
3072×768 + bias 768], ln_f w/b 768.

    python benches/lowbit.py                   # full: 7 rounds of 5 steps
    python benches/lowbit.py --rounds 2 --steps 2 --scale 0.1   # quick check

No timing assertions: this is a measurement. Writes markdown to ``--out``
(default benches/results/lowbit.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import machine_line, median, ratio_rounds, spread  # noqa: E402
from compare_torch import gpt2_shapes  # noqa: E402

Shape = Tuple[int, ...]
Build = Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer]
REFERENCE = "torch AdamW(fused=True)"


def _bitsandbytes(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-3)


def _torchao(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-3)


def contenders() -> Dict[str, Build]:
    return {
        REFERENCE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "oxoptim AdamW": lambda ps: oxoptim.AdamW(ps, lr=1e-3),
        "oxoptim AdamW8bit": lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3),
        "bitsandbytes AdamW8bit": _bitsandbytes,
        "torchao AdamW8bit": _torchao,
    }


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps as state (torchao's subclasses by their inner tensors)."""
    total = 0
    for entry in opt.state.values():
        for v in entry.values():
            if isinstance(v, torch.Tensor):
                inner = getattr(v, "__tensor_flatten__", None)
                if inner is not None and type(v) is not torch.Tensor:
                    names, _ = v.__tensor_flatten__()
                    total += sum(getattr(v, n).numel() * getattr(v, n).element_size() for n in names)
                else:
                    total += v.numel() * v.element_size()
    return total


class Runner:
    def __init__(self, name: str, build: Build, shapes: List[Shape], grads: List[torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(1)
        self.name = name
        self.params = [torch.nn.Parameter(torch.empty(s).uniform_(-0.1, 0.1, generator=gen)) for s in shapes]
        self.grads = grads
        self.opt = build(self.params)
        self.step(1)  # untimed: creates the state
        self.state_bytes = state_bytes(self.opt)
        self.times: List[float] = []

    def step(self, n: int) -> float:
        total = 0.0
        for _ in range(n):
            fresh = [g.clone() for g in self.grads]
            for p, g in zip(self.params, fresh):
                p.grad = g
            t = time.perf_counter()
            self.opt.step()
            total += time.perf_counter() - t
        for p in self.params:
            p.grad = None
        return total / n


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per contender per round")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of GPT-2's vocabulary rows and blocks (quick checks)")
    ap.add_argument("--note", default="", help="a line added to the report (e.g. how busy the machine was)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lowbit.md")
    args = ap.parse_args(argv)

    n_layer = max(1, round(12 * args.scale))
    shapes = gpt2_shapes(n_layer=n_layer, vocab=max(1024, int(50257 * args.scale)))
    n_params = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.empty(s).uniform_(-1e-3, 1e-3, generator=gen) for s in shapes]

    runners: List[Runner] = []
    failed: Dict[str, str] = {}
    for name, build in contenders().items():
        try:
            runners.append(Runner(name, build, shapes, grads))
        except Exception as e:  # a contender that does not import or run on this CPU
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        gc.collect()
    print(f"{len(shapes)} tensors, {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads", flush=True)
    for r in range(args.rounds):
        order = runners[r % len(runners):] + runners[: r % len(runners)]
        for runner in order:
            runner.times.append(runner.step(args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{x.name} {x.times[-1] * 1e3:.1f} ms" for x in runners), flush=True)

    ref = next((x for x in runners if x.name == REFERENCE), None)
    lines = [
        "# 8-bit AdamW, one step on GPT-2-small shapes",
        "",
        f"{machine_line()}; {torch.get_num_threads()} threads; torch {torch.__version__}; oxoptim {oxoptim.__version__} ({oxoptim.simd_backend()})",
        f"{len(shapes)} tensors, {n_params / 1e6:.1f}M parameters (scale {args.scale}); fresh gradients every step; "
        f"{args.rounds} rounds × {args.steps} steps, round-robin; medians with min–max over rounds.",
        *([args.note] if args.note else []),
        f"Load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        "",
        f"| optimizer | ms/step | speed-up vs {REFERENCE} | state bytes/param |",
        "|---|---|---|---|",
    ]
    for x in runners:
        ms = [t * 1e3 for t in x.times]
        ratio = spread(*ratio_rounds(ref.times, x.times)) if ref is not None else "n/a"
        lines.append(f"| {x.name} | {spread(min(ms), median(ms), max(ms), '')} | {ratio} | {x.state_bytes / n_params:.3f} |")
    for name, err in failed.items():
        lines.append(f"| {name} | failed: {err} | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
