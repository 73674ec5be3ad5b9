#!/usr/bin/env python3
"""End-to-end training iterations: zero_grad + forward + backward + optimizer step.

Models: the seed's text classifier (Embedding + bidirectional GRU + Dense) and a
small pre-norm transformer language model. Contenders: oxoptim.AdamW against
torch.optim.AdamW default (on CPU: the for-loop), foreach=True and fused=True.

Time: each contender trains its own copy of the same initial model on the same
fixed batch, in one process; contenders run round-robin and each figure is the
median over rounds of ms per whole iteration, split into
zero_grad+forward+backward and step. ``zero_grad(set_to_none=True)`` makes
backward allocate new gradient tensors every iteration, as a real loop does.

Memory: for each contender a separate process builds the model, resets its
peak resident set size (``/proc/self/clear_refs``), runs a few iterations and
reports the peak (``VmHWM``) and the peak over the RSS of the built model
(gradients, optimizer state, activations and temporaries).

    python benches/e2e.py            # full (see benches/README.md for its duration)
    python benches/e2e.py --quick    # small models, about a minute

Writes benches/results/e2e[_quick].json and .md (``--out`` for the .md).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim.optimizer as _torch_optimizer

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import e2e_markdown, machine_line  # noqa: E402
from compare_torch import seed_classifier, without_out  # noqa: E402

MEMORY_ITERS = 3


class TinyLM(nn.Module):
    """A small GPT-style causal transformer language model."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        # oxoptim.rows: F.embedding / F.linear, unless step_in_backward releases the weight's rows.
        h = oxoptim.rows.embedding(x, self.tok.weight) + self.pos(torch.arange(t))
        return self.norm(self.blocks(h, mask=mask, is_causal=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return oxoptim.rows.linear(self.features(x), self.head.weight)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The next-token loss without the logits (``oxoptim.rows.linear_cross_entropy``)."""
        return oxoptim.rows.linear_cross_entropy(self.features(x), self.head.weight, y)


LossFn = Callable[[nn.Module], torch.Tensor]


@dataclass
class Workload:
    key: str
    description: str
    build: Callable[[], Tuple[nn.Module, LossFn]]  # deterministic: every process builds the same model and batch


def workloads(quick: bool) -> List[Workload]:
    if quick:
        seed_cfg = dict(vocab=5000, batch=8, length=32)
        lm_cfg = dict(vocab=4000, d=128, layers=2, heads=4, ctx=32, batch=4)
    else:
        seed_cfg = dict(vocab=5000, batch=32, length=100)  # the seed recipe: batch 32, max length 100
        lm_cfg = dict(vocab=16000, d=384, layers=6, heads=6, ctx=128, batch=16)

    def seed() -> Tuple[nn.Module, LossFn]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model = seed_classifier(vocab=seed_cfg["vocab"])
        xs = torch.randint(1, seed_cfg["vocab"], (seed_cfg["batch"], seed_cfg["length"]), generator=g)
        ys = torch.randint(0, 2, (seed_cfg["batch"],), generator=g)
        return model, lambda m: F.cross_entropy(m(xs), ys)

    def lm() -> Tuple[nn.Module, LossFn]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        model = TinyLM(lm_cfg["vocab"], lm_cfg["d"], lm_cfg["layers"], lm_cfg["heads"], lm_cfg["ctx"])
        xt = torch.randint(0, lm_cfg["vocab"], (lm_cfg["batch"], lm_cfg["ctx"] + 1), generator=g)

        def loss(m: nn.Module) -> torch.Tensor:
            logits = m(xt[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xt[:, 1:].reshape(-1))

        return model, loss

    return [
        Workload("seed", f"Embedding {seed_cfg['vocab']}×256 + BiGRU 256 + Dense, batch {seed_cfg['batch']}×{seed_cfg['length']} tokens", seed),
        Workload(
            "lm",
            f"pre-norm causal transformer, {lm_cfg['layers']} layers, d={lm_cfg['d']}, vocab {lm_cfg['vocab']}, batch {lm_cfg['batch']}×{lm_cfg['ctx']} tokens",
            lm,
        ),
    ]


CONTENDERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "oxoptim AdamW": lambda ps: oxoptim.AdamW(ps, lr=1e-3),
    "torch AdamW default": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
}
BASELINE = "oxoptim AdamW"


def iteration(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn) -> Tuple[float, float]:
    """One training iteration; seconds in zero_grad+forward+backward and in step."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    t1 = time.perf_counter()
    opt.step()
    return t1 - t0, time.perf_counter() - t1


# --------------------------------------------------------------------------- memory (one process per contender)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(quick: bool, key: str, contender: str) -> dict:
    """Runs in its own process: peak RSS over MEMORY_ITERS iterations (after 1 warm-up, which creates the state)."""
    work = next(w for w in workloads(quick) if w.key == key)
    model, loss_fn = work.build()
    opt = CONTENDERS[contender](list(model.parameters()))
    model_rss = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    for _ in range(1 + MEMORY_ITERS):
        iteration(model, opt, loss_fn)
    peak = _status_mib("VmHWM")
    return {"peak_rss_mib": peak, "model_rss_mib": model_rss, "peak_over_model_mib": peak - model_rss}


def measure_memory(quick: bool, key: str, contender: str, threads: Optional[int]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", key, contender]
    cmd += ["--quick"] if quick else []
    cmd += ["--threads", str(threads)] if threads else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


MEMORY_METHOD = (
    "peak resident set size (VmHWM) of a separate process per contender that builds the model, resets the peak "
    f"(`/proc/self/clear_refs`), then runs 1 + {MEMORY_ITERS} iterations; 'over built model' subtracts the RSS after the "
    "model and optimizer are built, so it counts gradients, optimizer state, activations and temporaries"
)


# --------------------------------------------------------------------------- timing (one process, round-robin)


def time_workload(work: Workload, rounds: int, iters: int) -> List[dict]:
    model, loss_fn = work.build()
    runs: Dict[str, Tuple[nn.Module, torch.optim.Optimizer]] = {}
    records: Dict[str, dict] = {}
    for cname, make in CONTENDERS.items():
        m = copy.deepcopy(model)
        records[cname] = {"model": work.key, "optimizer": cname, "iter_ms": [], "fwd_bwd_ms": [], "step_ms": [], "note": ""}
        try:
            opt = make(list(m.parameters()))
            for _ in range(2):  # warm-up: state creation, allocator, first-call work
                iteration(m, opt, loss_fn)
        except Exception as e:
            records[cname]["note"] = f"unavailable: {type(e).__name__}: {e}"[:120]
            print(f"  {cname:<22} {records[cname]['note']}")
            continue
        if cname == "torch AdamW default":
            foreach, fused = _torch_optimizer._default_to_fused_or_foreach(list(m.parameters()), False, False)
            records[cname]["note"] = "resolves to " + ("fused" if fused else "foreach" if foreach else "for-loop")
        runs[cname] = (m, opt)
    order = list(runs)
    for r in range(rounds):
        k = r % len(order)
        for cname in order[k:] + order[:k]:
            m, opt = runs[cname]
            fb = st = 0.0
            for _ in range(iters):
                a, b = iteration(m, opt, loss_fn)
                fb, st = fb + a, st + b
            rec = records[cname]
            rec["fwd_bwd_ms"].append(fb / iters * 1e3)
            rec["step_ms"].append(st / iters * 1e3)
            rec["iter_ms"].append((fb + st) / iters * 1e3)
    return list(records.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="default 7, quick 3")
    ap.add_argument("--iters", type=int, help="iterations per contender per round (default 3, quick 1)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-contender peak-memory processes")
    ap.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="markdown output (default benches/results/e2e[_quick].md); .json alongside")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.quick, *args.memory_child)))
        return 0
    rounds = args.rounds or (3 if args.quick else 7)
    iters = args.iters or (1 if args.quick else 3)
    out = args.out or here / "results" / ("e2e_quick.md" if args.quick else "e2e.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "kind": "e2e",
        "quick": bool(args.quick),
        "command": " ".join(["python benches/e2e.py"] + without_out(list(argv if argv is not None else sys.argv[1:]))),
        "machine": machine_line(),
        "torch": torch.__version__,
        "oxoptim": oxoptim.__version__,
        "simd": oxoptim.simd_backend(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": rounds,
        "iters": iters,
        "baseline": BASELINE,
        "memory_method": "not measured (--no-memory)" if args.no_memory else MEMORY_METHOD,
        "models": [],
        "results": [],
    }
    t0 = time.perf_counter()
    for work in workloads(args.quick):
        model, _ = work.build()
        params = sum(p.numel() for p in model.parameters())
        name = f"{'seed classifier' if work.key == 'seed' else 'small transformer LM'} ({params / 1e6:.1f}M params)"
        data["models"].append({"key": work.key, "name": name, "params": params, "description": work.description})
        print(f"\n== {name}: {work.description}")
        records = time_workload(work, rounds, iters)
        for rec in records:
            rec["model"] = name
            if not args.no_memory and rec["iter_ms"]:
                rec["memory"] = measure_memory(args.quick, work.key, rec["optimizer"], args.threads)
            ms = sorted(rec["iter_ms"])
            mem = rec.get("memory", {})
            shown = f"{ms[len(ms) // 2]:9.2f} ms/iter (min {ms[0]:.2f}, max {ms[-1]:.2f}), step {sorted(rec['step_ms'])[len(ms) // 2]:.2f} ms" if ms else rec["note"]
            print(f"  {rec['optimizer']:<22} {shown}  {json.dumps(mem) if mem else ''}")
            sys.stdout.flush()
        data["results"] += records
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.write_text(e2e_markdown(data))
    print(f"wrote {out.with_suffix('.json')} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
