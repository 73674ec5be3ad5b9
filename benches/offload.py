#!/usr/bin/env python3
"""Training on a GPU with the optimizer in CPU memory: time per iteration and GPU memory.

Contenders (AdamW, lr 1e-4, weight decay 0.01; the model's weights fp32 on the GPU, bf16 autocast):

* ``torch fused (GPU)``: ``torch.optim.AdamW(fused=True)`` on the GPU, state there (the
  speed and memory one gives up by offloading);
* ``torchao offload``: torchao's ``CPUOffloadOptimizer`` (torch's fused CPU AdamW, one optimizer
  per parameter, stepped in ``step()`` while each parameter's copy back overlaps the next step),
  ``offload_gradients=True``;
* ``oxoptim offload``: ``oxoptim.CPUOffloadOptimizer(..., oxoptim.AdamW, offload_gradients=True)``:
  in ``step()``, buckets of parameters (default 4M elements) updated in the order their
  gradients came, each sent back to the GPU while the next is updated;
* ``oxoptim offload, 64K-element buckets``: more, smaller native calls (``step_in_backward``'s default);
* ``oxoptim offload, one call``: one native call for all (``STEPS_IN_BACKWARD = False``), then
  every parameter sent back (no overlap of copies and updates);
* ``oxoptim offload, during backward``: ``update_during_backward=True``, buckets updated on
  backward's thread once their gradient copies have landed;
* ``oxoptim offload, on a worker``: ``update_during_backward="worker"``, buckets updated on a
  worker thread once their gradient copies have landed, while backward goes on (also with
  1M-element buckets: the first update starts sooner);
* ``oxoptim offload 8-bit``: ``oxoptim.AdamW8bit`` state on the CPU (2 B/param instead of 8).

Time: one process; each contender trains its own copy of the same model on the same batch;
round-robin (the first one rotates); the median over rounds of ms per whole iteration
(forward, backward, step, ``zero_grad``, then ``torch.cuda.synchronize``), with the min-max.
Memory: per contender, what stays allocated on the GPU after warm-up (weights, state,
gradients kept) and the peak of one iteration above that (activations, gradients in flight).
CPU memory: pinned CPU copies, gradient buffers and optimizer state.

    python benches/offload.py                       # GPT-2 small, batch 16x1024
    python benches/offload.py --size medium --batch 8
    python benches/offload.py --torchao-file PATH   # torchao's cpu_offload.py, when torchao is not installed

Writes <out>/offload_<size>.json and .md (default benches/results/). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import oxoptim
from oxoptim.training.gpt import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import machine_line  # noqa: E402

SIZES = {"small": dict(layers=12, dim=768, heads=12), "medium": dict(layers=24, dim=1024, heads=16)}
HYPER: Dict[str, Any] = dict(lr=1e-4, weight_decay=0.01)


class AdamWInStep(oxoptim.AdamW):
    """oxoptim's AdamW, stepped whole in ``step()`` by the offload (the ablation)."""

    STEPS_IN_BACKWARD = False


def torchao_offload(path: Optional[str]) -> Optional[type]:
    if path:
        spec = importlib.util.spec_from_file_location("torchao_cpu_offload", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.CPUOffloadOptimizer
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        return None
    return CPUOffloadOptimizer


def contenders(torchao_cls: Optional[type]) -> Dict[str, Callable[[torch.nn.Module], Any]]:
    table: Dict[str, Callable[[torch.nn.Module], Any]] = {
        "torch fused (GPU)": lambda m: torch.optim.AdamW(m.parameters(), fused=True, **HYPER),
    }
    if torchao_cls is not None:
        table["torchao offload"] = lambda m: torchao_cls(m.parameters(), torch.optim.AdamW, offload_gradients=True, **HYPER)
    def ours(cls: type = oxoptim.AdamW, **options: Any) -> Callable[[torch.nn.Module], Any]:
        return lambda m: oxoptim.CPUOffloadOptimizer(m.parameters(), cls, offload_gradients=True, **options, **HYPER)

    table["oxoptim offload"] = ours()
    table["oxoptim offload, 64K-element buckets"] = ours(bucket_numel=1 << 16)
    table["oxoptim offload, one call"] = ours(AdamWInStep)
    table["oxoptim offload, during backward"] = ours(update_during_backward=True)
    table["oxoptim offload, on a worker"] = ours(update_during_backward="worker")
    table["oxoptim offload, on a worker, 1M-element buckets"] = ours(update_during_backward="worker", bucket_numel=1 << 20)
    table["oxoptim offload 8-bit"] = ours(oxoptim.AdamW8bit)
    return table


def cpu_bytes(opt: Any) -> int:
    """Pinned copies, gradient buffers and optimizer state held in CPU memory."""
    total = 0
    if isinstance(opt, oxoptim.CPUOffloadOptimizer):
        total += sum(e.host.nbytes + e.grad.nbytes for e in opt._entries.values())
        states = [opt.state]
    elif hasattr(opt, "optim_dict"):  # torchao: one optimizer per parameter
        total += sum(h.nbytes + h.grad.nbytes for h in opt.param_d2h_map.values())
        states = [o.state for o in opt.optim_dict.values()]
    else:
        return 0
    for state in states:
        for entry in state.values():
            total += sum(v.nbytes for v in entry.values() if torch.is_tensor(v) and v.device.type == "cpu")
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2, help="iterations per contender per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torchao-file", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only this contender (repeatable; the first one given is the baseline)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benches/offload.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    vocab = 50257
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.tokens + 1), device=dev, generator=gen)

    def iteration(model: torch.nn.Module, opt: Any) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    table = contenders(torchao_offload(args.torchao_file))
    if args.only:
        unknown = [name for name in args.only if name not in table]
        if unknown:
            print(f"unknown contender(s) {unknown}; known: {list(table)}", file=sys.stderr)
            return 2
        table = {name: table[name] for name in args.only}
    runs: Dict[str, dict] = {}
    for name, make in table.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = GPT(vocab, block=args.tokens, **SIZES[args.size]).to(dev)
        opt = make(model)
        for _ in range(args.warmup):
            iteration(model, opt)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        at = torch.cuda.memory_allocated()
        iteration(model, opt)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - at
        runs[name] = dict(model=model, opt=opt, held=held, peak=peak, cpu=cpu_bytes(opt), ms=[], losses=[])
        print(f"{name}: built, GPU held {held / 2**20:.0f} MiB, iteration peak +{peak / 2**20:.0f} MiB", flush=True)
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            run = runs[name]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run["losses"].append(iteration(run["model"], run["opt"]))
            torch.cuda.synchronize()
            run["ms"].append((time.perf_counter() - t0) * 1e3 / args.iters)
    for name in names:  # where the time goes: synchronised after backward (which stalls any overlap)
        run = runs[name]
        split = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = run["model"](ids[:, :-1])
            F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
            del logits
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            split.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3))
        run["backward_ms"] = statistics.median(b for b, _ in split)
        run["step_ms"] = statistics.median(st for _, st in split)
    params = sum(p.numel() for p in runs[names[0]]["model"].parameters())
    fused = statistics.median(runs[names[0]]["ms"])
    rows: List[dict] = []
    for name in names:
        run = runs[name]
        med = statistics.median(run["ms"])
        rows.append(dict(name=name, ms_median=med, ms_min=min(run["ms"]), ms_max=max(run["ms"]), vs_gpu_fused=med / fused,
                         gpu_held_mib=run["held"] / 2**20, gpu_iteration_peak_mib=run["peak"] / 2**20,
                         gpu_total_mib=(run["held"] + run["peak"]) / 2**20, cpu_mib=run["cpu"] / 2**20,
                         last_loss=run["losses"][-1], forward_backward_ms=run["backward_ms"], step_ms=run["step_ms"]))
    data = dict(size=args.size, params=params, batch=args.batch, tokens=args.tokens, rounds=args.rounds, iters=args.iters,
                gpu=torch.cuda.get_device_name(), cpu=machine_line(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, oxoptim=oxoptim.__version__, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"offload_{args.size}.json").write_text(json.dumps(data, indent=1))
    (out / f"offload_{args.size}.md").write_text(markdown(data))
    print(markdown(data))
    return 0


def markdown(data: dict) -> str:
    lines = [
        f"# Optimizer in CPU memory, model on the GPU: GPT ({data['size']}, {data['params'] / 1e6:.0f}M parameters), "
        f"batch {data['batch']}x{data['tokens']} tokens, bf16 autocast",
        "",
        f"{data['gpu']}; {data['cpu']}; torch {data['torch']} ({data['torch_threads']} threads); oxoptim {data['oxoptim']}. "
        f"Median of {data['rounds']} round-robin rounds of {data['iters']} iterations (min-max).",
        "",
        "The split column comes from 3 more iterations synchronised after backward (no overlap across it).",
        "",
        "| contender | ms/iteration | vs GPU fused | split: forward+backward / step ms | GPU held MiB | + iteration peak MiB | GPU total MiB | CPU MiB | last loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['name']} | {r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['vs_gpu_fused']:.2f}x | "
                     f"{r['forward_backward_ms']:.1f} / {r['step_ms']:.1f} | "
                     f"{r['gpu_held_mib']:.0f} | {r['gpu_iteration_peak_mib']:.0f} | {r['gpu_total_mib']:.0f} | {r['cpu_mib']:.0f} | "
                     f"{r['last_loss']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
