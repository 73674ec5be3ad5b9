"""What the seeded-run drivers share (``seed_vs_multistage.py``, ``lowbit_sentiment.py``,
``lm_ablation.py``): a digest of each run's configuration, mean ± sd over seeds, and the results
file that is rewritten after every run and lets ``--reuse`` skip runs whose configuration is
unchanged."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from typing import Callable, Dict, Iterable, List, Optional


def config_digest(cfg: dict) -> str:
    """The key ``--reuse`` finds a run by: take it before the job fills in its defaults."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def mean_sd(values: List[float]) -> tuple:
    """Mean and sample standard deviation (n − 1; NaN for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), sd


def pct(m: float, s: float) -> str:
    """``85.22% ± 0.09`` from fractions (no ``±`` part when ``s`` is NaN)."""
    return f"{100 * m:.2f}%" + ("" if math.isnan(s) else f" ± {100 * s:.2f}")


def aggregate(rows: List[dict], name: str, metrics: Iterable[str]) -> Dict[str, dict]:
    """Per value of ``row[name]`` (a job, a variant), in first-seen order: its seeds and
    ``{"mean", "sd"}`` of each metric."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r[name], []).append(r)
    out: Dict[str, dict] = {}
    for key, rs in groups.items():
        out[key] = {"seeds": [r["seed"] for r in rs]}
        for metric in metrics:
            m, s = mean_sd([float(r[metric]) for r in rs])
            out[key][metric] = {"mean": m, "sd": s}
    return out


class Results:
    """The JSON and Markdown results of one driver run, rewritten after every row so that a
    partial run already reports; ``reuse`` answers rows of an earlier run (in ``out``) whose
    name, seed and configuration digest match."""

    def __init__(self, out: str, md: str, meta: dict, name: str, reuse: bool,
                 summarise: Callable[[List[dict]], Dict[str, dict]],
                 render: Callable[[List[dict], Dict[str, dict]], str]) -> None:
        self.out, self.md, self.meta, self.name = out, md, meta, name
        self.summarise, self.render = summarise, render
        self.rows: List[dict] = []
        self.previous: Dict[tuple, dict] = {}
        if reuse and os.path.isfile(out):
            with open(out, encoding="utf-8") as f:
                self.previous = {(r[name], r["seed"], r["config_digest"]): r for r in json.load(f).get("rows", [])}

    def earlier(self, name: str, seed: int, cfg: dict) -> Optional[dict]:
        """The earlier run of this configuration, when reusing."""
        return self.previous.get((name, seed, config_digest(cfg)))

    def add(self, row: dict) -> Dict[str, dict]:
        """Adds a row, rewrites both files and returns the summary."""
        self.rows.append(row)
        summary = self.summarise(self.rows)
        for path, text in ((self.out, json.dumps({"meta": self.meta, "summary": summary, "rows": self.rows}, indent=2) + "\n"),
                           (self.md, self.render(self.rows, summary))):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return summary
