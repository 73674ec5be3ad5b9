#!/usr/bin/env python3
"""End-to-end training iterations: zero_grad + forward + backward + optimizer step.

Models: the seed's text classifier (Embedding + bidirectional GRU + Dense) and a
small pre-norm transformer language model. Contenders: oxoptim.AdamW against
torch.optim.AdamW default (on CPU: the for-loop), foreach=True and fused=True.
Each contender trains its own copy of the same initial model on the same fixed
batch; contenders run round-robin and the figure is the median over rounds of
ms per iteration, split into forward+backward and step.

    python benches/e2e.py            # full
    python benches/e2e.py --quick    # small, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_torch import machine_line, seed_classifier  # noqa: E402


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.tok(x) + self.pos(torch.arange(t))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def workloads(quick: bool) -> Dict[str, Tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if quick:
        seed_cfg = dict(vocab=5000, batch=8, length=32)
        lm_cfg = dict(vocab=4000, d=128, layers=2, heads=4, ctx=32, batch=4)
    else:
        seed_cfg = dict(vocab=5000, batch=32, length=100)  # the seed recipe: batch 32, max length 100
        lm_cfg = dict(vocab=16000, d=384, layers=6, heads=6, ctx=128, batch=16)
    seed = seed_classifier(vocab=seed_cfg["vocab"])
    xs = torch.randint(1, seed_cfg["vocab"], (seed_cfg["batch"], seed_cfg["length"]), generator=g)
    ys = torch.randint(0, 2, (seed_cfg["batch"],), generator=g)
    lm = TinyLM(lm_cfg["vocab"], lm_cfg["d"], lm_cfg["layers"], lm_cfg["heads"], lm_cfg["ctx"])
    xt = torch.randint(0, lm_cfg["vocab"], (lm_cfg["batch"], lm_cfg["ctx"] + 1), generator=g)

    def seed_loss(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(xs), ys)

    def lm_loss(m: nn.Module) -> torch.Tensor:
        logits = m(xt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xt[:, 1:].reshape(-1))

    n_seed = sum(p.numel() for p in seed.parameters()) / 1e6
    n_lm = sum(p.numel() for p in lm.parameters()) / 1e6
    return {
        f"seed classifier ({n_seed:.1f}M params, batch {seed_cfg['batch']}×{seed_cfg['length']})": (seed, seed_loss),
        f"small transformer LM ({n_lm:.1f}M params, batch {lm_cfg['batch']}×{lm_cfg['ctx']})": (lm, lm_loss),
    }


CONTENDERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "oxoptim AdamW": lambda ps: oxoptim.AdamW(ps, lr=1e-3),
    "torch AdamW default": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="default 7, quick 3")
    ap.add_argument("--iters", type=int, help="iterations per contender per round (default 3, quick 1)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, help="markdown output (default benches/results/e2e[_quick].md)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    iters = args.iters or (1 if args.quick else 3)
    out = args.out or here / "results" / ("e2e_quick.md" if args.quick else "e2e.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# End-to-end training iteration (zero_grad + forward + backward + step){' --quick' if args.quick else ''}",
        "",
        f"- machine: {machine_line()}; torch {torch.__version__}, oxoptim {oxoptim.__version__} (`{oxoptim.simd_backend()}`), threads {torch.get_num_threads()}",
        f"- median of {rounds} round-robin rounds × {iters} iterations; command: `python benches/e2e.py{' --quick' if args.quick else ''}`",
        "",
        "| model | optimizer | ms/iter | fwd+bwd ms | step ms | step share | oxoptim iter speedup | oxoptim step speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for h in header[2:4]:
        print(h)
    rows: List[str] = []
    for name, (model, loss_fn) in workloads(args.quick).items():
        print(f"\n== {name}")
        runs = {}
        for cname, make in CONTENDERS.items():
            m = copy.deepcopy(model)
            try:
                opt = make(list(m.parameters()))
                for _ in range(2):  # warm-up: state creation, allocator, first-call work
                    opt.zero_grad(set_to_none=True)
                    loss_fn(m).backward()
                    opt.step()
            except Exception as e:
                print(f"  {cname:<22} unavailable: {type(e).__name__}: {e}")
                continue
            runs[cname] = (m, opt)
        times: Dict[str, Tuple[List[float], List[float]]] = {c: ([], []) for c in runs}
        order = list(runs)
        for r in range(rounds):
            k = r % len(order)
            for cname in order[k:] + order[:k]:
                m, opt = runs[cname]
                fb = st = 0.0
                for _ in range(iters):
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss_fn(m).backward()
                    t1 = time.perf_counter()
                    opt.step()
                    t2 = time.perf_counter()
                    fb += t1 - t0
                    st += t2 - t1
                times[cname][0].append(fb / iters * 1e3)
                times[cname][1].append(st / iters * 1e3)
        med = {c: (statistics.median(f), statistics.median(s), statistics.median([a + b for a, b in zip(f, s)])) for c, (f, s) in times.items()}
        ox = med.get("oxoptim AdamW")
        for cname, (fb, st, it) in med.items():
            sp_it = f"{it / ox[2]:.2f}×" if ox and cname != "oxoptim AdamW" else "—"
            sp_st = f"{st / ox[1]:.2f}×" if ox and cname != "oxoptim AdamW" else "—"
            print(f"  {cname:<22} {it:9.2f} ms/iter  fwd+bwd {fb:8.2f}  step {st:8.2f} ({100 * st / it:4.1f}%)  oxoptim speedup iter {sp_it:>6} step {sp_st:>6}")
            rows.append(f"| {name} | {cname} | {it:.2f} | {fb:.2f} | {st:.2f} | {100 * st / it:.1f}% | {sp_it} | {sp_st} |")
        del runs
    out.write_text("\n".join(header + rows) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
