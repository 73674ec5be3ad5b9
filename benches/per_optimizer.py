#!/usr/bin/env python3
"""One row per optimizer: oxoptim against torch's paths for it (default,
for-loop, foreach, fused where torch has it) or against its reference package
on PyPI (Lion: ``lion-pytorch``; Schedule-Free: ``schedulefree``; Prodigy:
``prodigyopt``), fresh
gradient tensors every step, on the benchmark's shape sets.

Same method as ``compare_torch.py`` (its ``run_case``: one process,
round-robin, per-round ratios, medians with min–max); only the ``fresh``
gradient mode. A contender that fails on CPU (a ``fused`` path torch lacks)
is listed with its error.

    python benches/per_optimizer.py            # GPT-2 small, seed classifier, 2000 × 64×64
    python benches/per_optimizer.py --quick    # small shapes, a smoke run

Writes benches/results/per_optimizer.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import machine_line, ratio_rounds, spread  # noqa: E402
from compare_torch import Build, Case, deepspeed_adam, gpt2_shapes, run_case, seed_shapes, without_out  # noqa: E402


def _build(cls: Any, prepare: Optional[Callable[[Any], None]] = None, **kw: Any) -> Build:
    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        opt = cls(params, **kw)
        if prepare is not None:
            prepare(opt)
        return opt.step

    return build


def _train_mode(opt: Any) -> None:
    opt.train()


def _torch_rows() -> List[tuple]:
    """(name, oxoptim class, torch class, settings) for every Rust-backed torch twin."""
    return [
        ("SGD (momentum)", oxoptim.SGD, torch.optim.SGD, dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)),
        ("Adam", oxoptim.Adam, torch.optim.Adam, dict(lr=1e-3)),
        ("AdamW", oxoptim.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
        ("RMSprop", oxoptim.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
        ("Adagrad", oxoptim.Adagrad, torch.optim.Adagrad, dict(lr=1e-2)),
        ("Adamax", oxoptim.Adamax, torch.optim.Adamax, dict(lr=2e-3)),
        ("NAdam", oxoptim.NAdam, torch.optim.NAdam, dict(lr=2e-3)),
        ("RAdam", oxoptim.RAdam, torch.optim.RAdam, dict(lr=1e-3)),
        ("Adadelta", oxoptim.Adadelta, torch.optim.Adadelta, dict(lr=1.0)),
        ("ASGD", oxoptim.ASGD, torch.optim.ASGD, dict(lr=1e-2)),
        ("Rprop", oxoptim.Rprop, torch.optim.Rprop, dict(lr=1e-2)),
        # torch's default is its for-loop (foreach only when asked: it costs memory).
        ("Adafactor", oxoptim.Adafactor, torch.optim.Adafactor, dict(lr=1e-2)),
    ]


def cases(notes: List[str]) -> List[Case]:
    out = []
    for name, ours, theirs, kw in _torch_rows():
        # Streams: param and grad read, param written, each state array read and written.
        arrays = len(ours([torch.zeros(1, requires_grad=True)], **kw).PARAM_SHAPED)
        contenders: Dict[str, Build] = {
            "oxoptim": _build(ours, **kw),
            "torch default": _build(theirs, **kw),
            "torch for-loop": _build(theirs, foreach=False, **kw),
            "torch foreach": _build(theirs, foreach=True, **kw),
        }
        if "fused" in theirs.__init__.__code__.co_varnames:
            contenders["torch fused"] = _build(theirs, fused=True, **kw)
        if theirs in (torch.optim.Adam, torch.optim.AdamW):
            contenders.update(deepspeed_adam(notes, theirs is torch.optim.AdamW, **kw))
        out.append(Case(name, 2 + arrays, 1 + arrays, contenders))
    # 8-bit state: against torch's fp32 paths and bitsandbytes' 8-bit twin (benches/lowbit.py has more).
    # Streams in bytes differ (1-byte codes); the rows report times, not GB/s.
    eight_bit = [("AdamW8bit", oxoptim.AdamW8bit, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2), 4, 3),
                 ("SGD8bit", oxoptim.SGD8bit, torch.optim.SGD, dict(lr=1e-3, momentum=0.9), 3, 2)]
    for name, ours, theirs, kw8, reads, writes in eight_bit:
        eight: Dict[str, Build] = {"oxoptim": _build(ours, **kw8), "torch default": _build(theirs, **kw8),
                                   "torch foreach": _build(theirs, foreach=True, **kw8), "torch fused": _build(theirs, fused=True, **kw8)}
        try:
            import bitsandbytes

            eight[f"bitsandbytes {name}"] = _build(getattr(bitsandbytes.optim, name), **kw8)
        except Exception as e:  # ImportError, or a build without CPU support
            notes.append(f"bitsandbytes unavailable ({type(e).__name__}): no bitsandbytes contender in the {name} row")
        out.append(Case(name, reads, writes, eight))
    references = []
    try:
        import lion_pytorch

        references.append(("Lion", 3, 2, oxoptim.Lion, {"lion-pytorch": _build(lion_pytorch.Lion, lr=1e-4, weight_decay=0.1)}, dict(lr=1e-4, weight_decay=0.1)))
    except ImportError:
        notes.append("lion-pytorch is not installed: no Lion row (pip install lion-pytorch)")
    try:
        import schedulefree

        for name, ours, ref, kw, streams in [
            ("AdamWScheduleFree", oxoptim.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=2.5e-3, weight_decay=1e-2), (4, 3)),
            ("SGDScheduleFree", oxoptim.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.1), (3, 2)),
        ]:
            contenders = {
                "schedulefree foreach": _build(ref, _train_mode, foreach=True, **kw),
                "schedulefree for-loop": _build(ref, _train_mode, foreach=False, **kw),
            }
            references.append((name, *streams, ours, contenders, kw))
    except ImportError:
        notes.append("schedulefree is not installed: no Schedule-Free rows (pip install schedulefree)")
    try:
        import prodigyopt

        # Reads p, g, s, p0 (the sums pass), then p, g, m, v, s; writes p, m, v, s.
        references.append(("Prodigy", 9, 4, oxoptim.Prodigy, {"prodigyopt": _build(prodigyopt.Prodigy)}, {}))
    except ImportError:
        notes.append("prodigyopt is not installed: no Prodigy row (pip install prodigyopt)")
    for name, reads, writes, ours, contenders, kw in references:
        prepare = _train_mode if hasattr(ours, "train") else None
        out.append(Case(name, reads, writes, {"oxoptim": _build(ours, prepare, **kw), **contenders}))
    return out


def shape_sets(quick: bool) -> Dict[str, list]:
    if quick:
        return {"GPT-2-like (1 layer, d=256)": gpt2_shapes(n_layer=1, d=256, vocab=4000, ctx=128), "100 × 64×64": [(64, 64)] * 100}
    return {"GPT-2 small": gpt2_shapes(), "seed classifier": seed_shapes(), "2000 × 64×64": [(64, 64)] * 2000}


def _times(records: List[dict], impl: str) -> List[float]:
    return next((r["ms"] for r in records if r["impl"] == impl and r["ms"]), [])


def row_cells(records: List[dict]) -> Dict[str, str]:
    """oxoptim's median ms, and per-round speedups over torch's default, its fastest path, and the reference package."""
    ox = _times(records, "oxoptim")
    cells = {"oxoptim ms": f"{sorted(ox)[len(ox) // 2]:.2f}" if ox else "n/a"}
    if _times(records, "torch default"):
        cells["vs torch default"] = spread(*ratio_rounds(_times(records, "torch default"), ox))
        fast_paths = [p for p in ("torch foreach", "torch fused") if _times(records, p)]
        fastest = [min(ts) for ts in zip(*(_times(records, p) for p in fast_paths))]
        cells["vs torch's fastest (foreach/fused)"] = spread(*ratio_rounds(fastest, ox)) + f" [{'/'.join(p[6:] for p in fast_paths)}]"
    refs = [r["impl"] for r in records if r["impl"] != "oxoptim" and not r["impl"].startswith("torch")]  # packages, DeepSpeed
    for impl in refs:
        ts = _times(records, impl)
        cells[f"vs {impl}"] = spread(*ratio_rounds(ts, ox)) if ts else next(r["note"] for r in records if r["impl"] == impl)
    failed = [f"{r['impl']}: {r['note']}" for r in records if not r["ms"] and r["impl"].startswith("torch")]
    cells["not measured"] = "; ".join(failed)
    return cells


def markdown(data: dict) -> str:
    lines = [
        "# One row per optimizer: oxoptim against torch's paths or the reference package",
        "",
        f"- machine: {data['machine']}; torch {data['torch']}, oxoptim {data['oxoptim']} (SIMD `{data['simd']}`), {data['threads']} threads, Python {data['python']}",
        f"- {data['rounds']} round-robin rounds, fresh gradient tensors every step, only `step()` timed; speedup = contender ms / oxoptim ms "
        "per round (> 1: oxoptim faster), median (min–max); \"torch's fastest\" is the faster of foreach and fused in each round",
        f"- command: `{data['command']}`",
        "",
    ]
    for set_name in dict.fromkeys(r["set"] for r in data["results"]):
        rows = [(case, row_cells([r for r in data["results"] if r["set"] == set_name and r["case"] == case])) for case in dict.fromkeys(r["case"] for r in data["results"] if r["set"] == set_name)]
        columns = list(dict.fromkeys(k for _, cells in rows for k in cells))
        lines += [f"### {set_name}", "", "| optimizer | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {case} | " + " | ".join(cells.get(c, "") for c in columns) + " |" for case, cells in rows]
        lines.append("")
    return "\n".join(lines + [f"note: {n}" for n in data["notes"]]) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape sets, few rounds")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, quick 3)")
    ap.add_argument("--target", type=float, help="seconds per contender per round (default 0.25, quick 0.02)")
    ap.add_argument("--sets", help="comma-separated substrings selecting shape sets")
    ap.add_argument("--optimizers", help="comma-separated substrings selecting optimizers")
    ap.add_argument("--out", type=Path, help="markdown output (default benches/results/per_optimizer[_quick].md); .json alongside")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    target = args.target or (0.02 if args.quick else 0.25)
    out = args.out or here / "results" / ("per_optimizer_quick.md" if args.quick else "per_optimizer.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    notes: List[str] = []
    all_cases = cases(notes)
    sel_sets = [s.strip().lower() for s in args.sets.split(",")] if args.sets else None
    sel_opts = [s.strip().lower() for s in args.optimizers.split(",")] if args.optimizers else None
    results: List[dict] = []
    t0 = time.perf_counter()
    for set_name, shapes in shape_sets(args.quick).items():
        if sel_sets and not any(s in set_name.lower() for s in sel_sets):
            continue
        print(f"== {set_name}: {len(shapes)} tensors")
        for case in all_cases:
            if sel_opts and not any(s in case.name.lower() for s in sel_opts):
                continue
            records, n_steps = run_case(shapes, case, rounds, target, grad_modes=("fresh",))
            for rec in records:
                rec.update({"set": set_name, "case": case.name, "steps_per_block": n_steps})
            results += records
            print(f"  {case.name:<20} " + "  ".join(f"{k}: {v}" for k, v in row_cells(records).items() if v))
            sys.stdout.flush()
    data = {
        "kind": "per_optimizer",
        "command": " ".join(["python benches/per_optimizer.py"] + without_out(list(argv if argv is not None else sys.argv[1:]))),
        "machine": machine_line(),
        "torch": torch.__version__,
        "oxoptim": oxoptim.__version__,
        "simd": oxoptim.simd_backend(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": rounds,
        "notes": notes,
        "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.write_text(markdown(data))
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
