#!/usr/bin/env python3
"""The step inside backward when another process competes for the cores.

Each update inside backward runs right after a torch op. torch's OpenMP
workers spin for a while after each op (libgomp's default wait policy), and
the update's own parallel region ends at a barrier. On a quiet machine that
costs nothing; with another busy process on the cores the spinners and the
barrier compete with it. This bench times, per training iteration, the
ordinary loop (``backward(); step()``) and ``oxoptim.step_in_backward``, on a
quiet machine and beside one busy process (a Python loop that spins for the
whole measurement), under libgomp's default wait policy and under
``OMP_WAIT_POLICY=passive`` (which must be set before torch starts, so each
cell runs in its own process).

Model: 24 × (Linear(384, 384) + tanh), 3.5M parameters, batch 64, AdamW.
Each child process: 3 warm-up iterations per contender, then ``--iters``
iterations per contender, alternating; ``--rounds`` rounds of all four cells
(quiet/busy × default/passive), round-robin. Figures: median (min–max) of
ms per iteration over every iteration of every round.

    python benches/contention.py                      # 3 rounds × 20 iterations
    python benches/contention.py --rounds 1 --iters 5 # smoke

Writes benches/results/contention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CELLS = [("quiet", "default"), ("quiet", "passive"), ("busy", "default"), ("busy", "passive")]
CONTENDERS = ["oxoptim AdamW, loop", "oxoptim AdamW, in backward"]


def child(iters: int) -> Dict[str, List[float]]:
    """Times both contenders in this process (its OpenMP policy is its environment's)."""
    import torch

    import oxoptim

    def build():
        torch.manual_seed(0)
        layers = []
        for _ in range(24):
            layers += [torch.nn.Linear(384, 384), torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers)
        return model, oxoptim.AdamW(model.parameters(), lr=1e-3)

    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(1))
    loop_model, loop_opt = build()
    sib_model, sib_opt = build()
    times: Dict[str, List[float]] = {name: [] for name in CONTENDERS}
    with oxoptim.step_in_backward(sib_opt):
        for i in range(3 + iters):
            for name, model, opt in ((CONTENDERS[0], loop_model, loop_opt), (CONTENDERS[1], sib_model, sib_opt)):
                t0 = time.perf_counter()
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 3:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run_cell(load: str, policy: str, iters: int) -> Dict[str, List[float]]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(iters)], capture_output=True, text=True,
                             check=True, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(ms: List[float]) -> str:
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}–{max(ms):.2f})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_report import machine_line

    results: Dict[str, Dict[str, List[float]]] = {f"{load}, {policy}": {n: [] for n in CONTENDERS} for load, policy in CELLS}
    for r in range(args.rounds):
        for k in range(len(CELLS)):
            load, policy = CELLS[(k + r) % len(CELLS)]
            for name, ms in run_cell(load, policy, args.iters).items():
                results[f"{load}, {policy}"][name].extend(ms)
            print(f"round {r + 1}: {load}, {policy} done", flush=True)
    out = args.out or Path(__file__).resolve().parent / "results" / "contention.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": "contention", "machine": machine_line(), "rounds": args.rounds, "iters": args.iters,
            "command": " ".join(["python benches/contention.py", *(argv if argv is not None else sys.argv[1:])]),
            "results": results}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# The step inside backward beside a busy process",
        "",
        f"{data['machine']}; command `{data['command']}`; {args.rounds} rounds × {args.iters} iterations per "
        "contender per cell, each cell in its own process; ms per iteration (forward, backward, step), "
        "median (min–max). 24 × Linear(384, 384) + tanh, batch 64, oxoptim AdamW. 'busy': one other process "
        "spinning a Python loop; 'passive': OMP_WAIT_POLICY=passive.",
        "",
        "| machine, OpenMP wait policy | " + " | ".join(CONTENDERS) + " | in backward / loop (medians) |",
        "|---|---|---|---|",
    ]
    for cell, rec in results.items():
        ratio = statistics.median(rec[CONTENDERS[1]]) / statistics.median(rec[CONTENDERS[0]])
        lines.append(f"| {cell} | {fmt(rec[CONTENDERS[0]])} | {fmt(rec[CONTENDERS[1]])} | {ratio:.2f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
