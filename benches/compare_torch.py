#!/usr/bin/env python3
"""oxoptim against torch.optim, same process, round-robin, medians of rounds.

For each shape set and optimizer, every contender (oxoptim, torch for-loop
``foreach=False``, torch ``foreach=True``, torch ``fused=True`` and torch's
default) owns its own parameters and optimizer state. Each is timed in two
gradient modes:

- ``fresh``: before every step each parameter gets a NEW gradient tensor (a
  copy of the set's gradient, allocated while the previous one is still
  alive, so at a new address), as ``zero_grad(set_to_none=True)`` followed by
  ``backward()`` gives a real loop. The copy is made outside the timed region.
- ``reused``: the same gradient tensors every step (what a micro-benchmark
  usually does; it lets per-tensor caches hit every time).

Only ``step()`` is timed, one call at a time, in both modes. Each round runs
every contender in both modes (starting contender and mode rotating); figures
are medians over rounds, ratios are per-round ratios (same round, same mode)
with their min–max. GB/s counts each array read or written once per step; the
roofline is a streaming probe with the same mix of streams over arrays 4× the
last-level cache (``bandwidth.py``).

    python benches/compare_torch.py            # full run (see benches/README.md for its duration)
    python benches/compare_torch.py --quick    # small version, a few minutes (--probe-mib 64: about one)

Writes JSON (``--out`` with .json), a markdown report (``--out``, default
benches/results/compare_torch.md) and a PNG chart next to it. No timing
assertions: this is a measurement.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.optim.optimizer as _torch_optimizer

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import RoundProbe, cache_label, measure_roofline  # noqa: E402
from bench_report import chart, compare_markdown, machine_line  # noqa: E402

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
            "one 20M tensor": [(20_000_000,)],  # past 4× a 32 MiB LLC for every mix: exercises the % column
        }
    return {
        "GPT-2 small": gpt2_shapes(),
        "ResNet-50": resnet50_shapes(),
        "seed classifier": seed_shapes(),
        "2000 × 64×64": [(64, 64)] * 2000,
        "one 50M tensor": [(50_000_000,)],
    }


#: Sets run only when ``--sets`` names them.
EXTRA_SETS: Dict[str, List[Shape]] = {
    # In cache: per-call cost and arithmetic, not memory bandwidth, decide a step.
    "one 100K tensor": [(100_000,)],
}


# --------------------------------------------------------------------------- contenders

Build = Callable[[List[torch.Tensor]], Callable[[], None]]


@dataclass
class Case:
    """One optimizer family: how to build each contender and which arrays a step streams."""

    name: str
    reads: int  # arrays read per element per step
    writes: int  # of which written back in place
    contenders: Dict[str, Build]
    reads_grads: bool = True  # False: the step never looks at .grad, so gradient modes do not apply


def _opt(cls, **kw) -> Build:
    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        return cls(params, **kw).step

    return build


def _param_module(params: List[torch.Tensor]) -> torch.nn.Module:
    m = torch.nn.Module()
    m.ps = torch.nn.ParameterList(params)  # the same tensors, not copies
    return m


def _swa_ema(multi: bool, decay: float) -> Build:
    from torch.optim import swa_utils

    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        model = _param_module(params)
        if multi:
            avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay))
        else:
            avg = swa_utils.AveragedModel(model, avg_fn=swa_utils.get_ema_avg_fn(decay))
        return lambda: avg.update_parameters(model)

    return build


def _ox_averager(decay: float) -> Build:
    def build(params: List[torch.Tensor]) -> Callable[[], None]:
        return oxoptim.ParamAverager(params, mode="ema", decay=decay).update

    return build


def _torch_paths(cls, **kw) -> Dict[str, Build]:
    return {
        "torch for-loop": _opt(cls, foreach=False, **kw),
        "torch foreach": _opt(cls, foreach=True, **kw),
        "torch fused": _opt(cls, fused=True, **kw),
        "torch default": _opt(cls, **kw),
    }


def deepspeed_adam(notes: List[str], adamw: bool, **kw) -> Dict[str, Build]:
    """DeepSpeed's CPU Adam (its C++ AVX op, JIT-built on first use) as a contender, when it installs."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401 - import only checks availability
    except Exception as e:  # ImportError, or its op failing to build
        note = f"DeepSpeed CPU Adam unavailable ({type(e).__name__}: {str(e)[:80]}); pip install deepspeed ninja"
        if note not in notes:
            notes.append(note)
        return {}
    return {"deepspeed cpu_adam": _opt(DeepSpeedCPUAdam, adamw_mode=adamw, **kw)}


def cases(notes: List[str]) -> List[Case]:
    sgd_kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    adamw_kw = dict(lr=1e-3, weight_decay=1e-2)
    out = [
        # read p, g, buf; write p, buf
        Case("SGD momentum", 3, 2, {"oxoptim": _opt(oxoptim.SGD, **sgd_kw), **_torch_paths(torch.optim.SGD, **sgd_kw)}),
        # read p, g, m, v; write p, m, v
        Case("Adam", 4, 3, {"oxoptim": _opt(oxoptim.Adam, lr=1e-3), **_torch_paths(torch.optim.Adam, lr=1e-3), **deepspeed_adam(notes, False, lr=1e-3)}),
        Case("AdamW", 4, 3, {"oxoptim": _opt(oxoptim.AdamW, **adamw_kw), **_torch_paths(torch.optim.AdamW, **adamw_kw), **deepspeed_adam(notes, True, **adamw_kw)}),
    ]
    if hasattr(oxoptim, "Subgradient"):
        # read p, g; write p
        out.append(Case("Subgradient vs SGD", 2, 1, {"oxoptim": _opt(oxoptim.Subgradient, lr=1e-3), **_torch_paths(torch.optim.SGD, lr=1e-3)}))
    else:
        notes.append("oxoptim.Subgradient not available in this build: Subgradient-vs-SGD rows skipped.")
    if hasattr(oxoptim, "ParamAverager"):
        ema = {"oxoptim": _ox_averager(0.999), "swa_utils multi_avg_fn": _swa_ema(True, 0.999), "swa_utils avg_fn": _swa_ema(False, 0.999)}
        # read avg, p; write avg. Reads parameters, not gradients.
        out.append(Case("EMA averaging", 2, 1, ema, reads_grads=False))
    else:
        notes.append("oxoptim.ParamAverager not available in this build: EMA-averaging rows skipped.")
    return out


# --------------------------------------------------------------------------- timing

GRAD_MODES = ("fresh", "reused")


@dataclass
class Contender:
    step: Callable[[], None]
    params: List[torch.Tensor]


def _give_grads(params: List[torch.Tensor], grads: List[torch.Tensor], mode: str) -> None:
    """Sets ``.grad`` for the next step: the shared tensors (reused) or new copies (fresh).

    Fresh copies are all allocated before any old gradient is released, so
    none can land at its predecessor's address.
    """
    if mode == "reused":
        for p, g in zip(params, grads):
            p.grad = g
        return
    fresh = [g.clone() for g in grads]
    for p, g in zip(params, fresh):
        p.grad = g


def _timed_block(c: Contender, grads: List[torch.Tensor], mode: str, n_steps: int) -> float:
    """Mean seconds per step over ``n_steps`` steps; only ``step()`` is inside the timer."""
    if mode != "fresh":
        _give_grads(c.params, grads, "reused")
        c.step()  # untimed: lets any per-tensor cache settle on these tensors
    total = 0.0
    for _ in range(n_steps):
        if mode == "fresh":
            _give_grads(c.params, grads, "fresh")
        t = time.perf_counter()
        c.step()
        total += time.perf_counter() - t
    if mode == "fresh":
        for p in c.params:  # this contender's copies go before the next contender's are made
            p.grad = None
    return total / n_steps


def run_case(
    shapes: List[Shape],
    case: Case,
    rounds: int,
    target_s: float,
    grad_modes: Sequence[str] = GRAD_MODES,
    probe: Optional[Callable[[], float]] = None,
) -> Tuple[List[dict], int]:
    """Times every contender of ``case`` in ``grad_modes``; returns result records and steps per block.

    With ``probe`` (GB/s of the case's stream mix), it also runs before the first round and after
    each one; every timed record (not an unavailable contender's) then carries ``probe_gbps``, round r's
    ceiling: the better of the probes either side of it.
    """
    gen = torch.Generator().manual_seed(0)
    grads = [torch.empty(s).uniform_(-1e-3, 1e-3, generator=gen) for s in shapes]
    base = [torch.empty(s).uniform_(-0.05, 0.05, generator=gen) for s in shapes]
    contenders: Dict[str, Contender] = {}
    records: List[dict] = []
    notes: Dict[str, str] = {}
    modes = tuple(grad_modes) if case.reads_grads else ("none",)
    for impl, build in case.contenders.items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        _give_grads(params, grads, "reused")
        try:
            step = build(params)
            step()  # lazy state creation and first-call work happen outside the timing
            step()
        except Exception as e:  # e.g. a fused path torch lacks on CPU
            records.append(dict(impl=impl, mode=modes[0], ms=[], note=f"unavailable: {type(e).__name__}: {e}"[:120]))
            continue
        if impl == "torch default":
            foreach_default, fused_default = _torch_optimizer._default_to_fused_or_foreach(params, False, False)
            notes[impl] = "resolves to " + ("fused" if fused_default else "foreach" if foreach_default else "for-loop")
        contenders[impl] = Contender(step, params)
    del base
    # Steps per block: enough that the slowest contender's block lasts about target_s
    # (each contender's best of 3 single steps, so one preempted step does not decide).
    slowest = max((min(_timed_block(c, grads, "reused", 1) for _ in range(3)) for c in contenders.values()), default=1e-3)
    n_steps = max(1, min(200, int(target_s / max(slowest, 1e-6))))
    times: Dict[Tuple[str, str], List[float]] = {(impl, mode): [] for impl in contenders for mode in modes}
    order = list(contenders)
    probes = [probe()] if probe else []
    for r in range(rounds):
        k = r % len(order) if order else 0
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            for impl in order[k:] + order[:k]:
                times[(impl, mode)].append(1e3 * _timed_block(contenders[impl], grads, mode, n_steps))
        if probe:
            probes.append(probe())
    ceilings = {"probe_gbps": [max(a, b) for a, b in zip(probes, probes[1:])]} if probe else {}
    records += [dict(impl=impl, mode=mode, ms=ts, note=notes.get(impl, ""), **ceilings) for (impl, mode), ts in times.items()]
    contenders.clear()
    del grads
    gc.collect()
    return records, n_steps


# --------------------------------------------------------------------------- main


def without_out(args: List[str]) -> List[str]:
    """The command-line arguments minus ``--out PATH`` (the file records how it was made, not where it went)."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return kept


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape sets and few rounds (a few minutes: the roofline probe's "
                    "arrays are 4 LLCs each, unless --probe-mib caps them)")
    ap.add_argument("--probe-mib", type=int, help="cap the roofline probe's arrays at this many MiB each (a smoke run; the "
                    "summary says the %% columns then read low)")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 7, quick 3)")
    ap.add_argument("--target", type=float, help="seconds per contender per mode per round (default 0.25, quick 0.02)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (oxoptim follows torch.get_num_threads())")
    ap.add_argument("--sets", help="comma-separated substrings selecting shape sets (also: 'one 100K tensor', in cache)")
    ap.add_argument("--optimizers", help="comma-separated substrings selecting optimizers")
    ap.add_argument("--out", type=Path, help="markdown output (default benches/results/compare_torch[_quick].md); .json and .png alongside")
    args = ap.parse_args(argv)
    if args.probe_mib is not None and args.probe_mib < 1:
        ap.error(f"--probe-mib must be at least 1, got {args.probe_mib}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    target = args.target or (0.02 if args.quick else 0.25)
    probe_reps = 5 if args.quick else 10
    round_reps = 2 if args.quick else 3
    out = args.out or here / "results" / ("compare_torch_quick.md" if args.quick else "compare_torch.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benches/compare_torch.py"] + without_out(list(argv if argv is not None else sys.argv[1:])))

    roof = measure_roofline(probe_reps, args.probe_mib)
    print(roof.summary())
    notes: List[str] = []
    all_cases = cases(notes)
    for n in notes:
        print("note:", n)
    sel_sets = [s.strip().lower() for s in args.sets.split(",")] if args.sets else None
    sel_opts = [s.strip().lower() for s in args.optimizers.split(",")] if args.optimizers else None
    results: List[dict] = []
    t0 = time.perf_counter()
    for set_name, shapes in {**shape_sets(args.quick), **(EXTRA_SETS if sel_sets else {})}.items():
        if sel_sets and not any(s in set_name.lower() for s in sel_sets):
            continue
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        print(f"\n== {set_name}: {len(shapes)} tensors, {numel / 1e6:.2f}M elements")
        for case in all_cases:
            if sel_opts and not any(s in case.name.lower() for s in sel_opts):
                continue
            t_case = time.perf_counter()
            # DRAM-bound rows get a ceiling per round (see RoundProbe); arrays for it only then.
            round_probe = None
            if cache_label(case.reads * numel * 4, roof.llc) is None:
                round_probe = RoundProbe(roof.elements, roof.threads, case.reads, case.writes)
            probe = functools.partial(round_probe.measure, round_reps) if round_probe else None
            records, n_steps = run_case(shapes, case, rounds, target, probe=probe)
            del round_probe, probe
            print(f"  -- {case.name}: {n_steps} steps per block, {time.perf_counter() - t_case:.1f} s")
            for rec in records:
                rec.update({"set": set_name, "tensors": len(shapes), "numel": numel, "case": case.name, "reads": case.reads, "writes": case.writes, "steps_per_block": n_steps})
                ms = sorted(rec["ms"])
                shown = f"{ms[len(ms) // 2]:9.3f} ms/step (min {ms[0]:.3f}, max {ms[-1]:.3f})" if ms else rec["note"]
                print(f"  {case.name:<20} {rec['impl']:<24} {rec['mode']:<6} {shown}")
            results += records
            sys.stdout.flush()
        # The roofline keeps the best probe result of the run: measured again
        # after every shape set, so it sees the machine as the rows did.
        roof.remeasure(probe_reps)
    print(f"\n{roof.summary()}\ntotal {time.perf_counter() - t0:.1f} s")
    data = {
        "kind": "compare_torch",
        "quick": bool(args.quick),
        "command": command,
        "machine": machine_line(),
        "torch": torch.__version__,
        "oxoptim": oxoptim.__version__,
        "simd": oxoptim.simd_backend(),
        "parallel": oxoptim.parallel_backend() if hasattr(oxoptim, "parallel_backend") else "",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": rounds,
        "target_s": target,
        "grad_modes": list(GRAD_MODES),
        "roofline": roof.to_json(),
        "notes": notes,
        "results": results,
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    out.write_text(compare_markdown(data))
    png = out.with_suffix(".png")
    chart(data, png)
    print(f"wrote {json_path}, {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
