"""The trainer: runs stages (train → evaluate → adjust), logs metrics, checkpoints, resumes exactly."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import checkpoint as ckpt
from .adversarial import EmbeddingAdversary
from .errors import INSTALL_TRAIN
from .extras import installed, missing_output_note, output_module
from .rules import Trial, check_monitors, monitorable
from .stages import Stage, build_optimizer

__all__ = ["Trainer"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _as_xy(data: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) tensors from a TextDataset, a TensorDataset or an (x, y) pair."""
    if data is None:
        raise ValueError("training and validation data are required")
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    if hasattr(data, "tensors"):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    raise TypeError(f"data must be (x, y) tensors, a TensorDataset or a TextDataset, not {type(data).__name__}")


def _metric_table(metrics: Any) -> Dict[str, Metric]:
    from .model import DEFAULT_METRICS

    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out = {}
    for m in metrics:
        if isinstance(m, str):
            if m not in DEFAULT_METRICS:
                raise ValueError(f"unknown metric {m!r}; known: {sorted(DEFAULT_METRICS)}")
            out[m] = DEFAULT_METRICS[m]
        else:
            out[getattr(m, "__name__", f"metric{len(out)}")] = m
    return out


def _clone_state(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


class _Phase:
    """Objects living for one phase of a stage (a trial candidate, or the stage's main run)."""

    def __init__(self, optimizer, averager, base_lrs, overrides):
        self.optimizer = optimizer
        self.averager = averager
        self.base_lrs = base_lrs
        self.overrides = overrides

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "averager": self.averager.state_dict() if self.averager is not None else None,
            "overrides": self.overrides,
        }


class Trainer:
    """Multi-stage training: for each :class:`Stage`, train, evaluate on validation, adjust, continue.

    Args:
        model: a ``torch.nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        train_data, val_data: ``(x, y)`` tensors, a ``TensorDataset`` or a ``TextDataset``.
        stages: the plan, a list of :class:`Stage`.
        metrics: ``{"name": fn(outputs, targets) -> batch mean}`` or names (``["accuracy"]``);
            logged on validation as ``val_<name>``.
        run_dir: where ``metrics.jsonl``, ``summary.json``, ``curves.png``, ``final.pt`` and
            ``checkpoints/`` go (``None``: no files, no checkpoints).
        seed: seeds the data order (and, at the start of a fresh run, torch's RNG).
        checkpoint_every: also checkpoint every N optimizer steps (always at each epoch end).
        quiet: no progress bars or messages (they are also off when stdout is not a terminal).
        bucket: if > 0 and the inputs are padded token ids (2-D integer tensor, ``pad_value``
            padding), mini-batches are drawn from length buckets: each epoch's shuffled order is
            cut into chunks of ``bucket`` batches, each chunk sorted by length and cut into
            batches, and the batches shuffled. Less padding per batch, so faster for models that
            trim padding (the default BiGRU does); still seeded and exactly resumable. Evaluation
            then also runs in length-sorted batches.

    Data order, every rank's random state and all optimizer/averager/rule state are checkpointed,
    so ``Trainer(...).fit(resume=True)`` after an interruption (even ``kill -9``) ends with the same
    parameters, bit for bit, as an uninterrupted run with the same thread and process counts.
    Under ``torch.distributed`` (``torchrun``), the model is wrapped in DDP, each rank takes a
    shard of every batch and rank 0 writes the outputs. Stages and rules are checked when the
    Trainer is made (ValueError naming the valid choices). An output that needs an optional
    package which is not installed (``curves.png``: matplotlib; progress bars: tqdm) is named
    once on stderr and under ``missing_outputs`` in ``summary.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_data: Any,
        val_data: Any,
        stages: Sequence[Stage],
        metrics: Any = ("accuracy",),
        run_dir: Optional[str] = None,
        seed: int = 0,
        checkpoint_every: Optional[int] = 200,
        eval_batch_size: int = 512,
        quiet: bool = False,
        keep_checkpoints: int = 3,
        meta: Optional[dict] = None,
        bucket: int = 0,
        pad_value: int = 0,
    ):
        if not stages:
            raise ValueError("at least one stage is required")
        self.model = model
        self.loss_fn = loss_fn
        self.train_x, self.train_y = _as_xy(train_data)
        self.val_x, self.val_y = _as_xy(val_data)
        self.stages = list(stages)
        self.metrics = _metric_table(metrics)
        for st in self.stages:  # again: rules may have been added since the stage was made
            st.validate()
            try:
                check_monitors(st.adjust, monitorable(self.metrics))
            except ValueError as e:
                raise ValueError(f"stage {st.name!r}: {e}") from e
        self.run_dir = run_dir
        self.seed = int(seed)
        self.checkpoint_every = int(checkpoint_every) if checkpoint_every else 0
        self.eval_batch_size = int(eval_batch_size)
        self.keep_checkpoints = keep_checkpoints
        self.meta = dict(meta or {})
        self.bucket = int(bucket or 0)
        self.pad_value = pad_value
        self._lengths = None
        if self.bucket > 0 and self.train_x.dim() == 2 and not self.train_x.is_floating_point():
            self._lengths = (self.train_x != pad_value).sum(1)

        import torch.distributed as dist

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.quiet = quiet or not self.is_main
        self.net: nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model)

        eps = [st.adversarial for st in self.stages if st.adversarial]
        self._adversary = EmbeddingAdversary(model, eps[0]) if eps else None

        # Progress through the plan; all of it goes into checkpoints.
        self.pos = {"stage": 0, "trial": None, "epoch": 0, "batch": 0}
        self.stage_state: Dict[str, Any] = self._fresh_stage_state()
        self.global_step = 0
        self.epoch_counter = 0
        self.acc = {"loss_sum": 0.0, "n": 0}
        self.history: List[dict] = []
        self.events: List[str] = []
        self.elapsed = 0.0
        self.stopped = False
        self.done = False
        self._phase: Optional[_Phase] = None
        self._t0 = time.time()
        self._elapsed_base = 0.0
        self._bar = None
        # Outputs this run cannot make (an optional package is missing): named once, and in summary.json.
        self.missing_outputs: Dict[str, str] = {}

    # ----- small interface for rules -------------------------------------------------------

    @property
    def lr_scale(self) -> float:
        return self.stage_state["lr_scale"]

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        self.stage_state["lr_scale"] = float(value)

    @property
    def stage(self) -> Stage:
        return self.stages[self.pos["stage"]]

    def log_event(self, msg: str) -> None:
        line = f"[{self.stage.name} e{self.pos['epoch'] + 1}] {msg}" if self.pos["stage"] < len(self.stages) else msg
        self.events.append(line)
        self._print(line)

    def evaluated_state(self) -> Dict[str, torch.Tensor]:
        """A copy of the weights validation uses (the averaged ones while averaging)."""
        avg = self._phase.averager if self._phase is not None else None
        if avg is not None:
            with avg.averaged():
                return _clone_state(self.model.state_dict())
        return _clone_state(self.model.state_dict())

    def load_model_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state)

    # ----- output --------------------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _shows_progress(self) -> bool:
        return not self.quiet and sys.stdout.isatty()

    def _missing(self, output: str, note: str) -> None:
        """Records an output this run cannot make and says so once (on stderr, even when quiet)."""
        if output in self.missing_outputs or not self.is_main:
            return
        self.missing_outputs[output] = note
        print(f"oxoptim: {note}", file=sys.stderr, flush=True)

    def _progress_bar(self, **kwargs):
        """A tqdm bar when a person watches a terminal and tqdm is installed, else None."""
        if not self._shows_progress() or "progress bars" in self.missing_outputs:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as e:  # installed but broken
            self._missing("progress bars", f"progress bars need tqdm, which failed to import ({e}): {INSTALL_TRAIN}")
            return None
        return tqdm(**kwargs)

    def _path(self, name: str) -> Optional[str]:
        return os.path.join(self.run_dir, name) if self.run_dir else None

    def _write_metrics_line(self, record: dict) -> None:
        if self.run_dir and self.is_main:
            with open(self._path("metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    # ----- stages and phases ---------------------------------------------------------------

    @staticmethod
    def _fresh_stage_state() -> Dict[str, Any]:
        return {"started": False, "lr_scale": 1.0, "trial_start": None, "trial_best": None, "chosen": {},
                "rules": None}

    def _steps_per_epoch(self, st: Stage) -> int:
        if st.full_batch:
            return st.steps_per_epoch
        return max(1, math.ceil(len(self.train_y) / int(st.batch_size)))

    def _begin_stage(self) -> None:
        st = self.stage
        for r in st.adjust:
            r.reset()
        self.stage_state = self._fresh_stage_state()
        self.stage_state["started"] = True
        trial = st.trial()
        if trial is not None:
            self.stage_state["trial_start"] = _clone_state(self.model.state_dict())
            self.pos.update(trial=0, epoch=0, batch=0)
        else:
            self.pos.update(trial=None, epoch=0, batch=0)
        self._print(f"stage {self.pos['stage'] + 1}/{len(self.stages)} {st.describe()}")

    def _make_phase(self, overrides: dict) -> _Phase:
        st = self.stage
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = build_optimizer(st, params, overrides)
        base_lrs = [g.get("lr") for g in opt.param_groups]
        averager = None
        if st.average is not None:
            import oxoptim

            if not hasattr(oxoptim, "ParamAverager"):
                raise RuntimeError("average= needs oxoptim.ParamAverager, which this build of oxoptim lacks")
            start = st.average_start_epoch * self._steps_per_epoch(st)
            averager = oxoptim.ParamAverager(params, mode=st.average, decay=st.average_decay, start_step=start)
        return _Phase(opt, averager, base_lrs, dict(overrides))

    def _load_phase(self, saved: dict) -> _Phase:
        ph = self._make_phase(saved["overrides"])
        ph.optimizer.load_state_dict(saved["optimizer"])
        if ph.averager is not None and saved["averager"] is not None:
            ph.averager.load_state_dict(saved["averager"])
        return ph

    def _current_overrides(self) -> dict:
        trial = self.stage.trial()
        if self.pos["trial"] is not None:
            assert trial is not None  # a trial position only exists in a stage with a Trial
            return dict(trial.candidates[self.pos["trial"]])
        return dict(self.stage_state["chosen"])

    def _end_stage(self) -> None:
        """Averaged weights replace the model's, then rules' stage-end hooks (RestoreBest) run."""
        st = self.stage
        if self._phase is not None and self._phase.averager is not None:
            self.load_model_state(self.evaluated_state())
        for r in st.adjust:
            r.on_stage_end(self)
        self._phase = None
        self.pos.update(stage=self.pos["stage"] + 1, trial=None, epoch=0, batch=0)
        self.stage_state = self._fresh_stage_state()

    # ----- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> List[dict]:
        """Runs the plan (from the last good checkpoint when ``resume``) and returns the history."""
        if self.run_dir and self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        resumed = False
        if resume:
            resumed = self._resume()
        if not resumed:
            torch.manual_seed(self.seed)
            random.seed(self.seed)
            if self.run_dir and self.is_main:  # a fresh run: no stale checkpoints or metrics
                for old in ckpt.list_checkpoints(self.run_dir):
                    os.remove(old)
                ckpt.atomic_write_bytes(self._path("metrics.jsonl"), b"")
        self._t0 = time.time()
        self._elapsed_base = self.elapsed
        if self.run_dir and self.is_main and not installed(output_module("curves.png")):
            self._missing("curves.png", missing_output_note("curves.png"))
        if self._shows_progress() and not installed(output_module("progress bars")):
            self._missing("progress bars", missing_output_note("progress bars"))
        self.model.train()
        while not self.done:
            if self.pos["stage"] >= len(self.stages) or self.stopped:
                self.done = True
                break
            self._run_stage()
        self.elapsed = self._elapsed_base + (time.time() - self._t0)
        self._finish()
        return self.history

    def _run_stage(self) -> None:
        st = self.stage
        if not self.stage_state["started"]:
            self._begin_stage()
        trial = st.trial()
        spe = self._steps_per_epoch(st)
        # Trial phases: each candidate from the same starting weights, for trial.epochs epochs.
        while self.pos["trial"] is not None:
            assert trial is not None  # a trial position only exists in a stage with a Trial
            k = self.pos["trial"]
            if self._phase is None:
                self._phase = self._make_phase(self._current_overrides())
            while self.pos["epoch"] < trial.epochs:
                record = self._run_epoch(spe, f"trial {k} {trial.candidates[k]}")
                self.pos.update(epoch=self.pos["epoch"] + 1, batch=0)
                if self.pos["epoch"] < trial.epochs:
                    self._checkpoint()
            score = float(record[trial.monitor])
            best = self.stage_state["trial_best"]
            if trial.score_better(score, None if best is None else best["score"]):
                self.stage_state["trial_best"] = {
                    "score": score, "index": k, "model": _clone_state(self.model.state_dict()),
                    "phase": self._phase.state_dict(), "rng": torch.get_rng_state(),
                }
            self._phase = None
            if k + 1 < len(trial.candidates):
                self.load_model_state(self.stage_state["trial_start"])
                self.pos.update(trial=k + 1, epoch=0, batch=0)
            else:
                best = self.stage_state["trial_best"]
                chosen = dict(trial.candidates[best["index"]])
                self.stage_state["chosen"] = chosen
                self.load_model_state(best["model"])
                self._phase = self._load_phase(best["phase"])
                self.stage_state["trial_start"] = None
                self.stage_state["trial_best"] = None
                self.pos.update(trial=None, epoch=trial.epochs, batch=0)
                self.log_event(f"trial chose {chosen} ({trial.monitor}={best['score']:.4g})")
            self._checkpoint()
        # The stage's main run, with its adjust rules.
        if self._phase is None:
            self._phase = self._make_phase(self._current_overrides())
        while self.pos["epoch"] < st.epochs:
            record = self._run_epoch(spe, "main")
            action = None
            for r in st.adjust:
                if isinstance(r, Trial):
                    continue
                a = r.on_epoch_end(self, record)
                if a == "stop" or (a == "next_stage" and action is None):
                    action = a
            self.pos.update(epoch=self.pos["epoch"] + 1, batch=0)
            if action == "stop":
                self.stopped = True
            if action is not None or self.pos["epoch"] >= st.epochs:
                self._end_stage()
                if self.stopped:
                    self.pos["stage"] = len(self.stages)
                self._checkpoint()
                return
            self._checkpoint()

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch_counter)
        order = torch.randperm(len(self.train_y), generator=g)
        st = self.stage
        if self._lengths is None or st.full_batch:
            return order
        return self._bucketed(order, int(st.batch_size), g)

    def _bucketed(self, order: torch.Tensor, bs: int, g: torch.Generator) -> torch.Tensor:
        """``order`` regrouped so that consecutive ``bs``-slices are batches of similar length."""
        chunk = self.bucket * bs
        batches = []
        for i in range(0, len(order), chunk):
            part = order[i:i + chunk]
            part = part[torch.argsort(self._lengths[part], stable=True)]
            batches.extend(part[j:j + bs] for j in range(0, len(part), bs))
        full = [b for b in batches if len(b) == bs]
        short = [b for b in batches if len(b) < bs]  # at most one: the end of the last chunk
        perm = torch.randperm(len(full), generator=g).tolist()
        return torch.cat([full[k] for k in perm] + short)

    def _set_lrs(self, spe: int) -> float:
        st, ph = self.stage, self._phase
        total = st.epochs * spe
        step = self.pos["epoch"] * spe + self.pos["batch"]
        f = st.lr_schedule.factor(step, total) * self.lr_scale
        lr0 = None
        for g, base in zip(ph.optimizer.param_groups, ph.base_lrs):
            if base is not None:
                g["lr"] = base * f
                lr0 = g["lr"] if lr0 is None else lr0
        return lr0 if lr0 is not None else float("nan")

    def _reduce_grads(self, n_local: int) -> int:
        """Under DDP in a full-batch step: turns each rank's mean gradient into the global mean."""
        if not self.distributed:
            return n_local
        import torch.distributed as dist

        n = torch.tensor([float(n_local)])
        dist.all_reduce(n)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(n_local / n.item())
                dist.all_reduce(p.grad)
        return int(n.item())

    def _full_batch_step(self) -> Tuple[float, int]:
        import oxoptim

        if not hasattr(oxoptim, "GradientAverager"):
            raise RuntimeError("batch_size='full' needs oxoptim.GradientAverager, which this build lacks")
        st = self.stage
        params = [p for p in self.model.parameters() if p.requires_grad]
        ga = oxoptim.GradientAverager(params)
        idx = torch.arange(self.rank, len(self.train_y), self.world)
        loss_sum, n_local = 0.0, 0
        self._phase.optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(idx), st.micro_batch):
            b = idx[i:i + st.micro_batch]
            loss = self._forward_backward(self.model, b)
            ga.accumulate(len(b))
            loss_sum += loss.item() * len(b)
            n_local += len(b)
        ga.finalize()
        self._reduce_grads(n_local)
        self._clip(params)
        return loss_sum, n_local

    def _clip(self, params=None) -> None:
        if self.stage.grad_clip:
            import oxoptim

            if params is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
            oxoptim.clip_grad_norm_(params, self.stage.grad_clip)

    def _mini_batch_step(self, order: torch.Tensor, b: int) -> Tuple[float, int]:
        bs = int(self.stage.batch_size)
        idx = order[b * bs:(b + 1) * bs][self.rank::self.world]
        self._phase.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(self.net, idx)
        self._clip()
        return loss.item() * len(idx), len(idx)

    def _forward_backward(self, net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """Loss on the examples ``idx``, back-propagated (plus the adversarial term if the stage has one)."""
        x, y = self.train_x[idx], self.train_y[idx]
        eps = self.stage.adversarial
        if not eps:
            loss = self.loss_fn(net(x), y)
            loss.backward()
            return loss
        assert self._adversary is not None
        self._adversary.eps = eps
        sync = getattr(net, "no_sync", contextlib.nullcontext)
        return self._adversary.forward_backward(lambda: self.loss_fn(net(x), y), sync)

    def _run_epoch(self, spe: int, phase_label: str) -> dict:
        st, ph = self.stage, self._phase
        order = None if st.full_batch else self._epoch_order()
        if self.pos["batch"] == 0:
            self.acc = {"loss_sum": 0.0, "n": 0}
        bar = self._progress_bar(
            total=spe, initial=self.pos["batch"], leave=False, dynamic_ncols=True,
            desc=f"{st.name} {self.pos['epoch'] + 1}/{st.epochs}" + ("" if phase_label == "main" else " trial"))
        self._bar = bar
        t_epoch, n_epoch = time.time(), 0
        try:
            for b in range(self.pos["batch"], spe):
                lr = self._set_lrs(spe)
                if st.full_batch:
                    loss_sum, n = self._full_batch_step()
                    if hasattr(ph.optimizer, "record_loss"):  # Subgradient: keeps the best iterate
                        ph.optimizer.record_loss(loss_sum / max(1, n))
                else:
                    loss_sum, n = self._mini_batch_step(order, b)
                ph.optimizer.step()
                if ph.averager is not None:
                    ph.averager.update()
                self.global_step += 1
                self.pos["batch"] = b + 1
                self.acc["loss_sum"] += loss_sum
                self.acc["n"] += n
                n_epoch += n
                if bar is not None:
                    bar.update(1)
                    rate = n_epoch * self.world / max(1e-9, time.time() - t_epoch)
                    bar.set_postfix(loss=f"{self.acc['loss_sum'] / max(1, self.acc['n']):.4f}", sps=f"{rate:.0f}")
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 and b + 1 < spe:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        self.epoch_counter += 1
        train_loss = self.acc["loss_sum"] / max(1, self.acc["n"])
        if self.distributed:
            import torch.distributed as dist

            t = torch.tensor([self.acc["loss_sum"], float(self.acc["n"])], dtype=torch.float64)
            dist.all_reduce(t)
            train_loss = float(t[0] / max(1.0, float(t[1])))
        val = self._validate()
        self.elapsed = self._elapsed_base + (time.time() - self._t0)
        record = {
            "stage": st.name, "stage_index": self.pos["stage"], "phase": phase_label,
            "epoch": self.pos["epoch"] + 1, "global_epoch": len(self.history) + 1, "step": self.global_step,
            "lr": lr, "train_loss": train_loss, **val,
            "time_s": round(self.elapsed, 3),
            "samples_per_s": round(n_epoch * self.world / max(1e-9, time.time() - t_epoch), 1),
        }
        self.history.append(record)
        self._write_metrics_line(record)
        metric_txt = " ".join(f"{k}={v:.4f}" for k, v in val.items())
        self._print(f"  {st.name} epoch {record['epoch']}/{st.epochs}"
                    + ("" if phase_label == "main" else f" [{phase_label}]")
                    + f": train_loss={train_loss:.4f} {metric_txt} lr={lr:.3g}")
        return record

    # ----- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Any, weights: str = "current") -> Dict[str, float]:
        """Loss and metrics over ``data`` (with the averaged weights when an averager is active
        and ``weights == "evaluated"``). Keys: ``loss`` and the metric names."""
        x, y = _as_xy(data)
        avg = self._phase.averager if (self._phase is not None and weights == "evaluated") else None
        if avg is not None:
            with avg.averaged():
                return self._evaluate(x, y)
        return self._evaluate(x, y)

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        idx_all = torch.arange(self.rank, len(y), self.world)
        if self._lengths is not None and x.dim() == 2 and not x.is_floating_point():
            # Length-sorted batches: far less padding to run through (models that trim it gain).
            idx_all = idx_all[torch.argsort((x[idx_all] != self.pad_value).sum(1), stable=True)]
        sums = torch.zeros(1 + len(self.metrics), dtype=torch.float64)
        n = 0
        with torch.no_grad():
            for i in range(0, len(idx_all), self.eval_batch_size):
                idx = idx_all[i:i + self.eval_batch_size]
                out = self.model(x[idx])
                k = len(idx)
                sums[0] += float(self.loss_fn(out, y[idx])) * k
                for j, fn in enumerate(self.metrics.values()):
                    sums[1 + j] += float(fn(out, y[idx])) * k
                n += k
        tot = torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64)])
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tot)
        self.model.train(was_training)
        n_all = max(1.0, float(tot[-1]))
        out = {"loss": float(tot[0]) / n_all}
        for j, name in enumerate(self.metrics):
            out[name] = float(tot[1 + j]) / n_all
        return out

    def _validate(self) -> Dict[str, float]:
        res = self.evaluate((self.val_x, self.val_y), weights="evaluated")
        return {f"val_{k}": v for k, v in res.items()}

    # ----- checkpoints ---------------------------------------------------------------------

    def _state(self, ranks: List[dict]) -> dict:
        return {
            "version": 2,
            "pos": dict(self.pos),
            "global_step": self.global_step,
            "epoch_counter": self.epoch_counter,
            "model": self.model.state_dict(),
            "phase": self._phase.state_dict() if self._phase is not None else None,
            "stage_state": {**{k: v for k, v in self.stage_state.items() if k != "rules"},
                            "rules": [r.state_dict() for r in self.stages[self.pos["stage"]].adjust]
                            if self.pos["stage"] < len(self.stages) else []},
            "history": list(self.history),
            "events": list(self.events),
            "stopped": self.stopped,
            "elapsed": self._elapsed_base + (time.time() - self._t0),
            "ranks": ranks,
            "plan": [st.describe() for st in self.stages],
            "meta": self.meta,
        }

    def _rank_state(self) -> dict:
        """What differs between ranks: random states (dropout draws depend on each shard's shapes)
        and the epoch's running loss over the rank's shard."""
        return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "acc": dict(self.acc)}

    def _all_rank_states(self) -> Optional[List[dict]]:
        """Every rank's :meth:`_rank_state`, on rank 0 (None elsewhere)."""
        mine = self._rank_state()
        if not self.distributed:
            return [mine]
        import torch.distributed as dist

        gathered: Optional[List[Any]] = [None] * self.world if self.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        return gathered

    def _checkpoint(self) -> None:
        if not self.run_dir:
            return
        ranks = self._all_rank_states()
        if ranks is not None:  # rank 0
            ckpt.save_checkpoint(self.run_dir, self.global_step, self._state(ranks), keep=self.keep_checkpoints)
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _resume(self) -> bool:
        if not self.run_dir:
            raise ValueError("resume needs a run_dir")
        found = ckpt.latest_good_checkpoint(self.run_dir, warn=lambda m: print(m, file=sys.stderr, flush=True))
        if found is None:
            self._print(f"no checkpoint in {self.run_dir}: starting from scratch")
            return False
        path, s = found
        if s.get("plan") != [st.describe() for st in self.stages]:
            raise ckpt.CheckpointError(f"{path} was written for a different plan: {s.get('plan')}")
        # Version 1 checkpoints hold one process's state (rank 0's).
        ranks = s["ranks"] if "ranks" in s else [{"rng": s["rng"], "acc": s["acc"]}]
        if len(ranks) != self.world:
            raise ckpt.CheckpointError(
                f"{path} holds the state of {len(ranks)} process(es), this run has {self.world}: resume with "
                f"the same count (torchrun --nproc-per-node {len(ranks)}) to continue exactly")
        mine = ranks[self.rank]
        self.pos = dict(s["pos"])
        self.global_step = s["global_step"]
        self.epoch_counter = s["epoch_counter"]
        self.acc = dict(mine["acc"])
        self.load_model_state(s["model"])
        self.history = list(s["history"])
        self.events = list(s["events"])
        self.stopped = s["stopped"]
        self.elapsed = s["elapsed"]
        ss = dict(s["stage_state"])
        rules_state = ss.pop("rules")
        self.stage_state = {**self._fresh_stage_state(), **ss}
        if self.pos["stage"] < len(self.stages):
            for r, rs in zip(self.stages[self.pos["stage"]].adjust, rules_state):
                r.load_state_dict(rs)
            self._phase = self._load_phase(s["phase"]) if s["phase"] is not None else None
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        if self.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            ckpt.atomic_write_bytes(self._path("metrics.jsonl"), lines.encode())
        self._print(f"resumed from {path} (stage {self.pos['stage'] + 1}, epoch {self.pos['epoch'] + 1}, "
                    f"batch {self.pos['batch']}, step {self.global_step})")
        return True

    # ----- the end -------------------------------------------------------------------------

    def summary(self) -> dict:
        main = [r for r in self.history if r["phase"] == "main"]
        last = main[-1] if main else (self.history[-1] if self.history else {})
        return {
            "plan": [st.describe() for st in self.stages],
            "epochs_run": len(self.history),
            "steps": self.global_step,
            "stopped_early": self.stopped,
            "final": {k: v for k, v in last.items() if k.startswith("val_") or k == "train_loss"},
            "wall_time_s": round(self.elapsed, 2),
            "events": self.events,
            "threads": torch.get_num_threads(),
            "world_size": self.world,
            "missing_outputs": dict(self.missing_outputs),
            **self.meta,
        }

    def param_digest(self) -> str:
        """SHA-256 of the model's state (names, dtypes, shapes and bytes): equal digests, equal weights."""
        import hashlib

        h = hashlib.sha256()
        for k, v in self.model.state_dict().items():
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def _finish(self) -> None:
        if self.distributed:  # every rank must hold the same weights; the summary records it
            import torch.distributed as dist

            digests: List[Any] = [None] * self.world
            dist.all_gather_object(digests, self.param_digest())
            self.meta["rank_param_digests"] = digests
            self.meta["ranks_agree"] = len(set(digests)) == 1
            if not self.meta["ranks_agree"]:
                print(f"warning: the ranks' final parameters differ: {digests}", file=sys.stderr, flush=True)
        if not (self.run_dir and self.is_main):
            return
        import io

        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        ckpt.atomic_write_bytes(self._path("final.pt"), buf.getvalue())
        if "curves.png" not in self.missing_outputs:
            try:
                from .plots import plot_curves

                plot_curves(self.history, self._path("curves.png"))
            except Exception as e:  # plotting is a convenience; never lose a run over it, never hide it
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                self._missing("curves.png", f"curves.png could not be drawn ({type(e).__name__}: {reason})"
                                            + (f": {INSTALL_TRAIN}" if isinstance(e, ImportError) else ""))
        self.write_summary()

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        s = self.summary()
        s.update(extra or {})
        if self.run_dir and self.is_main:
            ckpt.atomic_write_bytes(self._path("summary.json"), (json.dumps(s, indent=2) + "\n").encode())
        return s
