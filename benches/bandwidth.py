"""DRAM bandwidth roofline for the benchmarks: the last-level cache size and a
streaming probe with each optimizer's stream mix (``stream_probe.rs``).

A row's "% of roofline" divides its GB/s by the probe's GB/s for the same
mix of streams (arrays read, arrays written back in place), measured over
arrays at least 4× the last-level cache each, so neither cache residency nor
a different number of streams can take a row past 100%. The probe runs each
mix with the arrays at one page offset and staggered (see stream_probe.rs:
same-offset streams suffer 4K aliasing), each split into chunks taken in turn
and into one piece per thread; and it runs the same mixes on oxoptim's own
engine (``_core.stream_probe``: the kernels' work items, worker threads, SIMD
paths, and torch-allocated arrays, with one multiply-add per written element
instead of an optimizer's arithmetic), so that an optimizer step, which does
the same memory traffic and more arithmetic, cannot beat it except by noise.
The roofline is the best of all of these. Rows whose working set is not that
far past the cache get a label instead of a percentage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

F32 = 4
PROBE_SOURCE = Path(__file__).resolve().parent / "stream_probe.rs"
# (arrays read, of which written back in place): the mixes stream_probe.rs runs.
PATTERNS: Tuple[Tuple[int, int], ...] = ((2, 1), (3, 2), (4, 3))
# Past this multiple of the LLC a streamed working set cannot be served from cache.
DRAM_FACTOR = 4


def _parse_size(text: str) -> int:
    """'32768K', '32 MiB', '1M' -> bytes."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"unreadable cache size {text!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def llc_bytes() -> Tuple[int, str]:
    """Size of the last-level cache and where it was read from.

    Reads /sys/devices/system/cpu/cpu0/cache/index*/ (highest level, data or
    unified), else ``lscpu``; raises if neither tells.
    """
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    best: Optional[Tuple[int, int]] = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and (best is None or level > best[0]):
            best = (level, size)
    if best is not None:
        return best[1], f"L{best[0]}, {root}"
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for level in ("L3", "L2"):
            m = re.search(rf"^{level} cache:\s*(.+?)(\s*\(.*\))?$", out, re.MULTILINE)
            if m:
                return _parse_size(m.group(1)), f"{level}, lscpu"
    raise RuntimeError("cannot find the last-level cache size (no /sys/devices/system/cpu/cpu0/cache, no lscpu)")


def probe_elements(llc: int) -> int:
    """Elements per probe array: each array alone is DRAM_FACTOR × the LLC."""
    return DRAM_FACTOR * llc // F32


def cache_label(working_set: int, llc: int) -> Optional[str]:
    """None when a working set is DRAM-bound, else why it gets no % of the DRAM roofline."""
    if working_set <= llc:
        return "fits in LLC"
    if working_set < DRAM_FACTOR * llc:
        return f"{working_set / llc:.1f}× LLC"
    return None


def _probe_binary() -> Path:
    """Compiles stream_probe.rs once per source and compiler version (cached under target/)."""
    rustc = shutil.which("rustc")
    if rustc is None:
        raise RuntimeError("rustc not found: the bandwidth probe is built from benches/stream_probe.rs")
    version = subprocess.run([rustc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(PROBE_SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    out_dir = PROBE_SOURCE.parent.parent / "target" / "stream_probe"
    exe = out_dir / f"stream_probe-{key}"
    if not exe.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            built = Path(tmp) / "stream_probe"
            subprocess.run(
                [rustc, "--edition", "2021", "-C", "opt-level=3", "-C", "target-cpu=native", "-o", str(built), str(PROBE_SOURCE)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(built, exe)  # atomic: a concurrent run sees a whole binary or none
    return exe


@dataclass
class Roofline:
    """Best GB/s per stream mix, from every probe run so far (higher is kept: the conservative roofline)."""

    llc: int
    llc_source: str
    elements: int
    threads: int
    gbps: Dict[Tuple[int, int], float]
    runs: List[Dict[str, float]]
    torch_inplace: float  # cross-check: torch's a += s·b, the 2:1 mix, in this process

    def percent(self, gbps: float, reads: int, writes: int) -> float:
        return 100.0 * gbps / self.gbps[(reads, writes)]

    def remeasure(self, reps: int) -> None:
        run = _run_probe(self.elements, self.threads, reps)
        engine = engine_probe(self.elements, self.threads, reps)
        for r, w in PATTERNS:
            key = f"{r}:{w}"
            run[f"stream_probe.rs {key}"] = run[key]
            run[f"engine {key}"] = engine[key]
            run[key] = max(run[key], engine[key])
        self._merge(run)
        self.torch_inplace = max(self.torch_inplace, torch_inplace_gbps(self.elements, reps))

    def _merge(self, run: Dict[str, float]) -> None:
        self.runs.append(run)
        for r, w in PATTERNS:
            self.gbps[(r, w)] = max(self.gbps.get((r, w), 0.0), run[f"{r}:{w}"])

    def capped(self) -> bool:
        """Whether the probe arrays are smaller than the LLC's multiple (``--probe-mib``)."""
        return self.elements < probe_elements(self.llc)

    def summary(self) -> str:
        mixes = ", ".join(f"{r} read/{w} written {self.gbps[(r, w)]:.1f} GB/s" for r, w in PATTERNS)
        size = (f"{self.elements * F32 / 2**20:.0f} MiB per array, capped below {DRAM_FACTOR}× the {self.llc / 2**20:.0f} MiB LLC "
                "by --probe-mib: partly cache bandwidth, so the % columns read low" if self.capped()
                else f"{self.elements * F32 / 2**20:.0f} MiB per array = {DRAM_FACTOR}× the {self.llc / 2**20:.0f} MiB LLC")
        return (
            f"DRAM roofline (benches/stream_probe.rs and oxoptim's engine, {self.threads} threads, {len(self.runs)} runs, best of each; "
            f"{size}): {mixes}; "
            f"cross-check, torch a += s·b (2 read/1 written) {self.torch_inplace:.1f} GB/s"
        )

    def to_json(self) -> dict:
        return {
            "llc_bytes": self.llc,
            "llc_source": self.llc_source,
            "elements_per_array": self.elements,
            "capped": self.capped(),
            "threads": self.threads,
            "gbps": {f"{r}:{w}": v for (r, w), v in self.gbps.items()},
            "runs": self.runs,
            "torch_inplace_gbps": self.torch_inplace,
        }


def _run_probe(elements: int, threads: int, reps: int, mix: Optional[Tuple[int, int]] = None) -> Dict[str, float]:
    """stream_probe.rs's best GB/s per mix (only ``mix`` when given), also per layout ("aligned chunks 4:3")."""
    cmd = [str(_probe_binary()), str(elements), str(threads), str(reps)] + ([f"{mix[0]}:{mix[1]}"] if mix else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    if not data["uniform"]:
        raise RuntimeError(f"stream probe did not stream every element: {out.stdout}")
    run = {f"{r}:{w}": float(data[f"{r}:{w}"]) for r, w in ([mix] if mix else PATTERNS)}
    for layout, mixes in data["layouts"].items():
        run.update({f"{layout} {m}": float(v) for m, v in mixes.items()})
    return run


#: Elements between the starts of neighbouring arrays in the staggered layout (stream_probe.rs's STAGGER).
STAGGER = 272
#: float32 elements per 4 KiB page (4K aliasing compares the low 12 address bits).
PAGE_FLOATS = 4096 // F32


def engine_probe(elements: int, threads: int, reps: int) -> Dict[str, float]:
    """Best GB/s per mix of ``_core.stream_probe`` (oxoptim's engine) over torch-allocated arrays of
    ``elements`` each, with the arrays allocated one by one (as tensors are) and staggered inside
    one buffer; also per layout (``"separate 4:3"``, ``"staggered 4:3"``)."""
    out: Dict[str, float] = {}
    for layout, arrays in _engine_layouts(elements, max(r for r, _ in PATTERNS)):
        for r, w in PATTERNS:
            best = _engine_mix_gbps(arrays, r, w, threads, reps)
            out[f"{layout} {r}:{w}"] = best
            out[f"{r}:{w}"] = max(out.get(f"{r}:{w}", 0.0), best)
        del arrays  # freed before the next layout is made
    return out


def _engine_mix_gbps(arrays: List[torch.Tensor], reads: int, writes: int, threads: int, reps: int) -> float:
    """Best GB/s of ``reps`` engine probe passes of one mix over the first ``reads`` arrays (after one warm-up pass)."""
    from oxoptim import _core

    streams = [[a] for a in arrays[:reads]]
    elements = arrays[0].numel()
    _core.stream_probe(streams, num_threads=threads)  # warm-up: pages touched, workers up
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        if not _core.stream_probe(streams, num_threads=threads):
            raise RuntimeError("the engine probe refused its arrays")
        best = max(best, (reads + writes) * elements * F32 / (time.perf_counter() - t) / 1e9)
    return best


class RoundProbe:
    """A ceiling for one mix taken between benchmark rounds, so that a row's % compares it with the
    machine as it was in the same minute (a VM's bandwidth drifts between minutes): the best of both
    probes, the engine's arrays (both layouts) kept for the whole case."""

    def __init__(self, elements: int, threads: int, reads: int, writes: int) -> None:
        self.elements, self.threads, self.mix = elements, threads, (reads, writes)
        self.layouts = list(_engine_layouts(elements, reads))

    def measure(self, reps: int) -> float:
        r, w = self.mix
        best = max(_engine_mix_gbps(arrays, r, w, self.threads, reps) for _, arrays in self.layouts)
        return max(best, _run_probe(self.elements, self.threads, reps, self.mix)[f"{r}:{w}"])


def _engine_layouts(elements: int, arity: int) -> Iterator[Tuple[str, List[torch.Tensor]]]:
    """The engine probe's layouts, made one at a time (each is ``arity`` arrays of 4 LLCs)."""
    yield "separate", [torch.empty(elements, dtype=torch.float32).uniform_() for _ in range(arity)]
    # Each array starts a whole number of pages plus STAGGER after the previous one, so their page
    # offsets differ by STAGGER floats whatever ``elements`` is (stream_probe.rs's offsets).
    stride = -(-elements // PAGE_FLOATS) * PAGE_FLOATS + STAGGER
    buffer = torch.empty(arity * stride, dtype=torch.float32).uniform_()
    yield "staggered", [buffer[k * stride:k * stride + elements] for k in range(arity)]


def torch_inplace_gbps(elements: int, reps: int) -> float:
    """Best GB/s of torch's in-place a += s·b (3 streams) over the probe's array size."""
    a, b = (torch.empty(elements, dtype=torch.float32).uniform_() for _ in range(2))
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a.add_(b, alpha=0.5)
        best = max(best, 3 * elements * F32 / (time.perf_counter() - t) / 1e9)
    return best


def measure_roofline(reps: int, max_mib: Optional[int] = None) -> Roofline:
    """The roofline from probe arrays of 4 LLCs each, or at most ``max_mib`` MiB each (a smoke run
    on a machine with a large LLC: 4 × 480 MiB arrays take minutes per probe)."""
    llc, source = llc_bytes()
    elements = probe_elements(llc)
    if max_mib is not None:
        elements = min(elements, max_mib * 2**20 // F32)
    threads = torch.get_num_threads()
    roof = Roofline(llc, source, elements, threads, {}, [], 0.0)
    roof.remeasure(reps)
    return roof
