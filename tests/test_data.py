import json
import os

import pytest
import torch
from conftest import C4_VALIDATION, WIKITEXT_TEST
from tiny_data import BOS_ID, word_tokenizer, write_jsonl
from tiny_models import tiny_corpus, tiny_tokenizer

from proxsparse_hf.data import (
    C4_EVAL_DOCS,
    CALIBRATION_DOCS,
    DocumentRange,
    TokenWindows,
    check_no_overlap,
    iter_texts,
    iter_token_windows,
    load_calibration_data,
    load_texts,
    resolve_document_range,
    tokenize_windows,
    wants_bos,
)


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


# ----------------------------------------------------------------------------------------------------------- BOS
def test_wants_bos_follows_what_the_tokenizer_adds():
    from transformers import PreTrainedTokenizerFast

    assert not wants_bos(tiny_tokenizer())  # no BOS token at all
    assert not wants_bos(word_tokenizer(add_bos=False))  # a BOS token that encodings do not start with
    assert wants_bos(word_tokenizer(add_bos=True))  # a post-processor that prepends it
    flagged = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(False).backend_tokenizer, bos_token="<s>")
    flagged.add_bos_token = True  # what `add_bos_token: true` in tokenizer_config.json / GGUF metadata does
    assert flagged("w0")["input_ids"][0] == BOS_ID and wants_bos(flagged)


def test_bos_windows_are_bos_plus_seq_len_minus_one_tokens():
    texts = ["w1 w2 w3", "w4 w5"]  # ids 3 4 5 | 6 7
    tok = word_tokenizer(add_bos=True)
    assert tokenize_windows(texts, tok, 3).tolist() == [[BOS_ID, 3, 4], [BOS_ID, 5, 6]]  # 7 is the remainder
    assert tokenize_windows(texts, tok, 3, bos=False).tolist() == [[3, 4, 5]]
    forced = tokenize_windows(texts, word_tokenizer(add_bos=False), 3, bos=True)
    assert forced.tolist() == [[BOS_ID, 3, 4], [BOS_ID, 5, 6]]
    with pytest.raises(ValueError, match=r"`n_samples`=3 windows of 3 tokens requested but the text yields only 2"):
        tokenize_windows(texts, tok, 3, 3)
    with pytest.raises(ValueError, match=r"5 tokens, fewer than one window of `seq_len`=7 \(6 text tokens after BOS"):
        tokenize_windows(texts, tok, 7)
    with pytest.raises(ValueError, match=r"`bos`=True but the tokenizer has no `bos_token_id`"):
        tokenize_windows(texts, tiny_tokenizer(), 3, bos=True)
    with pytest.raises(ValueError, match=r"`bos`='yes' is invalid"):
        tokenize_windows(texts, tok, 3, bos="yes")
    with pytest.raises(ValueError, match=r"`bos`=1 is invalid"):
        TokenWindows(torch.zeros(1, 4, dtype=torch.long), bos=1)


@pytest.mark.parametrize("add_bos", [False, True])
def test_calibration_windows_record_bos(tmp_path, add_bos):
    path = write_jsonl(tmp_path / "c.jsonl", tiny_corpus(30))
    tok = word_tokenizer(add_bos)
    data = load_calibration_data(path, tok, seq_len=16, n_samples=8, seed=1)
    assert data.bos is add_bos and not data.streaming
    assert bool((data.input_ids[:, 0] == BOS_ID).all()) is add_bos
    off = load_calibration_data(path, tok, seq_len=16, n_samples=8, seed=1, bos=False)
    assert off.bos is False and not bool((off.input_ids[:, 0] == BOS_ID).any())
    if add_bos:  # the same shuffled token stream, cut 15 + BOS instead of 16
        stream = off.input_ids.flatten()
        assert torch.equal(data.input_ids[:, 1:].flatten(), stream[: 8 * 15])


def test_calibration_without_bos_is_the_old_code_path(tmp_path):
    import random

    docs = tiny_corpus(30)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    tok = word_tokenizer(add_bos=False)
    shuffled = list(docs)
    random.Random(3).shuffle(shuffled)
    old = tok("\n\n".join(shuffled), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    data = load_calibration_data(path, tok, seq_len=16, n_samples=8, seed=3)
    assert data.bos is False and torch.equal(data.input_ids, old[: 8 * 16].reshape(8, 16))


# ----------------------------------------------------------------------------------------------------- streaming
def test_iter_token_windows_match_tokenize_windows():
    docs = tiny_corpus(12, words_per_doc=25)
    for add_bos in (False, True):
        tok = word_tokenizer(add_bos)
        expected = tokenize_windows(docs, tok, 16)
        for chunk_chars in (1 << 20, 1, 200):  # one chunk; one document per chunk; a few documents per chunk
            got = torch.stack(list(iter_token_windows(docs, tok, 16, chunk_chars=chunk_chars)))
            assert torch.equal(got, expected), (add_bos, chunk_chars)
    with pytest.raises(ValueError, match="`chunk_chars`=0"):
        next(iter_token_windows(docs, tok, 16, chunk_chars=0))


def test_xz_corpus_is_read_in_streaming_mode(tmp_path, monkeypatch):
    import datasets

    docs = tiny_corpus(40)
    plain = write_jsonl(tmp_path / "c.jsonl", docs, title="t")
    packed = write_jsonl(tmp_path / "c.jsonl.xz", docs, xz=True, title="t")
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, type(result).__name__))
        return result

    monkeypatch.setattr(datasets, "load_dataset", spy)
    it = iter_texts(packed, start=5, stop=8)
    assert list(it) == docs[5:8]
    assert calls == [(("json",), {"data_files": packed, "split": "train", "streaming": True}, "IterableDataset")]
    assert load_texts(packed) == load_texts(plain) == docs

    # a compressed file is streamed by default: documents read lazily, only as many as the windows need
    import proxsparse_hf.data.windows as data_mod

    consumed = []
    original = data_mod.iter_texts

    def counting(*args, **kwargs):
        for text in original(*args, **kwargs):
            consumed.append(text)
            yield text

    monkeypatch.setattr(data_mod, "iter_texts", counting)
    tok = tiny_tokenizer()
    streamed = load_calibration_data(packed, tok, seq_len=16, n_samples=4, shuffle_buffer=1, chunk_chars=100)
    assert streamed.streaming and streamed.bos is False
    assert len(consumed) <= 17  # 4 x 16 tokens need 2 documents of 60 words; one call tokenizes 16 chunks
    # with a one-document buffer the stream keeps file order: the windows are the first windows of the corpus
    assert torch.equal(streamed.input_ids, tokenize_windows(docs, tok, 16, 4))
    shuffled = load_calibration_data(packed, tok, seq_len=16, n_samples=4, seed=1)
    again = load_calibration_data(packed, tok, seq_len=16, n_samples=4, seed=1)
    assert torch.equal(shuffled.input_ids, again.input_ids) and not torch.equal(shuffled.input_ids, streamed.input_ids)
    # forcing the in-memory path on the compressed file gives the windows of the uncompressed one
    whole = load_calibration_data(packed, tok, seq_len=16, n_samples=4, seed=2, streaming=False)
    assert not whole.streaming
    assert torch.equal(whole.input_ids, load_calibration_data(plain, tok, seq_len=16, n_samples=4, seed=2).input_ids)
    with pytest.raises(ValueError, match="requested but the text yields only"):
        load_calibration_data(packed, tok, seq_len=16, n_samples=10_000)


def test_buffered_shuffle_is_a_seeded_permutation():
    from proxsparse_hf.data import _buffered_shuffle

    items = list(range(100))
    a = list(_buffered_shuffle(items, 10, seed=0))
    assert sorted(a) == items and a != items and a == list(_buffered_shuffle(items, 10, seed=0))
    assert list(_buffered_shuffle(items, 1, seed=0)) == items
    assert list(_buffered_shuffle(items, 10, seed=1)) != a


def test_unreadable_compressed_file_is_one_clear_error(tmp_path):
    (tmp_path / "bad.jsonl.xz").write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.xz: cannot be read as JSON records"):
        load_texts(tmp_path / "bad.jsonl.xz")


# --------------------------------------------------------------------------------------- document ranges, overlap
def test_c4_sample_calibration_defaults_to_its_calibration_documents():
    for source in ("c4", C4_VALIDATION, os.path.dirname(C4_VALIDATION)):
        docs = resolve_document_range(source, purpose="calibration")
        assert (docs.start, docs.stop, docs.corpus) == (0, 1000, "c4"), source
    assert resolve_document_range("c4", 200, purpose="calibration").stop == 1000
    assert resolve_document_range("c4", purpose="evaluation").start == 1000
    assert resolve_document_range("C4", purpose="evaluation").stop == 2000
    assert CALIBRATION_DOCS == (0, 1000) and C4_EVAL_DOCS == (1000, 2000)
    data = load_calibration_data(C4_VALIDATION, tiny_tokenizer(), seq_len=32, n_samples=2)
    assert (data.documents.start, data.documents.stop) == (0, 1000)


@pytest.mark.parametrize(
    "source,start,stop,match",
    [
        (
            "c4",
            0,
            2000,
            r"Calibration documents \[0, 2000\) of .*c4_validation_2k\.jsonl overlap documents "
            r"\[1000, 2000\) reserved for c4 evaluation; calibrate on documents within \[0, 1000\)",
        ),
        (C4_VALIDATION, 1500, None, r"documents \[1500, end\) .* overlap documents \[1000, 2000\) reserved"),
        ("wikitext2", 0, None, "wikitext2 is an evaluation set"),
        (WIKITEXT_TEST, 10, 20, r"documents \[10, 20\) .* reserved for wikitext2 evaluation"),
    ],
)
def test_calibration_on_evaluation_documents_is_refused(source, start, stop, match):
    with pytest.raises(ValueError, match=match):
        resolve_document_range(source, start, stop, purpose="calibration")
    with pytest.raises(ValueError, match=match):
        load_calibration_data(source, tiny_tokenizer(), seq_len=8, n_samples=1, start=start, stop=stop)


def test_a_copy_of_the_c4_sample_is_recognised_by_name(tmp_path):
    path = write_jsonl(tmp_path / "c4_validation_2k.jsonl", tiny_corpus(2000, words_per_doc=3))
    assert resolve_document_range(path, purpose="calibration").stop == 1000
    with pytest.raises(ValueError, match="reserved for c4 evaluation"):
        resolve_document_range(path, 0, 1001, purpose="calibration")


def test_check_no_overlap(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = write_jsonl(tmp_path / "b.jsonl", ["x"])
    check_no_overlap(DocumentRange(a, 0, 10), DocumentRange(a, 10, 20))
    check_no_overlap(DocumentRange(a, 0, 10), DocumentRange(b, 0, 10))
    with pytest.raises(
        ValueError,
        match=r"Calibration documents \[0, 10\) of .*a\.jsonl overlap the evaluation "
        r"documents \[5, end\)",
    ):
        check_no_overlap(DocumentRange(a, 0, 10), DocumentRange(a, 5))
    hub = DocumentRange("org/ds", 0, 100, split="train")
    check_no_overlap(hub, DocumentRange("org/ds", 0, 100, split="test"))
    with pytest.raises(ValueError, match=r"org/ds \(default, split train\)"):
        check_no_overlap(hub, DocumentRange("org/ds", 50, 60, split="train"))
    # the local C4 sample and its Hub split are the same documents
    local = resolve_document_range("c4", purpose="calibration")
    assert local.to_dict() == {
        "source": C4_VALIDATION,
        "split": None,
        "name": None,
        "documents": [0, 1000],
        "corpus": "c4",
    }
    check_no_overlap(local, DocumentRange("allenai/c4", 1000, 2000, "validation", "en", "c4"))
    with pytest.raises(ValueError, match="overlap"):
        check_no_overlap(local, DocumentRange("allenai/c4", 500, 2000, "validation", "en", "c4"))
    with pytest.raises(ValueError, match="`purpose`='training'"):
        resolve_document_range(a, purpose="training")
    with pytest.raises(ValueError, match="`start`=-1"):
        resolve_document_range(a, -1, purpose="calibration")


def test_hub_fallback_without_local_copies(monkeypatch):
    import proxsparse_hf.data.corpora as data_mod

    monkeypatch.setattr(data_mod, "find_assets_dir", lambda: None)
    calib = resolve_document_range("c4", purpose="calibration")
    assert (calib.source, calib.name, calib.split, calib.start, calib.stop) == ("allenai/c4", "en", "train", 0, None)
    evaluation = resolve_document_range("c4", purpose="evaluation")
    assert (evaluation.split, evaluation.start, evaluation.stop) == ("validation", 1000, 2000)
    check_no_overlap(calib, evaluation)  # different splits
    with pytest.raises(ValueError, match=r"reserved for c4 evaluation"):
        resolve_document_range("allenai/c4", 0, 1500, purpose="calibration", split="validation", name="en")
    with pytest.raises(ValueError, match=r"Corpus 'enwiki' has no local copy"):
        resolve_document_range("enwiki", purpose="calibration")


def test_enwiki_sample_streams():
    docs = resolve_document_range("enwiki", purpose="calibration")
    assert docs.corpus == "enwiki" and docs.source.endswith("enwiki_sample.jsonl.xz") and docs.stop is None
    first = list(iter_texts(docs.source, stop=3))
    assert len(first) == 3 and all(len(t) > 200 for t in first)
