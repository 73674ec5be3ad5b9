"""The trainer: the loop over a plan's stages (trials, epochs, steps), train → evaluate → adjust.

Everything else lives beside it: the problem in a :class:`~oxoptim.training.tasks.Task`, example
order in :mod:`.batching`, optimizer and averager in :mod:`.phase`, scores in :mod:`.evaluation`,
processes in :mod:`.distributed`, checkpoints in :mod:`.resume`, output in :mod:`.progress`, and the
run's progress in the typed records of :mod:`.state`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import resume as checkpoints
from .adversarial import EmbeddingAdversary
from .batching import epoch_order, full_batch_gradient, steps_per_epoch
from .distributed import Processes, check_distributed_stage, param_digest
from .errors import ConfigError, integer, seed_value
from .evaluation import evaluate
from .phase import Phase, check_released_weights
from .progress import Progress, epoch_line
from .rules import Trial, check_monitors, monitorable
from .stages import Stage, check_continuation, set_param_dtype
from .state import RunningLoss, RunState, StageState, TrialBest, clone_state
from .tasks import ClassificationTask, Task

__all__ = ["Trainer", "NonFiniteLoss"]


class NonFiniteLoss(ConfigError, ArithmeticError):
    """Training diverged: an epoch's training loss (or the weights) became NaN or infinite.

    :meth:`Trainer.fit` raises it at the end of that epoch (or at a checkpoint inside it), before the
    epoch is evaluated or recorded and before any checkpoint of the diverged state is written, so the
    run directory keeps the checkpoints from before (``fit(resume=True)`` continues from the last
    of them) and gets no ``summary.json`` or ``final.pt``. A Trial candidate that diverges only
    loses the trial; the run stops when every candidate does. It is a :class:`ConfigError` (the
    job's settings do not train, e.g. the learning rate is too high): ``oxoptim train`` prints it in
    one line and exits with status 2.
    """


class Trainer:
    """Multi-stage training: for each :class:`Stage`, train, evaluate on validation, adjust, continue.

    Args:
        model: a ``torch.nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        train_data, val_data: ``(x, y)`` tensors, a ``TensorDataset`` or a ``TextDataset``.
        stages: the plan, a list of :class:`Stage`.
        metrics: ``{"name": fn(outputs, targets) -> batch mean}`` or names (``["accuracy"]``);
            logged on validation as ``val_<name>`` (higher is better unless ``metric_modes`` says
            ``"min"``).
        on_record: called with every validation record (a dict as in ``metrics.jsonl``) after it
            is logged; an exception it raises ends ``fit`` (a search pruning a trial does so).
        task: instead of ``loss_fn``, the data and ``metrics``: a :class:`~oxoptim.training.tasks.Task`
            (language modelling, for one).
        run_dir: where ``metrics.jsonl``, ``summary.json``, ``curves.png``, ``final.pt`` and
            ``checkpoints/`` go (``None``: no files, no checkpoints).
        seed: seeds the data order (and, at the start of a fresh run, torch's RNG).
        checkpoint_every: also checkpoint every N optimizer steps (always at each epoch end).
        quiet: no progress bars or messages (they are also off when stdout is not a terminal).
        bucket: if > 0 and the task has lengths (padded token ids), mini-batches are drawn from
            length buckets of ``bucket`` batches (:func:`~oxoptim.training.batching.epoch_order`);
            evaluation then also runs in length-sorted batches.

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
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        train_data: Any = None,
        val_data: Any = None,
        stages: Sequence[Stage] = (),
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
        task: Optional[Task] = None,
        metric_modes: Optional[Mapping[str, str]] = None,
        on_record: Optional[Callable[[dict], None]] = None,
    ):
        if not stages:
            raise ValueError("at least one stage is required")
        if task is None:
            if loss_fn is None:
                raise ValueError("a Trainer needs a loss_fn (with training and validation data) or a task")
            task = ClassificationTask(loss_fn, train_data, val_data, metrics, metric_modes, pad_value)
        self.task = task
        self.model = model
        self.stages = list(stages)
        for st in self.stages:
            if not isinstance(st, Stage):
                raise TypeError(f"stages must be oxoptim.training.Stage objects (Stage(**table) for a TOML table), "
                                f"got {type(st).__name__}")
        if self.stages[0].continue_optimizer:
            raise ValueError(f"stage {self.stages[0].name!r}: continue_optimizer on a plan's first stage: there is no "
                             "earlier optimizer to continue")
        distributed = Processes.detect().distributed
        for i, st in enumerate(self.stages):  # again: rules may have been added since the stage was made
            st.validate()
            if i and st.continue_optimizer:
                check_continuation(self.stages[i - 1], st)
            try:
                check_monitors(st.adjust, monitorable(task.metric_modes))
            except ValueError as e:
                raise ValueError(f"stage {st.name!r}: {e}") from e
            if distributed:
                check_distributed_stage(st, task.size(task.train), Processes.detect().world)
            if st.per_layer and not hasattr(model, "layer_groups"):
                raise ValueError(f"stage {st.name!r}: trainable/layer_lr_decay need a model with layer_groups() "
                                 f"(parameter lists from the input up), which {type(model).__name__} lacks")
            if st.step_in_backward and st.release_rows:
                check_released_weights(self.stages, i, model)
        self.run_dir = run_dir
        self.seed = seed_value("seed", seed)
        self.checkpoint_every = integer("checkpoint_every", checkpoint_every, 0) if checkpoint_every else 0
        self.eval_batch_size = integer("eval_batch_size", eval_batch_size, 1)
        self.keep_checkpoints = keep_checkpoints
        self.meta = dict(meta or {})
        self.bucket = integer("bucket", bucket, 0) if bucket else 0
        self.n_train = task.size(task.train)
        self.lengths = task.lengths(task.train) if self.bucket > 0 else None
        self.procs = Processes.detect()
        self.progress = Progress(run_dir, self.procs.is_main, quiet)
        self.net = self.procs.wrap(model)  # what training steps run (DDP when distributed)
        eps = [st.adversarial for st in self.stages if st.adversarial]
        self.adversary = EmbeddingAdversary(model, eps[0]) if eps else None
        self.on_record = on_record
        self.run = RunState()
        self.phase: Optional[Phase] = None
        self._t0 = time.time()
        self._elapsed_base = 0.0
        self._final: Optional[dict] = None  # validation of the weights the run ended with (final.pt)

    # ----- what rules and callers see -------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self.stages[self.run.pos.stage]

    @property
    def lr_scale(self) -> float:
        return self.run.stage.lr_scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        self.run.stage.lr_scale = float(value)

    @property
    def history(self) -> List[dict]:
        return self.run.history

    @property
    def global_step(self) -> int:
        return self.run.global_step

    @property
    def stopped(self) -> bool:
        return self.run.stopped

    @property
    def world(self) -> int:
        return self.procs.world

    def log_event(self, msg: str) -> None:
        pos = self.run.pos
        line = f"[{self.stage.name} e{pos.epoch + 1}] {msg}" if pos.stage < len(self.stages) else msg
        self.run.events.append(line)
        self.progress.say(line)

    def evaluated_state(self) -> Dict[str, torch.Tensor]:
        """A copy of the weights validation uses (the averaged ones while averaging)."""
        with self._evaluated_weights():
            return clone_state(self.model.state_dict())

    def load_model_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state)

    def plan(self) -> List[str]:
        return [st.describe() for st in self.stages]

    def elapsed_now(self) -> float:
        return self._elapsed_base + (time.time() - self._t0)

    # ----- the plan -------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> List[dict]:
        """Runs the plan (from the last good checkpoint when ``resume``) and returns the history."""
        if self.progress.writes:
            import os

            os.makedirs(self.progress.path(""), exist_ok=True)
        with self.progress.hold():  # the run directory is this process's while it trains
            try:
                if not (resume and checkpoints.resume(self)):
                    torch.manual_seed(self.seed)
                    random.seed(self.seed)
                    self.progress.start_fresh()
                self._t0, self._elapsed_base = time.time(), self.run.elapsed
                self.progress.check_optional_outputs()
                self.model.train()
                while self.run.pos.stage < len(self.stages) and not self.run.stopped:
                    self._run_stage()
            finally:  # a step_in_backward stage's hooks never outlive the run (an error, a pruned trial)
                if self.phase is not None:
                    self.phase.close()
            self.run.elapsed = self.elapsed_now()
            self._finish()
        return self.run.history

    def _run_stage(self) -> None:
        if not self.run.stage.started:
            self._begin_stage()
        spe = steps_per_epoch(self.stage, self.n_train)
        if self.run.pos.trial is not None:
            self._run_trials(spe)
        self._run_main(spe)

    def _begin_stage(self) -> None:
        st = self.stage
        for r in st.adjust:
            r.reset()
        # lr_scale: what _end_stage passed on (a continue_optimizer stage keeps the previous one's)
        self.run.stage = StageState(started=True, lr_scale=self.run.stage.lr_scale)
        trial = st.trial()
        if trial is not None:
            self.run.stage.trial_start = clone_state(self.model.state_dict())
        self.run.pos.at(trial=0 if trial is not None else None, epoch=0)
        self.progress.say(f"stage {self.run.pos.stage + 1}/{len(self.stages)} {st.describe()}")

    def _run_trials(self, spe: int) -> None:
        """Each candidate from the stage's starting weights for ``trial.epochs`` epochs; the main
        run continues from the best one (its weights, optimizer, averager and RNG state, and the
        data order it would have had next, so that candidates that ran after it change nothing).
        Candidate k's epochs draw the data orders of epochs ``k * trial.epochs ...`` after the
        stage's start. A candidate whose training diverges (:class:`NonFiniteLoss`) drops out; the
        run stops when every candidate does."""
        trial, pos, ss = self.stage.trial(), self.run.pos, self.run.stage
        assert trial is not None  # a trial position only exists in a stage with a Trial
        while pos.trial is not None:
            k = pos.trial
            # epochs of the plan before this candidate's first (also when resumed inside it: the
            # counter moves on at the end of each epoch, with the position)
            first_epoch = self.run.epoch_counter - pos.epoch
            if self.phase is None:
                self.phase = self.make_phase(trial.candidates[k])
            record: Optional[dict] = None
            try:
                while pos.epoch < trial.epochs:
                    record = self._run_epoch(spe, f"trial {k} {trial.candidates[k]}")
                    pos.next_epoch()
                    if pos.epoch < trial.epochs:
                        self.checkpoint()
            except NonFiniteLoss as e:
                if k + 1 == len(trial.candidates) and ss.trial_best is None:
                    raise NonFiniteLoss(f"every trial candidate diverged; the last: {e}") from None
                record = None
                self.run.running = RunningLoss()
                self.run.epoch_counter = first_epoch + trial.epochs  # as if it had run them all
                self.log_event(f"trial {k} {trial.candidates[k]} dropped out: its training diverged")
            if record is not None:
                score = float(record[trial.monitor])
                if trial.score_better(score, None if ss.trial_best is None else ss.trial_best.score):
                    ss.trial_best = TrialBest(score, k, clone_state(self.model.state_dict()),
                                              self.phase.state_dict(), self._rng_states())
            self._drop_phase()
            if k + 1 < len(trial.candidates):
                assert ss.trial_start is not None
                self.load_model_state(ss.trial_start)
                pos.at(trial=k + 1, epoch=0)
            else:
                best = ss.trial_best
                assert best is not None
                ss.chosen = dict(trial.candidates[best.index])
                self.load_model_state(best.model)
                self.phase = self.load_phase(best.phase)
                self._set_rng_states(best.rng)
                self.run.epoch_counter = first_epoch - (k - best.index) * trial.epochs + trial.epochs
                ss.trial_start, ss.trial_best = None, None
                pos.at(trial=None, epoch=trial.epochs)
                self.log_event(f"trial chose {ss.chosen} ({trial.monitor}={best.score:.4g})")
            self.checkpoint()

    def _rng_states(self) -> torch.Tensor:
        """torch's random state here; under torch.distributed every rank's, one row each (a
        checkpoint, written by rank 0, then carries every rank's)."""
        state = torch.get_rng_state()
        if not self.procs.distributed:
            return state
        import torch.distributed as dist

        states: List[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return torch.stack(states)

    def _set_rng_states(self, rng: torch.Tensor) -> None:
        # a copy: torch.set_rng_state reads a view at an offset (a row) from the wrong place, or crashes
        torch.set_rng_state((rng[self.procs.rank] if rng.dim() == 2 else rng).clone())

    def _run_main(self, spe: int) -> None:
        """The stage's epochs after any trial, each followed by its adjust rules."""
        st, pos = self.stage, self.run.pos
        if self.phase is None:
            self.phase = self.make_phase(self.run.stage.chosen)
        # The previous stage's optimizer state is in this phase now (and trial candidates are done):
        # kept, it would double the optimizer's memory and every checkpoint's size for the stage.
        self.run.carried = None
        while pos.epoch < st.epochs:
            record = self._run_epoch(spe, "main")
            action = None
            for r in st.adjust:
                if isinstance(r, Trial):
                    continue
                a = r.on_epoch_end(self, record)
                if a == "stop" or (a == "next_stage" and action is None):
                    action = a
            if action == "stop":
                self.run.stopped = True
            if action is not None or pos.epoch + 1 >= st.epochs:
                self._end_stage()  # its events carry this epoch's label; it moves the position on
                self.checkpoint()
                return
            pos.next_epoch()
            self.checkpoint()

    def _end_stage(self) -> None:
        """Averaged weights replace the model's, then rules' stage-end hooks (RestoreBest) run."""
        if self.phase is not None:
            self.phase.settle()
        for r in self.stage.adjust:
            r.on_stage_end(self)
        next_stage = len(self.stages) if self.run.stopped else self.run.pos.stage + 1
        wants = next_stage < len(self.stages) and self.stages[next_stage].continue_optimizer
        self.run.carried = self.phase.carry() if wants and self.phase is not None else None
        self._drop_phase()
        self.run.pos.stage = next_stage
        self.run.pos.at(trial=None, epoch=0)
        # one optimizer through stages (warm-up, stable, decay) keeps the LR cuts its rules made
        self.run.stage = StageState(lr_scale=self.lr_scale if wants else 1.0)

    def set_param_dtype(self, name: Optional[str]) -> None:
        """Casts the model's parameters to ``name`` (None: leaves them). A cast replaces each
        parameter's data, which detaches DDP's gradient hooks (its all-reduce would silently stop):
        the model is wrapped again, collectively, as every rank casts at the same point."""
        before = [p.dtype for p in self.model.parameters()]
        set_param_dtype(self.model, name)
        if self.procs.distributed and [p.dtype for p in self.model.parameters()] != before:
            self.net = self.procs.wrap(self.model)

    def make_phase(self, overrides: Mapping[str, Any]) -> Phase:
        self.set_param_dtype(self.stage.param_dtype)  # before DDP is handed to the phase
        return Phase.make(self.stage, self.model, steps_per_epoch(self.stage, self.n_train), dict(overrides),
                          self.run.carried, ddp=self._ddp())

    def load_phase(self, saved: dict) -> Phase:
        self.set_param_dtype(self.stage.param_dtype)
        return Phase.load(self.stage, self.model, steps_per_epoch(self.stage, self.n_train), saved, ddp=self._ddp())

    def _ddp(self) -> Optional[nn.Module]:
        return self.net if self.procs.distributed else None

    def _drop_phase(self) -> None:
        if self.phase is not None:
            self.phase.close()
        self.phase = None

    # ----- an epoch and a step --------------------------------------------------------------

    def _run_epoch(self, spe: int, phase_label: str) -> dict:
        st, run = self.stage, self.run
        order = None if st.full_batch else epoch_order(self.seed, run.epoch_counter, self.n_train,
                                                       int(st.batch_size), self.lengths, self.bucket,
                                                       st.steps_per_epoch)
        if run.pos.batch == 0:
            run.running = RunningLoss()
        bar = self.progress.open_bar(
            total=spe, initial=run.pos.batch, leave=False, dynamic_ncols=True,
            desc=f"{st.name} {run.pos.epoch + 1}/{st.epochs}" + ("" if phase_label == "main" else " trial"))
        t_epoch, n_epoch, lr = time.time(), 0, float("nan")
        try:
            for b in range(run.pos.batch, spe):
                lr, n = self.train_step(order, b)
                n_epoch += n
                if bar is not None:
                    bar.update(1)
                    rate = n_epoch * self.world / max(1e-9, time.time() - t_epoch)
                    bar.set_postfix(loss=f"{run.running.mean:.4f}", sps=f"{rate:.0f}")
                if self.checkpoint_every and run.global_step % self.checkpoint_every == 0 and b + 1 < spe:
                    self.checkpoint()
        finally:
            self.progress.close_bar()
        run.epoch_counter += 1
        train_s = time.time() - t_epoch
        totals = self.procs.sum(torch.tensor([run.running.loss_sum, float(run.running.n), self._bad_weights()],
                                             dtype=torch.float64))
        self._stop_if_diverged(totals, phase_label)
        val = {f"val_{k}": v for k, v in self.evaluate(self.task.val, weights="evaluated").items()}
        run.elapsed = self.elapsed_now()
        record = {
            "stage": st.name, "stage_index": run.pos.stage, "phase": phase_label,
            "epoch": run.pos.epoch + 1, "global_epoch": len(run.history) + 1, "step": run.global_step,
            "lr": lr, "train_loss": float(totals[0] / max(1.0, float(totals[1]))), **val,
            "time_s": round(run.elapsed, 3),
            "samples_per_s": round(n_epoch * self.world / max(1e-9, train_s), 1),  # training only
        }
        run.history.append(record)
        self.progress.append_record(record)
        self.progress.say(epoch_line(st.name, st.epochs, record, val))
        if self.on_record is not None:
            self.on_record(record)
        return record

    def train_step(self, order: Optional[torch.Tensor], b: int) -> Tuple[float, int]:
        """One optimizer step on batch ``b`` of the epoch's ``order`` (or on the whole training set):
        LR from the schedule, gradient, clipping, step, averaging. Returns (LR, examples seen here)."""
        st, ph, run = self.stage, self.phase, self.run
        assert ph is not None
        spe = steps_per_epoch(st, self.n_train)
        factor = st.lr_schedule.factor(run.pos.epoch * spe + run.pos.batch, st.epochs * spe) * self.lr_scale
        lr = ph.set_lrs(factor)
        ph.optimizer.zero_grad(set_to_none=True)
        if st.full_batch:
            loss_sum, n = full_batch_gradient(self.model, self.n_train, st.micro_batch, self.procs,
                                              self._forward_backward)
            if hasattr(ph.optimizer, "record_loss"):  # Subgradient: keeps the best iterate, Polyak's step
                # the loss over all ranks' examples, so that every rank takes the same step
                total = self.procs.sum(torch.tensor([loss_sum, float(n)], dtype=torch.float64))
                ph.optimizer.record_loss(float(total[0] / max(1.0, float(total[1]))))
        else:
            bs = int(st.batch_size)
            assert order is not None
            idx = self.procs.shard(order[b * bs:(b + 1) * bs])
            loss_sum, n = self._batch_gradient(idx), len(idx)
        if st.grad_clip and not st.step_in_backward:  # inside backward, the hooks clip
            import oxoptim

            trained = [p for p in self.model.parameters() if p.requires_grad]
            for params in ([trained] if st.grad_clip_mode == "global" else [[p] for p in trained]):
                oxoptim.clip_grad_norm_(params, st.grad_clip)
        ph.step()
        run.global_step += 1
        run.pos.batch = b + 1
        run.running.add(loss_sum, n)
        return lr, n

    def _batch_gradient(self, idx: torch.Tensor) -> float:
        """Back-propagates the mean loss over ``idx`` (in ``accumulate`` micro-batches, each loss
        weighted by its share of the batch, DDP synchronising on the last); returns the loss sum."""
        k = self.stage.accumulate
        if k == 1:
            return self._forward_backward(self.net, idx).item() * len(idx)
        parts = [part for part in torch.tensor_split(idx, k) if len(part)]
        in_backward = self.phase.in_backward if self.phase is not None else None
        if in_backward is not None:  # a last batch smaller than k: fewer micro-batches in this step
            in_backward.accumulate = len(parts)
        total = 0.0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last else getattr(self.net, "no_sync", contextlib.nullcontext)()
            with sync:
                total += self._forward_backward(self.net, part, len(part) / len(idx)).item() * len(idx)
        return total

    def _forward_backward(self, net: nn.Module, idx: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Loss on the training examples ``idx`` times ``weight``, back-propagated (plus the
        adversarial term if the stage has one)."""
        task = self.task
        batch = task.batch(task.train, idx)

        def loss() -> torch.Tensor:
            with self.stage.mixed_precision():
                value = task.loss(task.forward(net, batch), batch)
            return value if weight == 1.0 else value * weight

        eps = self.stage.adversarial
        if not eps:
            value = loss()
            value.backward()
            return value
        assert self.adversary is not None
        self.adversary.eps = eps
        return self.adversary.forward_backward(loss, getattr(net, "no_sync", contextlib.nullcontext))

    # ----- evaluation, checkpoints, the end -------------------------------------------------

    def _evaluated_weights(self):
        return self.phase.evaluated_weights() if self.phase is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, data: Any, weights: str = "current") -> Dict[str, float]:
        """Loss and metrics over ``data`` (with the averaged weights when an averager is active
        and ``weights == "evaluated"``). Keys: ``loss`` and the metric names."""
        ctx = self._evaluated_weights() if weights == "evaluated" else contextlib.nullcontext()
        with ctx:
            return evaluate(self.task, self.model, data, self.eval_batch_size, self.procs, self.bucket > 0)

    def checkpoint(self) -> None:
        """Saves the run (never a diverged one: :class:`NonFiniteLoss` instead)."""
        self._stop_if_diverged(self.procs.sum(torch.tensor(
            [self.run.running.loss_sum, float(self.run.running.n), self._bad_weights()], dtype=torch.float64)))
        checkpoints.save(self)

    def _bad_weights(self) -> float:
        """1.0 when a trained parameter holds NaN or inf."""
        return float(any(not bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad))

    def _stop_if_diverged(self, totals: torch.Tensor, phase_label: Optional[str] = None) -> None:
        """Raises :class:`NonFiniteLoss` when the summed training loss (over the ranks) or the
        weights are not finite; ``totals`` is [loss sum, examples, ranks with bad weights], the same
        on every rank, so that every rank stops together."""
        loss = float(totals[0]) / max(1.0, float(totals[1]))
        if math.isfinite(loss) and not float(totals[2]):
            return
        pos = self.run.pos
        where = (f"stage {self.stage.name!r} epoch {pos.epoch + 1}" if pos.stage < len(self.stages)
                 else "the last stage")
        if phase_label is not None and phase_label != "main":
            where += f" ({phase_label})"
        what = (f"the training loss is {loss}" if not math.isfinite(loss) else "the weights hold NaN or inf")
        raise NonFiniteLoss(f"training diverged in {where}, by step {self.run.global_step}: {what} "
                            f"(lower the learning rate?); the run stopped before writing a summary (checkpoints from "
                            f"before the divergence are kept)")

    def summary(self) -> dict:
        run = self.run
        if self._final is not None:
            final = dict(self._final)
        else:  # before fit has finished: the last epoch's
            main = [r for r in run.history if r["phase"] == "main"]
            last = main[-1] if main else (run.history[-1] if run.history else {})
            final = {k: v for k, v in last.items() if k.startswith("val_") or k == "train_loss"}
        return {
            "plan": self.plan(),
            "epochs_run": len(run.history),
            "steps": run.global_step,
            "stopped_early": run.stopped,
            "final": final,
            "wall_time_s": round(run.elapsed, 2),
            "events": run.events,
            "threads": torch.get_num_threads(),
            "world_size": self.world,
            "missing_outputs": dict(self.progress.missing_outputs),
            **self.meta,
        }

    def param_digest(self) -> str:
        """SHA-256 of the model's state (names, dtypes, shapes and bytes): equal digests, equal weights."""
        return param_digest(self.model)

    def _final_metrics(self) -> dict:
        """Validation of the weights the run ends with (those of ``final.pt``: after a RestoreBest,
        the restored ones, not the last epoch's), as ``val_<name>``; with the ``train_loss`` and
        ``global_epoch`` of the epoch record that scored exactly these values, if there is one."""
        if not self.run.history:
            return {}
        final = {f"val_{k}": v for k, v in self.evaluate(self.task.val).items()}
        for record in reversed(self.run.history):
            if all(record.get(k) == v for k, v in final.items()):
                final.update(train_loss=record["train_loss"], global_epoch=record["global_epoch"])
                break
        return final

    def _finish(self) -> None:
        if self.procs.distributed:  # every rank must hold the same weights; the summary records it
            self.meta.update(self.procs.agreement(self.model))
        self._final = self._final_metrics()
        self.progress.write_final(self.model, self.run.history)
        self.write_summary()

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        s = self.summary()
        s.update(extra or {})
        self.progress.write_summary(s)
        return s
