"""Tables, summaries and the chart for the benchmark results (JSON written by
``compare_torch.py`` and ``e2e.py``); used by both and by ``readme_perf.py``.

All figures are derived here from the per-round times stored in the JSON, so a
report can be regenerated from a results file without re-running anything.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bandwidth import F32, cache_label

TORCH_PATHS = ["torch for-loop", "torch foreach", "torch fused", "torch default", "deepspeed cpu_adam", "swa_utils multi_avg_fn", "swa_utils avg_fn"]
BASELINE = "oxoptim"


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


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(lo: float, mid: float, hi: float, unit: str = "×") -> str:
    """'2.81× (2.50–3.10)': a median with its min–max over rounds."""
    if mid != mid:
        return "n/a"
    return f"{mid:.2f}{unit} ({lo:.2f}–{hi:.2f})"


def ratio_rounds(num: List[float], den: List[float]) -> Tuple[float, float, float]:
    """Per-round ratios num[r] / den[r] (same round): min, median, max."""
    rs = [a / b for a, b in zip(num, den) if b > 0]
    if not rs:
        return (float("nan"),) * 3
    return min(rs), statistics.median(rs), max(rs)


# --------------------------------------------------------------------------- compare_torch


class Table:
    """The results of one compare_torch run, indexed by (set, case, impl, mode)."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.llc = int(data["roofline"]["llc_bytes"])
        self.roof = {tuple(int(x) for x in k.split(":")): v for k, v in data["roofline"]["gbps"].items()}
        self.by_key: Dict[Tuple[str, str, str, str], dict] = {}
        for rec in data["results"]:
            self.by_key[(rec["set"], rec["case"], rec["impl"], rec["mode"])] = rec
        self.rows = list(dict.fromkeys((r["set"], r["case"]) for r in data["results"]))

    def get(self, set_name: str, case: str, impl: str, mode: str) -> Optional[dict]:
        """The record in ``mode``; cases that read no gradient have only mode 'none'."""
        return self.by_key.get((set_name, case, impl, mode)) or self.by_key.get((set_name, case, impl, "none"))

    def ms(self, rec: dict) -> float:
        return median(rec["ms"])

    def gbps(self, rec: dict) -> float:
        return (rec["reads"] + rec["writes"]) * rec["numel"] * F32 / self.ms(rec) / 1e6

    def working_set(self, rec: dict) -> int:
        return rec["reads"] * rec["numel"] * F32

    def roofline_percent(self, rec: dict) -> Tuple[float, float, float]:
        """% of the DRAM roofline as min, median, max: per round against that round's probe when the
        run probed every round, else the median against the run's best probe (min = max = median)."""
        if rec.get("probe_gbps"):
            if len(rec["probe_gbps"]) != len(rec["ms"]):
                raise ValueError(
                    f"{rec.get('set')} {rec.get('case')} {rec.get('impl')} {rec.get('mode')}: {len(rec['ms'])} rounds but "
                    f"{len(rec['probe_gbps'])} ceilings (probe_gbps holds one per round)"
                )
            moved = (rec["reads"] + rec["writes"]) * rec["numel"] * F32 / 1e6  # GB/s = moved / ms
            return ratio_rounds([100 * moved / ms for ms in rec["ms"]], rec["probe_gbps"])
        pct = 100 * self.gbps(rec) / self.roof[(rec["reads"], rec["writes"])]
        return pct, pct, pct

    def roofline_cell(self, rec: dict) -> str:
        label = cache_label(self.working_set(rec), self.llc)
        if label is not None:
            return label
        lo, mid, hi = self.roofline_percent(rec)
        return f"{mid:.0f}% ({lo:.0f}–{hi:.0f})" if rec.get("probe_gbps") else f"{mid:.0f}%"

    def speedup(self, set_name: str, case: str, impl: str, mode: str) -> Tuple[float, float, float]:
        """oxoptim's per-round speedup over ``impl`` (impl ms / oxoptim ms)."""
        other, ox = self.get(set_name, case, impl, mode), self.get(set_name, case, BASELINE, mode)
        if not other or not ox or not other["ms"] or not ox["ms"]:
            return (float("nan"),) * 3
        return ratio_rounds(other["ms"], ox["ms"])

    def present_paths(self) -> List[str]:
        return [i for i in TORCH_PATHS if any(r["impl"] == i for r in self.data["results"])]


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def header_lines(data: dict) -> List[str]:
    roof = data["roofline"]
    mixes = ", ".join(f"{k.replace(':', ' read/')} written {v:.1f} GB/s" for k, v in roof["gbps"].items())
    # Runs since the engine probe record each probe's best apart.
    by_probe = [
        f"{name} " + ", ".join(f"{k} {max(r[f'{prefix} {k}'] for r in roof['runs']):.1f}" for k in roof["gbps"])
        for name, prefix in (("oxoptim's engine (`_core.stream_probe`)", "engine"), ("`stream_probe.rs`", "stream_probe.rs"))
        if all(f"{prefix} {k}" in r for r in roof["runs"] for k in roof["gbps"])
    ]
    probes = "`benches/stream_probe.rs` and oxoptim's engine" if by_probe else "`benches/stream_probe.rs`"
    return [
        f"- machine: {data['machine']}; torch {data['torch']}, oxoptim {data['oxoptim']} (SIMD `{data['simd']}`"
        + (f", workers `{data['parallel']}`" if data.get("parallel") else "")
        + f"), {data['threads']} threads, Python {data['python']}",
        f"- last-level cache {_mib(roof['llc_bytes'])} ({roof['llc_source']}); DRAM roofline from {probes} "
        f"({_mib(roof['elements_per_array'] * F32)} per array{', capped by --probe-mib below 4 LLCs: partly cache bandwidth, so the % column reads low' if roof.get('capped') else ''}, best of {len(roof['runs'])} runs, at the start and after each shape set; each mix with same-offset and staggered arrays, in chunks and in one piece per thread): {mixes}"
        + (f" (best GB/s per probe: {'; '.join(by_probe)})" if by_probe else "")
        + "; "
        f"cross-check, torch `a += s·b` {roof['torch_inplace_gbps']:.1f} GB/s"
        + (
            " — **faster than the probe's 2 read/1 written: the probe is not a ceiling in this run**"
            if roof["torch_inplace_gbps"] > roof["gbps"]["2:1"]
            else ""
        ),
        f"- {data['rounds']} round-robin rounds; per step only `step()` is timed; medians over rounds, speedups are per-round ratios "
        "(contender ms / oxoptim ms in the same round, > 1: oxoptim faster) as median (min–max)",
        "- GB/s counts each array read or written once per step (SGD momentum 3 read + 2 written, Adam/AdamW 4 + 3, plain SGD/Subgradient "
        "2 + 1, EMA 2 + 1; 4 bytes each); "
        + (
            "% is per round, of that round's ceiling (both probes with the same mix, run before and after every round of the case; "
            "the better of the two either side), as median (min–max) over rounds"
            if any(r.get("probe_gbps") for r in data["results"])
            else "% is of the probe with the same mix"
        )
        + "; rows whose working set (arrays read × size) is under 4× the LLC show its size in LLCs instead",
        f"- command: `{data['command']}`",
    ]


def summary_table(t: Table, mode: str) -> List[str]:
    """oxoptim per shape set and optimizer with its speedup over every torch path, in gradient mode ``mode``."""
    paths = t.present_paths()
    lines = [
        "| shape set | optimizer | working set | oxoptim ms/step | GB/s | % of DRAM roofline | " + " | ".join(f"vs {p}" for p in paths) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(paths),
    ]
    for set_name, case in t.rows:
        ox = t.get(set_name, case, BASELINE, mode)
        if not ox or not ox["ms"]:
            continue
        cells = []
        for p in paths:
            cells.append(spread(*t.speedup(set_name, case, p, mode)) if t.get(set_name, case, p, mode) else "")
        lines.append(
            f"| {set_name} | {case} | {_mib(t.working_set(ox))} | {t.ms(ox):.3f} | {t.gbps(ox):.1f} | {t.roofline_cell(ox)} | " + " | ".join(cells) + " |"
        )
    return lines


def _ranges_apart(a: List[float], b: List[float]) -> bool:
    return bool(a and b) and (max(a) < min(b) or max(b) < min(a))


def mode_differences(t: Table) -> List[Tuple[dict, dict, float]]:
    """(fresh, reused, reused/fresh − 1) for every contender whose per-round ranges do not overlap."""
    out = []
    for set_name, case in t.rows:
        for p in [BASELINE] + t.present_paths():
            fresh, reused = t.by_key.get((set_name, case, p, "fresh")), t.by_key.get((set_name, case, p, "reused"))
            if fresh and reused and _ranges_apart(fresh["ms"], reused["ms"]):
                out.append((fresh, reused, t.ms(reused) / t.ms(fresh) - 1))
    return out


def mode_table(t: Table) -> List[str]:
    lines = [
        "| shape set | optimizer | implementation | fresh ms/step | reused ms/step | reused vs fresh | ranges apart | oxoptim speedup, fresh | oxoptim speedup, reused |",
        "|---|---|---|---:|---:|---:|:---:|---:|---:|",
    ]
    for set_name, case in t.rows:
        for p in [BASELINE] + t.present_paths():
            fresh, reused = t.by_key.get((set_name, case, p, "fresh")), t.by_key.get((set_name, case, p, "reused"))
            if not fresh or not reused or not fresh["ms"] or not reused["ms"]:
                continue
            d = t.ms(reused) / t.ms(fresh) - 1
            sf = "—" if p == BASELINE else spread(*t.speedup(set_name, case, p, "fresh"))
            sr = "—" if p == BASELINE else spread(*t.speedup(set_name, case, p, "reused"))
            apart = "yes" if _ranges_apart(fresh["ms"], reused["ms"]) else ""
            lines.append(f"| {set_name} | {case} | {p} | {t.ms(fresh):.3f} | {t.ms(reused):.3f} | {100 * d:+.1f}% | {apart} | {sf} | {sr} |")
    return lines


def every_contender_table(t: Table, mode: str) -> List[str]:
    lines = [
        "| shape set | optimizer | implementation | ms/step | min–max ms | GB/s | % of DRAM roofline | oxoptim speedup | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for set_name, case in t.rows:
        for p in [BASELINE] + t.present_paths():
            rec = t.get(set_name, case, p, mode)
            if not rec:
                continue
            if not rec["ms"]:
                lines.append(f"| {set_name} | {case} | {p} | n/a | | | | | {rec['note']} |")
                continue
            sp = "—" if p == BASELINE else spread(*t.speedup(set_name, case, p, mode))
            lines.append(
                f"| {set_name} | {case} | {p} | {t.ms(rec):.3f} | {min(rec['ms']):.3f}–{max(rec['ms']):.3f} | {t.gbps(rec):.1f} | {t.roofline_cell(rec)} | {sp} | {rec['note']} |"
            )
    return lines


def findings(t: Table) -> List[str]:
    """Plain statements read off the results: where oxoptim loses, rows above the roofline, where the gradient modes differ."""
    slower = []
    for set_name, case in t.rows:
        for p in t.present_paths():
            lo, mid, hi = t.speedup(set_name, case, p, "fresh")
            if mid < 1:
                slower.append(f"{set_name} {case} vs {p} {spread(lo, mid, hi)}" + (", every round" if hi < 1 else ""))
    over = []
    for rec in t.data["results"]:
        if rec["ms"] and rec["mode"] in ("fresh", "none") and cache_label(t.working_set(rec), t.llc) is None:
            pct = t.roofline_percent(rec)[1]
            if pct > 100:
                shown = f"{pct:.0f}" if pct >= 100.5 else f"{pct:.1f}"  # never "100%" in a list of rows above 100%
                over.append(f"{rec['set']} {rec['case']} {rec['impl']} {shown}%")
    diffs = mode_differences(t)
    out = [
        "- oxoptim slower than a torch path (fresh gradients, median speedup < 1): " + ("; ".join(slower) if slower else "none") + ".",
        "- rows above 100% of their DRAM roofline: "
        + ("; ".join(over) + " — the probe was not a ceiling in this run (a noisy machine, or a probe weaker than the kernels)" if over else "none")
        + ".",
        "- fresh vs reused gradients, contenders whose per-round times do not overlap between the modes: "
        + ("; ".join(f"{f['set']} {f['case']} {f['impl']} {100 * d:+.0f}% when reused" for f, _, d in diffs) if diffs else "none")
        + "; all others agree within their round-to-round spread.",
    ]
    return out


def compare_markdown(data: dict) -> str:
    t = Table(data)
    title = "# oxoptim vs torch.optim" + (" (--quick)" if data["quick"] else "")
    lines = [title, ""] + header_lines(data) + [""]
    lines += ["### Fresh gradients every step (as in a training loop): oxoptim, and its speedup over each torch path", ""]
    lines += summary_table(t, "fresh") + [""]
    lines += ["EMA rows read parameters, not gradients: one mode. Findings:", ""] + findings(t) + [""]
    lines += ["### Fresh vs reused gradient tensors", ""]
    lines += [
        "Fresh: a new gradient tensor per parameter before every step (allocated and filled outside the timed region, for "
        "every contender alike). Reused: the same gradient tensors every step. \"ranges apart\": every round of one mode "
        "was faster than every round of the other.",
        "",
    ]
    lines += mode_table(t) + [""]
    lines += ["### Every contender, fresh gradients", ""] + every_contender_table(t, "fresh")
    if data["notes"]:
        lines += [""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    """GB/s per shape set and implementation (fresh gradients), with each mix's DRAM roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = Table(data)
    case_names = list(dict.fromkeys(case for _, case in t.rows))
    fig, axes = plt.subplots(len(case_names), 1, figsize=(11, 3.2 * len(case_names)), squeeze=False)
    for ax, case in zip(axes[:, 0], case_names):
        sets = [s for s, c in t.rows if c == case]
        impls = [BASELINE] + [p for p in t.present_paths() if any(t.get(s, case, p, "fresh") for s in sets)]
        width = 0.8 / max(1, len(impls))
        mix = None
        for j, impl in enumerate(impls):
            ys = []
            for s in sets:
                rec = t.get(s, case, impl, "fresh")
                ys.append(t.gbps(rec) if rec and rec["ms"] else 0.0)
                mix = mix or (rec and (rec["reads"], rec["writes"]))
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(sets))], ys, width, label=impl)
        if mix:
            ax.axhline(t.roof[mix], color="k", ls="--", lw=1, label=f"DRAM roofline, {mix[0]} read/{mix[1]} written: {t.roof[mix]:.1f} GB/s")
        labels = []
        for s in sets:
            rec = t.get(s, case, BASELINE, "fresh")
            label = cache_label(t.working_set(rec), t.llc) if rec else None
            labels.append(s + (f"\n({label})" if label else ""))
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("GB/s (higher is better)")
        reads_grads = any(r["case"] == case and r["mode"] == "fresh" for r in data["results"])
        ax.set_title(case + (", fresh gradients" if reads_grads else " (reads no gradient)"), fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.suptitle(f"oxoptim vs torch.optim — {data['machine']}, {data['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- e2e


def e2e_table(data: dict) -> List[str]:
    lines = [
        "| model | optimizer | ms/iter | fwd+bwd ms | step ms | step share | oxoptim speedup, iter | oxoptim speedup, step | peak RSS MiB | peak over built model MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in data["models"]:
        rows = [r for r in data["results"] if r["model"] == model["name"]]
        ox = next((r for r in rows if r["optimizer"] == data["baseline"]), None)
        for r in rows:
            if not r["iter_ms"]:
                lines.append(f"| {model['name']} | {r['optimizer']} | n/a | | | | | | | {r.get('note', '')} |")
                continue
            it, fb, st = median(r["iter_ms"]), median(r["fwd_bwd_ms"]), median(r["step_ms"])
            if ox is None or r is ox:
                sp_it = sp_st = "—"
            else:
                sp_it = spread(*ratio_rounds(r["iter_ms"], ox["iter_ms"]))
                sp_st = spread(*ratio_rounds(r["step_ms"], ox["step_ms"]))
            mem = r.get("memory") or {}
            peak = f"{mem['peak_rss_mib']:.0f}" if "peak_rss_mib" in mem else "n/a"
            over = f"{mem['peak_over_model_mib']:.0f}" if "peak_over_model_mib" in mem else "n/a"
            lines.append(
                f"| {model['name']} | {r['optimizer']} | {it:.2f} ({min(r['iter_ms']):.2f}–{max(r['iter_ms']):.2f}) | {fb:.2f} | {st:.2f} | "
                f"{100 * st / it:.1f}% | {sp_it} | {sp_st} | {peak} | {over} |"
            )
    return lines


def e2e_header(data: dict) -> List[str]:
    return [
        f"- machine: {data['machine']}; torch {data['torch']}, oxoptim {data['oxoptim']} (`{data['simd']}`), {data['threads']} threads",
        f"- whole iterations: `zero_grad(set_to_none=True)` + forward + backward + `step()`, every contender on its own copy of the "
        f"same model and fixed batch, {data['rounds']} round-robin rounds × {data['iters']} iterations; medians (min–max over rounds); "
        "speedups are per-round ratios (contender / oxoptim, > 1: oxoptim faster)",
        f"- memory: {data['memory_method']}",
        f"- command: `{data['command']}`",
    ]


def e2e_markdown(data: dict) -> str:
    title = "# End-to-end training iterations" + (" (--quick)" if data["quick"] else "")
    lines = [title, ""] + e2e_header(data) + [""]
    for m in data["models"]:
        lines.append(f"- {m['name']}: {m['description']}")
    return "\n".join(lines + [""] + e2e_table(data)) + "\n"
