import json

import pytest
import torch
from conftest import C4_VALIDATION, WIKITEXT_TEST
from tiny_models import tiny_corpus, tiny_tokenizer

from proxsparse_hf.data import TokenWindows, load_calibration_data, load_texts, tokenize_windows


def test_load_jsonl_txt_dir_and_ranges(tmp_path):
    docs = tiny_corpus(10)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "b.txt").write_text("w1 w2 w3")
    assert load_texts(tmp_path / "a.jsonl") == docs
    assert load_texts(tmp_path / "a.jsonl", start=2, stop=5) == docs[2:5]
    assert load_texts(tmp_path / "b.txt") == ["w1 w2 w3"]
    assert load_texts(tmp_path) == docs + ["w1 w2 w3"]


def test_load_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"record 0 has no `text_field`='text'"):
        load_texts(tmp_path / "a.jsonl")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="Unsupported file"):
        load_texts(tmp_path / "a.csv")
    (tmp_path / "e.txt").write_text("   ")
    with pytest.raises(ValueError, match="No text found"):
        load_texts(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="empty or negative"):
        load_texts(tmp_path / "e.txt", start=3, stop=3)
    with pytest.raises(ValueError, match="not a local file/directory"):
        load_texts(str(tmp_path / "missing" / "x"))


def test_windows_exact_and_errors():
    tok = tiny_tokenizer()
    texts = ["w1 w2 w3", "w4 w5"]
    ids = tokenize_windows(texts, tok, 2)
    # "w1 w2 w3\n\nw4 w5" -> 5 tokens -> 2 windows of 2, remainder dropped
    assert ids.tolist() == [[3, 4], [5, 6]]
    with pytest.raises(ValueError, match="fewer than one window"):
        tokenize_windows(texts, tok, 64)
    with pytest.raises(ValueError, match=r"`n_samples`=5 windows of 2 tokens requested but the text yields only 2"):
        tokenize_windows(texts, tok, 2, 5)
    with pytest.raises(ValueError, match="`seq_len`=1"):
        tokenize_windows(texts, tok, 1)
    with pytest.raises(ValueError, match="non-empty"):
        TokenWindows(torch.zeros(0, 4, dtype=torch.long))


def test_calibration_is_deterministic(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in tiny_corpus(30)))
    tok = tiny_tokenizer()
    a = load_calibration_data(tmp_path / "c.jsonl", tok, seq_len=16, n_samples=8, seed=1)
    b = load_calibration_data(tmp_path / "c.jsonl", tok, seq_len=16, n_samples=8, seed=1)
    c = load_calibration_data(tmp_path / "c.jsonl", tok, seq_len=16, n_samples=8, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    item = a[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"} and torch.equal(item["labels"], item["input_ids"])
    assert len(a) == 8 and a.seq_len == 16 and a.num_tokens == 128


def test_shared_corpora_are_readable():
    assert len(load_texts(WIKITEXT_TEST)) == 4358
    c4 = load_texts(C4_VALIDATION, start=0, stop=1000)
    assert len(c4) == 1000 and len(load_texts(C4_VALIDATION, start=1000, stop=2000)) == 1000
