#!/usr/bin/env python3
"""oxoptim against torch.optim, same process, round-robin, medians of rounds.

For each shape set and optimizer, every contender (oxoptim, torch for-loop
``foreach=False``, torch ``foreach=True``, torch ``fused=True`` and torch's
default) owns its own parameters and optimizer state; the gradients are shared
(optimizers only read them). Each round runs every contender in turn (the
starting contender rotates), and the reported figure is the median over rounds
of the per-step time. Streaming memory bandwidth is measured in the same run
with torch ops on the same number of threads, so each result is also given as
GB/s of optimizer memory traffic and as a percentage of that roofline.

    python benches/compare_torch.py            # full run (several minutes)
    python benches/compare_torch.py --quick    # small version, well under a minute

Writes a markdown table (``--out``, default benches/results/compare_torch.md)
and a PNG bar chart next to it. No timing assertions: this is a measurement.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.optim.optimizer as _torch_optimizer

import oxoptim

F32 = 4  # bytes per element; every set is float32
Shape = Tuple[int, ...]

# --------------------------------------------------------------------------- shape sets


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> List[Shape]:
    """GPT-2 small as Hugging Face lays it out: 148 tensors, 124.4M elements."""
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes(widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (3, 4, 6, 3), classes: int = 1000) -> List[Shape]:
    """ResNet-50 (torchvision layout, BN weight+bias only): 161 tensors, 25.5M elements."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for w, n in zip(widths, blocks):
        for b in range(n):
            shapes += [(w, c_in, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,), (4 * w, w, 1, 1), (4 * w,), (4 * w,)]
            if b == 0:
                shapes += [(4 * w, c_in, 1, 1), (4 * w,), (4 * w,)]
            c_in = 4 * w
    return shapes + [(classes, c_in), (classes,)]


def seed_classifier(vocab: int = 5000, emb: int = 256, hidden: int = 256, classes: int = 2) -> torch.nn.Module:
    """The seed's text classifier: Embedding + bidirectional GRU + Dense (about 2.3M parameters)."""

    class SeedClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, emb, padding_idx=0)
            self.gru = torch.nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(2 * hidden, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.gru(self.embedding(x))
            return self.fc(out.mean(dim=1))

    return SeedClassifier()


def seed_shapes() -> List[Shape]:
    return [tuple(p.shape) for p in seed_classifier().parameters()]


def shape_sets(quick: bool) -> Dict[str, List[Shape]]:
    if quick:
        return {
            "GPT-2-like (1 layer, d=256)": gpt2_shapes(n_layer=1, d=256, vocab=4000, ctx=128),
            "seed classifier": seed_shapes(),
            "100 × 64×64": [(64, 64)] * 100,
            "one 4M tensor": [(4_000_000,)],
        }
    return {
        "GPT-2 small": gpt2_shapes(),
        "ResNet-50": resnet50_shapes(),
        "seed classifier": seed_shapes(),
        "2000 × 64×64": [(64, 64)] * 2000,
        "one 50M tensor": [(50_000_000,)],
    }


# --------------------------------------------------------------------------- bandwidth


def stream_bandwidth(n: int, reps: int) -> Dict[str, float]:
    """Best-of-``reps`` GB/s of a copy (a = b), a triad (a = b + s·c) and an
    in-place update (a += s·b) over ``n`` floats each.

    Bytes counted as the optimizers' are: every array read once, every written
    array written once. Optimizers update in place, so the in-place figure is
    the roofline: copy and triad also pay write-allocate traffic for `a` that
    this count does not see.
    """
    a, b, c = (torch.empty(n, dtype=torch.float32).uniform_() for _ in range(3))
    best = {"copy": 0.0, "triad": 0.0, "inplace": 0.0}
    for _ in range(reps):
        t = time.perf_counter()
        a.add_(b, alpha=0.5)
        best["inplace"] = max(best["inplace"], 3 * n * F32 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        a.copy_(b)
        best["copy"] = max(best["copy"], 2 * n * F32 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        best["triad"] = max(best["triad"], 3 * n * F32 / (time.perf_counter() - t) / 1e9)
    del a, b, c
    return best


# --------------------------------------------------------------------------- contenders


@dataclass
class Case:
    """One optimizer family: how to build each contender and how many arrays a step streams."""

    name: str
    arrays: int  # arrays streamed per element per step: reads + writes
    contenders: Dict[str, Callable[[List[torch.Tensor]], Callable[[], None]]]
    baseline: str = "oxoptim"


def _opt(cls, **kw) -> Callable[[List[torch.Tensor]], Callable[[], None]]:
    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        opt = cls(params, **kw)
        return opt.step

    return build


def _param_module(params: List[torch.Tensor]) -> torch.nn.Module:
    m = torch.nn.Module()
    m.ps = torch.nn.ParameterList(params)  # the same tensors, not copies
    return m


def _swa_ema(multi: bool, decay: float) -> Callable[[List[torch.Tensor]], Callable[[], None]]:
    from torch.optim import swa_utils

    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        model = _param_module(params)
        if multi:
            avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay))
        else:
            avg = swa_utils.AveragedModel(model, avg_fn=swa_utils.get_ema_avg_fn(decay))
        return lambda: avg.update_parameters(model)

    return build


def _ox_averager(decay: float) -> Callable[[List[torch.Tensor]], Callable[[], None]]:
    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        avg = oxoptim.ParamAverager(params, mode="ema", decay=decay)
        return avg.update

    return build


def _torch_paths(cls, **kw) -> Dict[str, Callable[[List[torch.Tensor]], Callable[[], None]]]:
    return {
        "torch for-loop": _opt(cls, foreach=False, **kw),
        "torch foreach": _opt(cls, foreach=True, **kw),
        "torch fused": _opt(cls, fused=True, **kw),
        "torch default": _opt(cls, **kw),
    }


def cases(notes: List[str]) -> List[Case]:
    out = [
        Case(
            "SGD momentum",
            5,  # read p, g, buf; write p, buf
            {"oxoptim": _opt(oxoptim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4), **_torch_paths(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4)},
        ),
        Case(
            "Adam",
            7,  # read p, g, m, v; write p, m, v
            {"oxoptim": _opt(oxoptim.Adam, lr=1e-3), **_torch_paths(torch.optim.Adam, lr=1e-3)},
        ),
        Case(
            "AdamW",
            7,
            {"oxoptim": _opt(oxoptim.AdamW, lr=1e-3, weight_decay=1e-2), **_torch_paths(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2)},
        ),
    ]
    if hasattr(oxoptim, "Subgradient"):
        out.append(
            Case(
                "Subgradient vs SGD",
                3,  # read p, g; write p
                {"oxoptim": _opt(oxoptim.Subgradient, lr=1e-3), **_torch_paths(torch.optim.SGD, lr=1e-3)},
            )
        )
    else:
        notes.append("oxoptim.Subgradient not available in this build: Subgradient-vs-SGD rows skipped.")
    if hasattr(oxoptim, "ParamAverager"):
        out.append(
            Case(
                "EMA averaging",
                3,  # read avg, p; write avg
                {
                    "oxoptim": _ox_averager(0.999),
                    "swa_utils multi_avg_fn": _swa_ema(True, 0.999),
                    "swa_utils avg_fn": _swa_ema(False, 0.999),
                },
            )
        )
    else:
        notes.append("oxoptim.ParamAverager not available in this build: EMA-averaging rows skipped.")
    return out


# --------------------------------------------------------------------------- timing


@dataclass
class Result:
    set_name: str
    case: str
    impl: str
    ms: float  # median ms per step
    gbps: float
    pct: float
    spread: float  # (max - min) / median over rounds, percent
    note: str = ""


def run_case(set_name: str, shapes: List[Shape], case: Case, rounds: int, target_s: float, roofline: float) -> List[Result]:
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.empty(s).uniform_(-1e-3, 1e-3, generator=gen) for s in shapes]
    base = [torch.empty(s).uniform_(-0.05, 0.05, generator=gen) for s in shapes]
    steps: Dict[str, Callable[[], None]] = {}
    holders: Dict[str, List[torch.Tensor]] = {}
    results: List[Result] = []
    default_note = ""
    for impl, build in case.contenders.items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g
        try:
            step = build(params)
            step()  # lazy state creation and first-call work happen outside the timing
            step()
        except Exception as e:  # e.g. a fused path torch lacks on CPU
            results.append(Result(set_name, case.name, impl, float("nan"), float("nan"), float("nan"), 0.0, f"unavailable: {type(e).__name__}: {e}"[:120]))
            continue
        if impl == "torch default":
            foreach_default, fused_default = _torch_optimizer._default_to_fused_or_foreach(params, False, False)
            default_note = "resolves to " + ("fused" if fused_default else "foreach" if foreach_default else "for-loop")
        steps[impl] = step
        holders[impl] = params
    del base
    # Steps per round: enough that the slowest contender's round lasts about target_s.
    per_step = {}
    for impl, step in steps.items():
        t = time.perf_counter()
        step()
        per_step[impl] = time.perf_counter() - t
    n_steps = max(1, min(200, int(target_s / max(max(per_step.values(), default=1e-3), 1e-6))))
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    order = list(steps)
    for r in range(rounds):
        k = r % len(order) if order else 0
        for impl in order[k:] + order[:k]:
            step = steps[impl]
            t = time.perf_counter()
            for _ in range(n_steps):
                step()
            times[impl].append((time.perf_counter() - t) / n_steps)
    bytes_per_step = case.arrays * numel * F32
    for impl, ts in times.items():
        med = statistics.median(ts)
        gbps = bytes_per_step / med / 1e9
        note = default_note if impl == "torch default" else ""
        results.append(Result(set_name, case.name, impl, med * 1e3, gbps, 100 * gbps / roofline, 100 * (max(ts) - min(ts)) / med, note))
    steps.clear()
    holders.clear()
    del grads
    gc.collect()
    return results


# --------------------------------------------------------------------------- reporting


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def speedup(results: List[Result], r: Result) -> str:
    """For a torch row: how many times faster oxoptim was (torch ms / oxoptim ms)."""
    ox = [x for x in results if x.set_name == r.set_name and x.case == r.case and x.impl == "oxoptim"]
    if r.impl == "oxoptim" or not ox or ox[0].ms != ox[0].ms or r.ms != r.ms:
        return "—"
    return f"{r.ms / ox[0].ms:.2f}×"


def fmt(x: float, spec: str) -> str:
    return "n/a" if x != x else format(x, spec)


def markdown(results: List[Result], header: List[str], notes: List[str]) -> str:
    lines = header + [""]
    # Summary: oxoptim per set and optimizer, with speedups over each torch path.
    impls = ["torch for-loop", "torch foreach", "torch fused", "torch default", "swa_utils multi_avg_fn", "swa_utils avg_fn"]
    present = [i for i in impls if any(r.impl == i for r in results)]
    lines += ["### oxoptim, and its speedup over each torch path (torch ms / oxoptim ms; > 1 means oxoptim is faster)", ""]
    lines += ["| shape set | optimizer | oxoptim ms/step | GB/s | % roofline | " + " | ".join(f"vs {i}" for i in present) + " |"]
    lines += ["|---|---|---:|---:|---:|" + "---:|" * len(present)]
    for r in results:
        if r.impl != "oxoptim":
            continue
        cells = []
        for i in present:
            other = [x for x in results if x.set_name == r.set_name and x.case == r.case and x.impl == i]
            cells.append(speedup(results, other[0]) if other else "")
        lines.append(f"| {r.set_name} | {r.case} | {fmt(r.ms, '.3f')} | {fmt(r.gbps, '.1f')} | {fmt(r.pct, '.0f')}% | " + " | ".join(cells) + " |")
    lines += ["", "### Every contender", ""]
    lines += ["| shape set | optimizer | implementation | ms/step | GB/s | % roofline | oxoptim speedup | spread | note |"]
    lines += ["|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.set_name} | {r.case} | {r.impl} | {fmt(r.ms, '.3f')} | {fmt(r.gbps, '.1f')} | {fmt(r.pct, '.0f')}% | {speedup(results, r)} | {r.spread:.0f}% | {r.note} |"
        )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def chart(results: List[Result], roofline: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(r.case for r in results))
    fig, axes = plt.subplots(len(case_names), 1, figsize=(11, 3.2 * len(case_names)), squeeze=False)
    for ax, case in zip(axes[:, 0], case_names):
        rows = [r for r in results if r.case == case]
        sets = list(dict.fromkeys(r.set_name for r in rows))
        impls = list(dict.fromkeys(r.impl for r in rows))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            ys = []
            for s in sets:
                hit = [r.gbps for r in rows if r.set_name == s and r.impl == impl]
                ys.append(hit[0] if hit and hit[0] == hit[0] else 0.0)
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(sets))], ys, width, label=impl)
        ax.axhline(roofline, color="k", ls="--", lw=1, label=f"in-place roofline {roofline:.1f} GB/s")
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, fontsize=8)
        ax.set_ylabel("GB/s (higher is better)")
        ax.set_title(case, fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape sets and few rounds (well under a minute)")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 7, quick 3)")
    ap.add_argument("--target", type=float, help="seconds per contender per round (default 0.25, quick 0.02)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (oxoptim follows torch.get_num_threads())")
    ap.add_argument("--sets", help="comma-separated substrings selecting shape sets")
    ap.add_argument("--optimizers", help="comma-separated substrings selecting optimizers")
    ap.add_argument("--out", type=Path, help="markdown output (default benches/results/compare_torch[_quick].md); PNG alongside")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    target = args.target or (0.02 if args.quick else 0.25)
    out = args.out or here / "results" / ("compare_torch_quick.md" if args.quick else "compare_torch.md")
    out.parent.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    bw_n = 16_000_000 if args.quick else 64_000_000  # 64 MB / 256 MB per buffer: past the last-level cache
    bw = stream_bandwidth(bw_n, 5 if args.quick else 10)
    roofline = bw["inplace"]
    header = [
        f"# oxoptim vs torch.optim{' (--quick)' if args.quick else ''}",
        "",
        f"- machine: {machine_line()}",
        f"- torch {torch.__version__}, oxoptim {oxoptim.__version__}, SIMD backend `{oxoptim.simd_backend()}`, threads {threads}, Python {platform.python_version()}",
        f"- streaming bandwidth (torch ops, best of N, {bw_n * F32 // 1_000_000} MB buffers): copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s, in-place a += s·b {bw['inplace']:.1f} GB/s; roofline = in-place",
        f"- median of {rounds} round-robin rounds; GB/s counts each array read or written once per step (SGD-momentum 5, Adam/AdamW 7, plain SGD/Subgradient 3, EMA 3 × 4 bytes per element)",
        f"- command: `python benches/compare_torch.py{' --quick' if args.quick else ''}`",
    ]
    for h in header[2:]:
        print(h)
    notes: List[str] = []
    all_cases = cases(notes)
    for n in notes:
        print("note:", n)
    sel_sets = [s.strip().lower() for s in args.sets.split(",")] if args.sets else None
    sel_opts = [s.strip().lower() for s in args.optimizers.split(",")] if args.optimizers else None
    results: List[Result] = []
    t0 = time.perf_counter()
    for set_name, shapes in shape_sets(args.quick).items():
        if sel_sets and not any(s in set_name.lower() for s in sel_sets):
            continue
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        print(f"\n== {set_name}: {len(shapes)} tensors, {numel / 1e6:.2f}M elements")
        for case in all_cases:
            if sel_opts and not any(s in case.name.lower() for s in sel_opts):
                continue
            rs = run_case(set_name, shapes, case, rounds, target, roofline)
            results += rs
            for r in rs:
                print(
                    f"  {case.name:<20} {r.impl:<24} {fmt(r.ms, '9.3f')} ms/step {fmt(r.gbps, '7.1f')} GB/s {fmt(r.pct, '5.0f')}% roofline"
                    f"  oxoptim speedup {speedup(rs, r):>6}  (spread {r.spread:.0f}%) {r.note}"
                )
            sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    out.write_text(markdown(results, header, notes))
    png = out.with_suffix(".png")
    chart(results, roofline, png, f"oxoptim vs torch.optim — {machine_line()}, {threads} threads")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
