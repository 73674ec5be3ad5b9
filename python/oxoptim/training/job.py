"""The jobs ``oxoptim train`` and ``oxoptim tune`` run: data → model → stages → Trainer → summary.

One function per call of a job, shared by the CLI, the search (which passes ``on_record`` to see
every validation record, ``evaluate_test=False`` so that the test split is never seen, and
``fold`` for cross-validation) and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Optional, Tuple

from .errors import ConfigError

__all__ = ["run_job", "load_data", "OnRecord"]

OnRecord = Callable[[dict], None]


def load_data(cfg: dict, fold: Optional[Tuple[int, int]] = None) -> dict:
    """The classification job's data as it trains on it (``fold``: as :func:`run_job`), checked
    as it checks it: the users' files' problems (a missing column, a bad line) and a split left
    empty are :class:`ConfigError` (``oxoptim tune`` checks a plan's data with it at start-up)."""
    from .data import build_text_data, cv_fold

    d = cfg["data"]
    try:
        data = build_text_data(
            train=d.get("train"), val=d.get("val"), test=d.get("test"),
            text_column=d.get("text_column", "text"), label_column=d.get("label_column", "label"),
            max_len=int(d.get("max_len", 100)), split=tuple(d.get("split", (0.8, 0.1, 0.1))),
            seed=int(d.get("split_seed", 0)), min_freq=int(d.get("min_freq", 1)),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"[data] {e}") from e
    if fold is not None:
        data = cv_fold(data, *fold, seed=int(d.get("split_seed", 0)), max_len=int(d.get("max_len", 100)),
                       min_freq=int(d.get("min_freq", 1)))
    wanted = ("train", "val") + (("test",) if "val" not in d and len(d.get("split", (0.8, 0.1, 0.1))) == 3 else ())
    for split in wanted:
        if data[split] is None or len(data[split]) == 0:
            raise ConfigError(f"[data] no {split} texts left after the split and cleaning (removed: "
                              f"{data['report']['removed']})")
    return data


#: Job keys that may change between a run and its resume: they change no result.
OPERATIONAL_KEYS = ("threads", "checkpoint_every")


def resumable_job(cfg: dict) -> dict:
    """The job as a checkpoint records it (JSON values), less :data:`OPERATIONAL_KEYS`: a resume
    refuses a job that differs (an edited config.json)."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}, default=str))


def run_job(cfg: dict, run_dir: str, resume: bool = False, quiet: bool = False, *,
            on_record: Optional[OnRecord] = None, evaluate_test: bool = True,
            fold: Optional[Tuple[int, int]] = None, announce: bool = True) -> Optional[dict]:
    """Builds data, model and stages from ``cfg``, trains, evaluates on the test split; returns the summary.

    ``on_record(record)`` is called after every validation (it may raise to end the run: a pruned
    trial); ``evaluate_test=False`` leaves the test split unseen; ``fold=(k, i)`` trains on the
    training split less its i-th of k folds and validates on that fold (the validation split is
    not used); ``announce=False`` leaves out the closing line (a search prints its own)."""
    if cfg.get("job") == "language_model":
        from .lm_job import run_lm_job

        if fold is not None:
            raise ConfigError("cross-validation folds are for classification jobs, not the language-model job")
        return run_lm_job(cfg, run_dir, resume=resume, quiet=quiet, on_record=on_record,
                          evaluate_test=evaluate_test, announce=announce)
    import torch
    import torch.nn.functional as F

    from .checkpoint import atomic_write_bytes
    from .progress import Progress, hold_run_dir
    from .config import check_embed_init, stage_from_dict
    from .data import data_fingerprint
    from .model import BiGRUClassifier
    from .trainer import Trainer

    import torch.distributed as tdist

    distributed = tdist.is_available() and tdist.is_initialized()
    rank = tdist.get_rank() if distributed else 0
    world = tdist.get_world_size() if distributed else 1
    t_start = time.time()
    if not cfg.get("threads"):
        cfg["threads"] = 1
    torch.set_num_threads(int(cfg["threads"]))
    d = cfg["data"]
    data = load_data(cfg, fold)
    say = (lambda *a: None) if (quiet or rank != 0) else (lambda *a: print(*a, flush=True))
    removed = {k: n for k, n in data["report"]["removed"].items() if n}
    say(f"data: {len(data['train'])} train / {len(data['val'])} val / "
        f"{len(data['test']) if data['test'] is not None else 0} test, vocabulary {len(data['vocab'])}, "
        f"{data['num_classes']} classes; {cfg['threads']} thread(s) x {world} process(es); run dir {run_dir}")
    if removed:
        say("data: removed " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in removed.items())
            + " (counts in summary.json)")
    torch.manual_seed(int(cfg["seed"]))
    model_cfg = dict(cfg.get("model", {}))
    embed_init = check_embed_init(str(model_cfg.pop("embed_init", "random")))
    window = int(model_cfg.pop("embed_init_window", 2))
    model = BiGRUClassifier(len(data["vocab"]), data["num_classes"], **model_cfg)
    # Built as in a fresh run even when resuming: a checkpoint then replaces the weights, and a run
    # killed before its first checkpoint starts afresh from exactly this model.
    if embed_init == "cooccurrence":
        from .embeddings import init_embedding_

        t0 = time.time()
        n = init_embedding_(model.embed, data["train"].x, window=window)
        say(f"embeddings: {n} of {len(data['vocab'])} rows from training-split co-occurrence "
            f"(PPMI, window {window}) in {time.time() - t0:.1f}s")
    stages = [stage_from_dict(s, i + 1) for i, s in enumerate(cfg["stages"])]
    smoothing = float(cfg.get("label_smoothing", 0.0))
    loss_fn = F.cross_entropy
    if smoothing:
        import functools

        loss_fn = functools.partial(F.cross_entropy, label_smoothing=smoothing)
    try:  # checks that need the data (batch sizes under torchrun) are configuration errors too
        trainer = Trainer(
            model, loss_fn, data["train"], data["val"], stages, metrics=["accuracy"], run_dir=run_dir,
            seed=int(cfg["seed"]), checkpoint_every=int(cfg.get("checkpoint_every", 100)),
            eval_batch_size=int(cfg.get("eval_batch_size", 512)), quiet=quiet, bucket=int(d.get("bucket", 0)),
            on_record=on_record, meta={"data_fingerprint": data_fingerprint(data), "job": resumable_job(cfg)},
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # Every check has passed: only now is anything written (a refused job leaves the directory as it was).
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot make the run directory {run_dir}: {e.strerror or e}") from None
    # Held from the first write to the last: another process there is refused before it writes.
    with hold_run_dir(run_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and not resume:  # an earlier run's outputs (--overwrite) go before the new config.json
            Progress(run_dir, is_main=True, quiet=True).start_fresh()
            atomic_write_bytes(os.path.join(run_dir, "config.json"), (json.dumps(cfg, indent=2) + "\n").encode())
        trainer.fit(resume=resume)
        extra = {"data": data["report"], "val": trainer.evaluate(data["val"])}
        if fold is not None:
            extra["fold"] = list(fold)
        if data["test"] is not None and evaluate_test:
            extra["test"] = trainer.evaluate(data["test"])
        extra["total_wall_time_s"] = round(time.time() - t_start, 2)
        summary = trainer.write_summary(extra)
        if rank == 0 and announce:
            v = extra["val"]
            line = f"final validation accuracy {v['accuracy']:.4f} (loss {v['loss']:.4f})"
            if "test" in extra:
                line = (f"test accuracy {extra['test']['accuracy']:.4f} (loss {extra['test']['loss']:.4f}); " + line)
            print(line + f"; training {summary['wall_time_s']:.0f}s, this process {extra['total_wall_time_s']:.0f}s; "
                  f"outputs in {run_dir}", flush=True)
        return summary

