"""Checkpoints of a run: what the trainer saves (format version 2) and how a resumed run takes it back.

Data order, every rank's random state and all optimizer, averager and rule state are saved, so a
run resumed after an interruption (even ``kill -9``) ends with the same parameters, bit for bit, as
an uninterrupted one with the same thread and process counts.
"""

from __future__ import annotations

import random
import sys
from typing import TYPE_CHECKING, List

import torch

from . import checkpoint as ckpt
from .state import Position, RunningLoss, RunState, StageState

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["save", "resume"]

VERSION = 2


def _rank_state(t: "Trainer") -> dict:
    """What differs between ranks: random states (dropout draws depend on each shard's shapes) and
    the epoch's running loss over the rank's shard."""
    running = {"loss_sum": t.run.running.loss_sum, "n": t.run.running.n}
    return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "acc": running}


def _snapshot(t: "Trainer", ranks: List[dict]) -> dict:
    run = t.run
    in_plan = run.pos.stage < len(t.stages)
    return {
        "version": VERSION,
        "pos": {"stage": run.pos.stage, "trial": run.pos.trial, "epoch": run.pos.epoch, "batch": run.pos.batch},
        "global_step": run.global_step,
        "epoch_counter": run.epoch_counter,
        "model": t.model.state_dict(),
        "phase": t.phase.state_dict() if t.phase is not None else None,
        "stage_state": run.stage.to_dict([r.state_dict() for r in t.stage.adjust] if in_plan else []),
        "history": list(run.history),
        "events": list(run.events),
        "stopped": run.stopped,
        "carried_optimizer": run.carried,
        "elapsed": t.elapsed_now(),
        "ranks": ranks,
        "plan": t.plan(),
        "settings": [st.settings() for st in t.stages],
        "meta": t.meta,
    }


def save(t: "Trainer") -> None:
    """Writes a checkpoint of the run (rank 0 gathers every rank's random state)."""
    if not t.run_dir:
        return
    ranks = t.procs.gather_on_main(_rank_state(t))
    if ranks is not None:  # rank 0
        ckpt.save_checkpoint(t.run_dir, t.run.global_step, _snapshot(t, ranks), keep=t.keep_checkpoints)
    t.procs.barrier()


def resume(t: "Trainer") -> bool:
    """Puts the run back as of its last good checkpoint; False when there is none."""
    if not t.run_dir:
        raise ValueError("resume needs a run_dir")
    if t.progress.writes:  # what a process killed while writing a checkpoint left behind
        ckpt.remove_stale_temp_files(t.run_dir)
    found = ckpt.latest_good_checkpoint(t.run_dir, warn=lambda m: print(m, file=sys.stderr, flush=True))
    if found is None:
        t.progress.say(f"no checkpoint in {t.run_dir}: starting from scratch")
        return False
    path, s = found
    if s.get("plan") != t.plan():
        raise ckpt.CheckpointError(f"{path} was written for a different plan: {s.get('plan')}")
    # Checkpoints from before the full settings were saved have none: they resume as they did.
    settings = s.get("settings")
    if settings is not None and settings != [st.settings() for st in t.stages]:
        i = next(i for i, (a, b) in enumerate(zip(settings, [st.settings() for st in t.stages])) if a != b)
        raise ckpt.CheckpointError(f"{path} was written for other settings of stage {t.stages[i].name!r}: "
                                   f"{settings[i]}; now {t.stages[i].settings()}")
    saved_job, job = (s.get("meta") or {}).get("job"), t.meta.get("job")
    if saved_job is not None and job is not None and saved_job != job:
        changed = sorted(k for k in set(saved_job) | set(job) if saved_job.get(k) != job.get(k))
        raise ckpt.CheckpointError(f"{path} was written for another job: {', '.join(changed)} changed since the run "
                                   f"started (the run's config.json edited?); restore it to resume, or start a new run")
    # Runs from before data fingerprints were saved have none: they resume as they did.
    saved, now = (s.get("meta") or {}).get("data_fingerprint"), t.meta.get("data_fingerprint")
    if saved is not None and now is not None and saved != now:
        raise ckpt.CheckpointError(
            f"{path} was trained on other data: the data files (or what is loaded from them: splits, "
            f"vocabulary, labels) changed since the run started (fingerprint {saved[:12]}, now {now[:12]}); "
            f"restore them to resume, or start a new run")
    # Version 1 checkpoints hold one process's state (rank 0's).
    ranks = s["ranks"] if "ranks" in s else [{"rng": s["rng"], "acc": s["acc"]}]
    if len(ranks) != t.procs.world:
        raise ckpt.CheckpointError(
            f"{path} holds the state of {len(ranks)} process(es), this run has {t.procs.world}: resume with "
            f"the same count (torchrun --nproc-per-node {len(ranks)}) to continue exactly")
    mine = ranks[t.procs.rank]
    stage_state = dict(s["stage_state"])
    rules_state = stage_state.pop("rules")
    t.run = RunState(pos=Position(**s["pos"]), stage=StageState.from_dict(stage_state),
                     global_step=s["global_step"], epoch_counter=s["epoch_counter"],
                     running=RunningLoss(**mine["acc"]), history=list(s["history"]), events=list(s["events"]),
                     stopped=s["stopped"], elapsed=s["elapsed"], carried=s.get("carried_optimizer"))
    # The model's dtype is that of the last stage begun that set one (a stage without param_dtype
    # leaves it); a phase rebuilt below sets it again, but none is rebuilt at a stage boundary or
    # after the plan's end, so it is set here, before the weights are loaded into the model.
    begun = t.stages[:t.run.pos.stage + (1 if t.run.stage.started else 0)]
    ran = [r["stage_index"] for r in t.run.history if isinstance(r, dict) and "stage_index" in r]
    if t.run.stopped and ran:  # a rule stopped the run: the position is past stages that never began
        begun = t.stages[:max(ran) + 1]
    t.set_param_dtype(next((st.param_dtype for st in reversed(begun) if st.param_dtype), None))
    t.load_model_state(s["model"])
    if t.run.pos.stage < len(t.stages):
        for r, rs in zip(t.stage.adjust, rules_state):
            r.load_state_dict(rs)
        t.phase = t.load_phase(s["phase"]) if s["phase"] is not None else None
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(mine["rng"]["python"])
    t.progress.rewrite_records(t.run.history)
    p = t.run.pos
    t.progress.say(f"resumed from {path} (stage {p.stage + 1}, epoch {p.epoch + 1}, batch {p.batch}, "
                   f"step {t.run.global_step})")
    return True


