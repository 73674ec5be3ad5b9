#!/usr/bin/env python3
"""Fewer bytes per step: 8-bit state, bf16 state and bf16 weights against
fp32 AdamW, one ``step()`` on GPT-2-small shapes.

Contenders, each owning its parameters and state: torch
``AdamW(fused=True)`` with fp32 weights (the reference of every ratio);
``oxoptim.AdamW``, ``AdamW8bit`` and ``AdamW(state_dtype=torch.bfloat16)``
with fp32 weights; bf16 weights without an fp32 master copy:
``oxoptim.AdamW(bf16_stochastic_round=True)``,
``oxoptim.AdamW8bit(bf16_stochastic_round=True)``,
``oxoptim.AdamW(kahan_sum=True)``; and, when they import and run on this
CPU, ``bitsandbytes.optim.AdamW8bit``, ``torchao.optim.AdamW8bit``,
``torchao.optim._AdamW(bf16_stochastic_round=True)`` and
``optimi.AdamW(kahan_sum=True)`` (their error is reported otherwise). The
weights column says which dtype each contender's parameters have. Before every step each parameter gets a fresh
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
    python benches/lowbit.py --only "AdamW8bit|bf16"            # contenders whose name matches
    python benches/lowbit.py --family sgd --out benches/results/lowbit_sgd.md   # SGD with momentum

``--family sgd`` measures SGD with momentum 0.9 the same way: torch
``SGD(fused=True)`` (the reference), ``oxoptim.SGD``, ``SGD8bit`` (fp32 and
bf16 + SR weights), ``oxoptim.SGD(bf16_stochastic_round=True)`` and
``bitsandbytes.optim.SGD8bit`` (torchao and torch-optimi have no 8-bit SGD).

No timing assertions: this is a measurement. Writes markdown to ``--out``
(default benches/results/lowbit.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
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
SGD_REFERENCE = "torch SGD(momentum, fused=True)"


def _bitsandbytes(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-3)


def _bitsandbytes_sgd(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.SGD8bit(params, lr=1e-3, momentum=0.9)


def _torchao(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-3)


def _torchao_sr(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from torchao.optim import _AdamW

    return _AdamW(params, lr=1e-3, bf16_stochastic_round=True)


def _optimi_kahan(params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import optimi

    return optimi.AdamW(params, lr=1e-3, kahan_sum=True)


#: Contenders whose parameters are bfloat16 (the others' are float32).
BF16_WEIGHTS = {
    "oxoptim AdamW bf16 weights + SR",
    "oxoptim AdamW8bit bf16 weights + SR",
    "oxoptim AdamW bf16 weights + Kahan",
    "torchao _AdamW bf16 weights + SR",
    "torch-optimi AdamW bf16 weights + Kahan",
    "oxoptim SGD bf16 weights + SR",
    "oxoptim SGD8bit bf16 weights + SR",
}


def contenders() -> Dict[str, Build]:
    return {
        REFERENCE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "oxoptim AdamW": lambda ps: oxoptim.AdamW(ps, lr=1e-3),
        "oxoptim AdamW8bit": lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3),
        "oxoptim AdamW bf16 state": lambda ps: oxoptim.AdamW(ps, lr=1e-3, state_dtype=torch.bfloat16),
        "oxoptim AdamW bf16 weights + SR": lambda ps: oxoptim.AdamW(ps, lr=1e-3, bf16_stochastic_round=True),
        "oxoptim AdamW8bit bf16 weights + SR": lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3, bf16_stochastic_round=True),
        "oxoptim AdamW bf16 weights + Kahan": lambda ps: oxoptim.AdamW(ps, lr=1e-3, kahan_sum=True),
        "bitsandbytes AdamW8bit": _bitsandbytes,
        "torchao AdamW8bit": _torchao,
        "torchao _AdamW bf16 weights + SR": _torchao_sr,
        "torch-optimi AdamW bf16 weights + Kahan": _optimi_kahan,
    }


def sgd_contenders() -> Dict[str, Build]:
    return {
        SGD_REFERENCE: lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
        "oxoptim SGD": lambda ps: oxoptim.SGD(ps, lr=1e-3, momentum=0.9),
        "oxoptim SGD8bit": lambda ps: oxoptim.SGD8bit(ps, lr=1e-3, momentum=0.9),
        "oxoptim SGD bf16 weights + SR": lambda ps: oxoptim.SGD(ps, lr=1e-3, momentum=0.9, bf16_stochastic_round=True),
        "oxoptim SGD8bit bf16 weights + SR": lambda ps: oxoptim.SGD8bit(ps, lr=1e-3, momentum=0.9, bf16_stochastic_round=True),
        "bitsandbytes SGD8bit": _bitsandbytes_sgd,
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
        self.dtype = torch.bfloat16 if name in BF16_WEIGHTS else torch.float32
        self.params = [torch.nn.Parameter(torch.empty(s).uniform_(-0.1, 0.1, generator=gen).to(self.dtype)) for s in shapes]
        self.grads = grads if self.dtype == torch.float32 else [g.to(self.dtype) for g in grads]
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
    ap.add_argument("--only", default="", help="a regular expression: only contenders whose name matches (the reference always runs)")
    ap.add_argument("--family", choices=("adamw", "sgd"), default="adamw", help="AdamW (default) or SGD with momentum contenders")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lowbit.md")
    args = ap.parse_args(argv)
    reference = REFERENCE if args.family == "adamw" else SGD_REFERENCE
    table = contenders() if args.family == "adamw" else sgd_contenders()

    n_layer = max(1, round(12 * args.scale))
    shapes = gpt2_shapes(n_layer=n_layer, vocab=max(1024, int(50257 * args.scale)))
    n_params = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.empty(s).uniform_(-1e-3, 1e-3, generator=gen) for s in shapes]

    runners: List[Runner] = []
    failed: Dict[str, str] = {}
    for name, build in table.items():
        if args.only and name != reference and not re.search(args.only, name):
            continue
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

    ref = next((x for x in runners if x.name == reference), None)
    lines = [
        f"# 8-bit and bf16 {'AdamW' if args.family == 'adamw' else 'SGD with momentum 0.9'}, one step on GPT-2-small shapes",
        "",
        f"{machine_line()}; {torch.get_num_threads()} threads; torch {torch.__version__}; oxoptim {oxoptim.__version__} ({oxoptim.simd_backend()})",
        f"{len(shapes)} tensors, {n_params / 1e6:.1f}M parameters (scale {args.scale}); fresh gradients every step; "
        f"{args.rounds} rounds × {args.steps} steps, round-robin; medians with min–max over rounds.",
        *([args.note] if args.note else []),
        f"Load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        "",
        f"| optimizer | weights | ms/step | speed-up vs {reference} | state bytes/param |",
        "|---|---|---|---|---|",
    ]
    for x in runners:
        ms = [t * 1e3 for t in x.times]
        ratio = spread(*ratio_rounds(ref.times, x.times)) if ref is not None else "n/a"
        weights = "bf16" if x.dtype == torch.bfloat16 else "fp32"
        lines.append(f"| {x.name} | {weights} | {spread(min(ms), median(ms), max(ms), '')} | {ratio} | {x.state_bytes / n_params:.3f} |")
    for name, err in failed.items():
        lines.append(f"| {name} | failed: {err} | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
