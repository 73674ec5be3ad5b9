#!/usr/bin/env python3
"""The optimizer step inside backward against the ordinary loop: time per training
iteration and peak memory.

Contenders (all AdamW, lr 1e-3):

* ordinary loop ``backward(); step(); zero_grad(set_to_none=True)`` with torch's
  default AdamW (on CPU the for-loop), torch ``fused=True`` and oxoptim;
* ``oxoptim.step_in_backward`` (default buckets), and with ``release_rows`` (the
  LMs' token embedding and output head updated row block by row block, so
  that their gradients never exist whole: ``oxoptim.rows``);
* torch's tutorial pattern ("How to save memory by fusing the optimizer step
  into the backward pass"): one torch ``AdamW(fused=True)`` per parameter,
  stepped and zeroed from ``register_post_accumulate_grad_hook``.

Models: a GPT-2-small-sized causal transformer LM (12 layers, d=768, 12 heads,
vocab 50257, 1024 positions, head tied to the token embedding: 124M
parameters; batch 1×64 tokens, as fine-tuning on a CPU), the default BiGRU job
(Embedding 5000×256 + BiGRU 256 + Dense, batch 32×100) and a small LM.

Time: one process; each contender trains its own copy of the same model on the
same batch; contenders run round-robin (the first one rotates), each figure is
the median over rounds of ms per whole iteration, with the min–max over rounds.
With ``--processes N`` that is repeated in N processes (``PYTHONHASHSEED`` 0..N-1)
and their rounds are pooled: the memory layout of a process can move a
contender's time (the small LM's 8-bit step inside backward runs about 1.7×
slower in some processes, ``PYTHONHASHSEED=3`` among them), so one process is
one sample.

Memory: a separate process per contender builds the model and optimizer, runs
one warm-up iteration (state created), resets the peak resident set size
(``/proc/self/clear_refs``), runs more iterations and reports the peak
(``VmHWM``, kept by the kernel, so no sampling interval) and the peak above
the RSS after warm-up. glibc's mmap threshold is fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``) in those processes: with its default dynamic
threshold freed gradients would stay in the heap and the RSS would not show
their release. Gradients of every
parameter cost 4 B/param; the table says what share of that each contender
saves against torch fused's ordinary loop.

    python benches/step_in_backward.py                 # full: gpt2s, seed, lm
    python benches/step_in_backward.py --models lm,seed --rounds 3 --iters 1   # reduced
    python benches/step_in_backward.py --models lm --no-memory --processes 4   # time over 4 processes

Writes benches/results/step_in_backward[_<models>].json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import oxoptim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import machine_line  # noqa: E402
from compare_torch import seed_classifier  # noqa: E402
from e2e import TinyLM  # noqa: E402

MEMORY_ITERS = 3
LossFn = Callable[..., torch.Tensor]  # (model, without_logits=False) -> loss


class GPT2Small(TinyLM):
    """TinyLM at GPT-2 small's size, its output head tied to the token embedding (as GPT-2)."""

    def __init__(self, ctx: int = 1024, tied: bool = True) -> None:
        super().__init__(vocab=50257, d=768, layers=12, heads=12, ctx=ctx)
        if tied:
            self.head.weight = self.tok.weight


def _lm_loss(model: nn.Module, vocab: int, batch: int, tokens: int) -> LossFn:
    xt = torch.randint(0, vocab, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))

    def loss(m: nn.Module, without_logits: bool = False) -> torch.Tensor:
        if without_logits:  # the head and loss by oxoptim.rows.linear_cross_entropy
            return m.loss(xt[:, :-1], xt[:, 1:])
        logits = m(xt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xt[:, 1:].reshape(-1))

    return loss


def build(key: str) -> Tuple[nn.Module, LossFn, str]:
    """Deterministic: every process builds the same model and batch."""
    torch.manual_seed(0)
    if key == "gpt2s":
        model = GPT2Small()
        return model, _lm_loss(model, 50257, 1, 64), "GPT-2-small-sized LM (12×768, vocab 50257, tied head), batch 1×64 tokens"
    if key == "gpt2s_untied":  # shows that the saving's limit is the largest gradient, not the tied weight
        model = GPT2Small(tied=False)
        return model, _lm_loss(model, 50257, 1, 64), "the same LM with an untied output head (163M params), batch 1×64 tokens"
    if key == "lm":
        model = TinyLM(vocab=16000, d=384, layers=6, heads=6, ctx=128)
        return model, _lm_loss(model, 16000, 4, 64), "causal transformer LM 6×384, vocab 16000, batch 4×64 tokens"
    if key == "seed":
        model = seed_classifier(vocab=5000)
        g = torch.Generator().manual_seed(0)
        xs = torch.randint(1, 5000, (32, 100), generator=g)
        ys = torch.randint(0, 2, (32,), generator=g)
        return model, lambda m, _=False: F.cross_entropy(m(xs), ys), "Embedding 5000×256 + BiGRU 256 + Dense, batch 32×100 tokens"
    raise SystemExit(f"unknown model {key!r} (gpt2s, gpt2s_untied, lm, seed)")


def _released_weights(model: nn.Module) -> List[torch.Tensor]:
    """The LM's token embedding and output head (one weight when tied); none for other models."""
    if not isinstance(model, TinyLM):
        raise ValueError("rows are released only in the transformer LMs (oxoptim.rows in their forward)")
    return list({id(w): w for w in (model.tok.weight, model.head.weight)}.values())


class Contender:
    """One way of training: ``start`` builds the optimizer (and hooks), ``iteration`` runs one.
    ``dtype``: the model is cast to it first (bfloat16 weights, no fp32 master copy).
    ``without_logits``: the LM's head and loss by ``oxoptim.rows.linear_cross_entropy``."""

    def __init__(self, name: str, make: Callable[[List[nn.Parameter]], Any], in_backward: str = "",
                 dtype: torch.dtype = torch.float32, without_logits: bool = False) -> None:
        self.name, self.make, self.in_backward, self.dtype = name, make, in_backward, dtype
        self.without_logits = without_logits

    def applies(self, model: nn.Module) -> bool:
        """Rows are released, and the logits left out, in the transformer LMs."""
        if self.in_backward != "oxoptim rows" and not self.without_logits:
            return True
        return isinstance(model, TinyLM)

    def start(self, model: nn.Module) -> Any:
        model.to(self.dtype)  # in place: the parameters stay the same objects (and tied)
        params = [p for p in model.parameters()]
        if self.in_backward in ("oxoptim", "oxoptim rows"):
            opt = self.make(params)
            rows = _released_weights(model) if self.in_backward == "oxoptim rows" else []
            context = oxoptim.step_in_backward(opt, release_rows=rows)
            context.__enter__()
            return opt
        if self.in_backward == "tutorial":
            per_param = {p: torch.optim.AdamW([p], lr=1e-3, fused=True) for p in params}

            def hook(p: torch.Tensor) -> None:
                per_param[p].step()
                per_param[p].zero_grad()

            for p in params:
                p.register_post_accumulate_grad_hook(hook)
            return None
        return self.make(params)

    def iteration(self, model: nn.Module, opt: Any, loss_fn: LossFn) -> None:
        # zero_grad last: the ordinary loop's gradients are not alive during the next forward.
        (loss_fn(model, True) if self.without_logits else loss_fn(model)).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)


CONTENDERS = [
    Contender("torch AdamW default, loop", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    Contender("torch AdamW fused, loop", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    Contender("oxoptim AdamW, loop", lambda ps: oxoptim.AdamW(ps, lr=1e-3)),
    Contender("oxoptim AdamW, in backward", lambda ps: oxoptim.AdamW(ps, lr=1e-3), "oxoptim"),
    # The token embedding and output head (tied or not) updated row block by row block: no whole gradient.
    Contender("oxoptim AdamW, in backward, rows released", lambda ps: oxoptim.AdamW(ps, lr=1e-3), "oxoptim rows"),
    Contender("torch fused AdamW per param, in backward (tutorial)", lambda ps: None, "tutorial"),
    # The logits (tokens × vocabulary) and their gradient never whole either: the LM's head and loss in chunks.
    Contender("torch AdamW fused, loop, no logits", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
              without_logits=True),
    Contender("oxoptim AdamW, in backward, rows released, no logits", lambda ps: oxoptim.AdamW(ps, lr=1e-3),
              "oxoptim rows", without_logits=True),
    # A quarter of the memory: bfloat16 weights (stochastic rounding), 8-bit moments, no gradients kept.
    Contender("oxoptim AdamW8bit, bf16 weights + SR, loop",
              lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3, bf16_stochastic_round=True), dtype=torch.bfloat16),
    Contender("oxoptim AdamW8bit, bf16 weights + SR, in backward",
              lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3, bf16_stochastic_round=True), "oxoptim", dtype=torch.bfloat16),
    Contender("oxoptim AdamW8bit, bf16 weights + SR, in backward, rows released",
              lambda ps: oxoptim.AdamW8bit(ps, lr=1e-3, bf16_stochastic_round=True), "oxoptim rows", dtype=torch.bfloat16),
    # SGD with momentum (4 B/param of state in fp32) against its 8-bit, bf16-weight form (1.02 B/param).
    Contender("torch SGD momentum fused, loop", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)),
    Contender("oxoptim SGD8bit, bf16 weights + SR, loop",
              lambda ps: oxoptim.SGD8bit(ps, lr=0.1, momentum=0.9, bf16_stochastic_round=True), dtype=torch.bfloat16),
    Contender("oxoptim SGD8bit, bf16 weights + SR, in backward, rows released",
              lambda ps: oxoptim.SGD8bit(ps, lr=0.1, momentum=0.9, bf16_stochastic_round=True), "oxoptim rows",
              dtype=torch.bfloat16),
]
REFERENCE = "torch AdamW fused, loop"


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _held_mib(model: nn.Module, opt: Any) -> Tuple[float, float]:
    """Bytes of the weights and of the optimizer state held between iterations (MiB)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
    state = 0
    for entry in getattr(opt, "state", {}).values():
        state += sum(t.numel() * t.element_size() for t in entry.values() if torch.is_tensor(t))
    return weights / 2**20, state / 2**20


def memory_child(key: str, name: str) -> dict:
    before_model = _status_mib("VmRSS")
    model, loss_fn, _ = build(key)
    contender = next(c for c in CONTENDERS if c.name == name)
    opt = contender.start(model)
    contender.iteration(model, opt, loss_fn)  # warm-up: optimizer state exists from here on
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    for _ in range(MEMORY_ITERS):
        contender.iteration(model, opt, loss_fn)
    peak = _status_mib("VmHWM")
    weights, state = _held_mib(model, opt)
    return {"peak_rss_mib": peak, "after_warmup_rss_mib": base, "peak_over_warmup_mib": peak - base,
            "peak_over_pre_model_mib": peak - before_model, "weights_mib": weights, "state_mib": state}


def measure_memory(key: str, name: str, threads: Optional[int], repeats: int = 1) -> dict:
    """``memory_child`` in ``repeats`` fresh processes: each figure is the median over them, and
    ``peaks_rss_mib`` lists every process's peak (the RSS after warm-up of the same contender moves
    by tens of MiB from one process to the next, so one process is one sample)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", key, name]
    cmd += ["--threads", str(threads)] if threads else []
    # A fixed mmap threshold: glibc's dynamic one would keep freed gradients in the heap,
    # so the RSS would not fall when they are freed (every tensor above 128 KiB is its own mapping).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    runs = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    merged = {field: _median([r[field] for r in runs]) for field in runs[0]}
    merged["peaks_rss_mib"] = [r["peak_rss_mib"] for r in runs]
    return merged


def time_model(key: str, names: List[str], rounds: int, iters: int) -> Dict[str, List[float]]:
    model, loss_fn, _ = build(key)
    runs = {}
    for c in CONTENDERS:
        if c.name not in names or not c.applies(model):
            continue
        m = copy.deepcopy(model)
        if isinstance(m, GPT2Small):
            assert (m.head.weight is m.tok.weight) == (model.head.weight is model.tok.weight)  # deepcopy keeps ties
        opt = c.start(m)
        for _ in range(2):
            c.iteration(m, opt, loss_fn)
        runs[c.name] = (c, m, opt)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            c, m, opt = runs[name]
            t0 = time.perf_counter()
            for _ in range(iters):
                c.iteration(m, opt, loss_fn)
            times[name].append((time.perf_counter() - t0) / iters * 1e3)
    return times


def time_in_processes(key: str, names: List[str], rounds: int, iters: int, processes: int,
                      threads: Optional[int]) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """``time_model`` in ``processes`` child processes, the i-th with ``PYTHONHASHSEED=i``: a process's
    memory layout (which the hash seed changes) can move a contender's time, so one process is one sample.
    Returns every round of every process pooled, and each process's median, per contender."""
    pooled: Dict[str, List[float]] = {}
    per_process: Dict[str, List[float]] = {}
    for i in range(processes):
        cmd = [sys.executable, __file__, "--time-child", key, "|".join(names), str(rounds), str(iters)]
        if threads:
            cmd += ["--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        for name, ms in json.loads(out.stdout.strip().splitlines()[-1]).items():
            pooled.setdefault(name, []).extend(ms)
            per_process.setdefault(name, []).append(_median(ms))
    return pooled, per_process


def rows_match_loop(key: str, iterations: int = 3) -> bool:
    """Whether oxoptim AdamW with released rows ends bit-identical to its ordinary loop after a few
    iterations on this model (the chunked weight gradient may differ from autograd's in the last
    bits on other shapes or BLAS builds: oxoptim.rows)."""
    model, loss_fn, _ = build(key)
    ends = []
    for name in ("oxoptim AdamW, loop", "oxoptim AdamW, in backward, rows released"):
        c = next(c for c in CONTENDERS if c.name == name)
        m = copy.deepcopy(model)
        opt = c.start(m)
        for _ in range(iterations):
            c.iteration(m, opt, loss_fn)
        ends.append([p.detach().clone() for p in m.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*ends))


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def markdown(data: dict) -> str:
    lines = [
        f"Machine: {data['machine']}; torch {data['torch']}, oxoptim {data['oxoptim']}, {data['threads']} threads; "
        f"{data['rounds']} rounds × {data['iters']} iterations per contender; command `{data['command']}`"
        + (f", environment {data['env']}" if data.get("env") else "") + ".",
        "",
        *([f"Time: {data['processes']} processes (PYTHONHASHSEED 0..{data['processes'] - 1}), their rounds pooled; "
           "[per-process medians] after each figure.", ""] if data.get("processes", 1) > 1 else []),
        f"Memory: {data['memory_method']}",
        "",
    ]
    for model in data["models"]:
        lines += [
            f"**{model['name']}** — {model['description']}; gradients {model['grad_mib']:.0f} MiB",
            "",
        ]
        if "rows_bit_identical_to_loop" in model:
            lines += [f"Released rows (oxoptim AdamW) bit-identical to its ordinary loop after 3 iterations: "
                      f"{model['rows_bit_identical_to_loop']}", ""]
        lines += [
            "| contender | ms/iter median (min–max) | peak RSS MiB | peak over warm-up MiB | saved vs torch fused loop, share of gradients "
            "(from peak RSS; from peak over warm-up) | weights + state MiB | peak over pre-model RSS MiB (share of torch fused loop's) |",
            "|---|---|---|---|---|---|---|",
        ]
        ref = model["results"].get(REFERENCE, {}).get("memory", {})
        for name, rec in model["results"].items():
            ms = rec.get("iter_ms", [])
            t = f"{_median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})" if ms else "—"
            if len(rec.get("process_medians", [])) > 1:
                t += " [" + ", ".join(f"{m:.0f}" for m in rec["process_medians"]) + "]"
            mem = rec.get("memory", {})
            if "peak_rss_mib" in mem:
                saved = ""
                if "peak_rss_mib" in ref:
                    saved = (f"{(ref['peak_rss_mib'] - mem['peak_rss_mib']) / model['grad_mib'] * 100:.0f}%; "
                             f"{(ref['peak_over_warmup_mib'] - mem['peak_over_warmup_mib']) / model['grad_mib'] * 100:.0f}%")
                held = over = ""
                if "weights_mib" in mem:
                    held = f"{mem['weights_mib']:.0f} + {mem['state_mib']:.0f}"
                    over = f"{mem['peak_over_pre_model_mib']:.0f}"
                    if "peak_over_pre_model_mib" in ref:
                        over += f" ({mem['peak_over_pre_model_mib'] / ref['peak_over_pre_model_mib'] * 100:.0f}%)"
                peak = f"{mem['peak_rss_mib']:.0f}"
                if len(mem.get("peaks_rss_mib", [])) > 1:
                    peak += " [" + ", ".join(f"{p:.0f}" for p in mem["peaks_rss_mib"]) + "]"
                lines.append(f"| {name} | {t} | {peak} | {mem['peak_over_warmup_mib']:.0f} | {saved} | {held} | {over} |")
            else:
                lines.append(f"| {name} | {t} | {mem.get('error', '—')} | | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2s,seed,lm")
    ap.add_argument("--contenders", help="'|'-separated substrings of contender names (names hold commas; default: all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2, help="iterations per contender per round")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-repeats", type=int, default=1,
                    help="memory: this many processes per contender, medians reported (peaks listed)")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--check-rows", action="store_true",
                    help="also check that released rows end bit-identical to the ordinary loop (LMs)")
    ap.add_argument("--processes", type=int, default=1,
                    help="time in this many child processes (PYTHONHASHSEED 0, 1, ...), rounds pooled")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--time-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0
    if args.time_child:
        key, wanted, rounds, iters = args.time_child
        print(json.dumps(time_model(key, wanted.split("|"), int(rounds), int(iters))))
        return 0
    if args.processes < 1:
        ap.error("--processes must be at least 1")
    if args.memory_repeats < 1:
        ap.error("--memory-repeats must be at least 1")
    keys = args.models.split(",")
    names = [c.name for c in CONTENDERS]
    if args.contenders:
        wanted = args.contenders.split("|")
        names = [n for n in names if any(w in n for w in wanted)]
    here = Path(__file__).resolve().parent
    out = args.out or here / "results" / ("step_in_backward.md" if args.models == "gpt2s,seed,lm" else f"step_in_backward_{'_'.join(keys)}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "kind": "step_in_backward",
        "command": " ".join(["python benches/step_in_backward.py"] + [a for a in (argv if argv is not None else sys.argv[1:])]),
        "machine": machine_line(),
        "torch": torch.__version__,
        "oxoptim": oxoptim.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "iters": args.iters,
        "processes": args.processes,
        "env": " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ),
        "memory_method": "not measured" if args.no_memory else (
            f"peak RSS (VmHWM) of a separate process per contender ({args.memory_repeats} per contender, "
            f"medians; each process's peak in brackets): build, 1 warm-up iteration, reset the peak "
            f"(/proc/self/clear_refs), {MEMORY_ITERS} iterations; glibc's mmap threshold fixed at 128 KiB "
            "(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS. 'weights + state' counts the tensors "
            "held between iterations; 'peak over pre-model RSS' is the peak less the RSS before the model was built: "
            "weights, gradients, state, and this small batch's activations"
        ),
        "models": [],
    }
    for key in keys:
        model, _, description = build(key)
        n = sum(p.numel() for p in model.parameters())
        applicable = [name for name in names if next(c for c in CONTENDERS if c.name == name).applies(model)]
        del model
        entry = {"key": key, "name": f"{key} ({n / 1e6:.1f}M params)", "description": description, "params": n, "grad_mib": n * 4 / 2**20, "results": {}}
        print(f"\n== {entry['name']}: {description}", flush=True)
        if args.check_rows and key.startswith("gpt2s"):
            entry["rows_bit_identical_to_loop"] = rows_match_loop(key)
            print(f"  released rows bit-identical to the ordinary loop after 3 iterations: "
                  f"{entry['rows_bit_identical_to_loop']}", flush=True)
        process_medians: Dict[str, List[float]] = {}
        if args.no_time:
            times: Dict[str, List[float]] = {}
        elif args.processes > 1:
            times, process_medians = time_in_processes(key, names, args.rounds, args.iters, args.processes, args.threads)
        else:
            times = time_model(key, names, args.rounds, args.iters)
        for name in applicable:
            rec: dict = {"iter_ms": times.get(name, [])}
            if name in process_medians:
                rec["process_medians"] = process_medians[name]
            if not args.no_memory:
                rec["memory"] = measure_memory(key, name, args.threads, args.memory_repeats)
            entry["results"][name] = rec
            ms = rec["iter_ms"]
            shown = f"{_median(ms):9.1f} ms/iter ({min(ms):.1f}–{max(ms):.1f})" if ms else ""
            print(f"  {name:<52} {shown}  {json.dumps(rec.get('memory', {}))}", flush=True)
        data["models"].append(entry)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.write_text(markdown(data))
    print(f"wrote {out.with_suffix('.json')} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
