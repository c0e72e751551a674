"""Evaluation: perplexity protocol, EvalResults schema, zero-shot through lm-eval on local task files, the bar chart."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from conftest import SHARED, WIKITEXT_TEST
from tiny_models import tiny_model

from proxsparse_hf.evaluation import (
    EvalResults,
    evaluate_model,
    evaluate_perplexity,
    perplexity,
    resolve_dataset,
    sparsity_totals,
    zeroshot_eval,
)
from proxsparse_hf.evaluation.perplexity import C4_EVAL_DOCS, CALIBRATION_DOCS

ZEROSHOT_DIR = os.path.join(SHARED, "assets", "data", "zeroshot", "llm-foundry")
BYTE_VOCAB = 257  # 256 byte symbols + <eos>


def byte_tokenizer():
    """A byte-level tokenizer (no merges, ids 0..255 + <eos>=256) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def byte_model(family: str = "llama", **kwargs):
    return tiny_model(family, vocab=BYTE_VOCAB, hidden=32, **kwargs)


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    return str(path)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse matrices keep two of every four weights.",
    "",
    "Perplexity is the exponential of the mean negative log-likelihood.",
]


def hand_perplexity(model, tokenizer, texts, seq_len):
    """exp(mean token NLL) with explicit per-position loops."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = torch.tensor(ids[w * seq_len : (w + 1) * seq_len]).unsqueeze(0)
            logits = model(window).logits[0]
            for t in range(seq_len - 1):
                log_probs = torch.log_softmax(logits[t].double(), dim=-1)
                total -= float(log_probs[window[0, t + 1]])
                count += 1
    return math.exp(total / count), n_windows, count


# ------------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_equals_exp_mean_token_nll_by_hand(tmp_path):
    model, tokenizer = byte_model(), byte_tokenizer()
    path = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    expected, n_windows, n_tokens = hand_perplexity(model, tokenizer, CORPUS, seq_len=24)
    result = perplexity(model, tokenizer, path, seq_len=24, batch_size=3, show_progress=False)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    assert (result["num_windows"], result["num_tokens"], result["seq_len"]) == (n_windows, n_tokens, 24)
    total_chars = len("\n\n".join(CORPUS))
    assert n_windows == total_chars // 24  # the remainder is dropped
    # batch size does not change the result; max_windows keeps the first windows
    single = perplexity(model, tokenizer, path, seq_len=24, batch_size=1, show_progress=False)
    assert single["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    first = perplexity(model, tokenizer, path, seq_len=24, max_windows=2, show_progress=False)
    assert first["num_windows"] == 2 and first["num_tokens"] == 2 * 23


def test_perplexity_default_seq_len_is_model_limit_capped(tmp_path):
    model, tokenizer = byte_model(), byte_tokenizer()
    path = write_jsonl(tmp_path / "long.jsonl", ["abcdefgh " * 300])
    assert perplexity(model, tokenizer, path, max_windows=1, show_progress=False)["seq_len"] == 256
    model.config.max_position_embeddings = 100_000
    assert perplexity(model, tokenizer, path, max_windows=1, show_progress=False)["seq_len"] == 2048


def test_perplexity_on_local_wikitext2():
    model, tokenizer = byte_model(), byte_tokenizer()
    spec = resolve_dataset("wikitext2")
    assert spec.source == os.path.abspath(WIKITEXT_TEST)
    results = evaluate_perplexity(model, tokenizer, ["wikitext2"], seq_len=64, max_windows=2, show_progress=False)
    assert list(results) == ["wikitext2"]
    assert results["wikitext2"]["num_windows"] == 2 and math.isfinite(results["wikitext2"]["ppl"])


def test_c4_eval_documents_never_overlap_calibration():
    spec = resolve_dataset("c4")
    assert (spec.start, spec.stop) == C4_EVAL_DOCS == (1000, 2000)
    assert CALIBRATION_DOCS[1] <= spec.start


def test_perplexity_seq_len_above_model_limit(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    with pytest.raises(ValueError, match=r"`seq_len`=512 exceeds the model's maximum sequence length \(256\)"):
        perplexity(byte_model(), byte_tokenizer(), path, seq_len=512)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1}, r"`seq_len`=1 is invalid"),
        ({"batch_size": 0}, r"`batch_size`=0 is invalid"),
        ({"max_windows": 0}, r"`max_windows`=0 is invalid"),
    ],
)
def test_perplexity_bad_options(tmp_path, kwargs, match):
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    with pytest.raises(ValueError, match=match):
        perplexity(byte_model(), byte_tokenizer(), path, **kwargs)


def test_perplexity_empty_or_short_dataset(tmp_path):
    model, tokenizer = byte_model(), byte_tokenizer()
    with pytest.raises(ValueError, match=r"No text found"):
        perplexity(model, tokenizer, write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), seq_len=16)
    with pytest.raises(ValueError, match=r"fewer than one window of `seq_len`=64"):
        perplexity(model, tokenizer, write_jsonl(tmp_path / "short.jsonl", ["tiny"]), seq_len=64)
    with pytest.raises(ValueError, match=r"`datasets` is empty"):
        evaluate_perplexity(model, tokenizer, [])


# ------------------------------------------------------------------------------------------------------ EvalResults
def full_results() -> EvalResults:
    return EvalResults(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision="abc123",
        method="sparsegpt",
        method_config={"update_weights": False, "calibration": {"n_samples": 128, "seq_len": 512}},
        perplexity={
            "wikitext2": {
                "ppl": 88.0,
                "nll": math.log(88.0),
                "num_tokens": 16 * 1023,
                "num_windows": 16,
                "seq_len": 1024,
                "source": "wikitext",
                "split": "test",
                "documents": [0, None],
            }
        },
        zeroshot={"piqa": {"acc": 0.6, "acc_norm": 0.61, "num_samples": 100}, "boolq": {"acc": 0.5}},
        sparsity={"target_sparsity": 0.5, "all_2to4": True},
        hardware={"gpu": None},
        versions={"torch": torch.__version__},
        wall_time_s=12.5,
    )


def test_eval_results_round_trip(tmp_path):
    results = full_results()
    assert results.zeroshot_mean == pytest.approx(0.55)
    assert results.label == "sparsegpt-mask" and results.ppl("wikitext2") == 88.0 and results.ppl("c4") is None
    assert EvalResults.from_dict(json.loads(json.dumps(results.to_dict()))) == results
    path = results.save(tmp_path)
    assert os.path.basename(path) == "eval_results.json"
    assert EvalResults.load(tmp_path) == results
    assert EvalResults.load(results.save(tmp_path / "r.json")) == results


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, r"Unknown EvalResults key\(s\) \['extra'\]"),
        ({"method": "obs"}, r"`method`='obs' is invalid"),
        ({"model": ""}, r"`model`='' is invalid"),
        ({"perplexity": {"wikitext2": {"ppl": 3.0}}}, r"missing keys \['nll', 'num_tokens'"),
        (
            {"perplexity": {"w": {"ppl": 1, "nll": 0, "num_tokens": 1, "num_windows": 1, "seq_len": 2, "x": 1}}},
            r"unknown keys \['x'\]",
        ),
        (
            {"perplexity": {"w": {"ppl": -1, "nll": 0, "num_tokens": 1, "num_windows": 1, "seq_len": 2}}},
            r"a number >= 0",
        ),
        ({"zeroshot": {"piqa": {"acc": 1.5}}}, r"allowed: 0 <= acc <= 1"),
        ({"zeroshot_mean": 2.0}, r"`zeroshot_mean`=2.0 is invalid"),
        ({"wall_time_s": -1}, r"`wall_time_s`=-1 is invalid"),
        ({"schema_version": 99}, r"`schema_version`=99 is newer"),
        ({"hardware": []}, r"`hardware`=\[\] is invalid"),
    ],
)
def test_eval_results_validation(change, match):
    data = {**full_results().to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        EvalResults.from_dict(data)


def test_eval_results_missing_keys_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"missing the required key\(s\) \['method'\]"):
        EvalResults.from_dict({"model": "m"})
    bad = tmp_path / "eval_results.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        EvalResults.load(bad)


def test_evaluate_model_fills_the_schema(tmp_path):
    from proxsparse_hf.pruners import prune

    model, tokenizer = byte_model(), byte_tokenizer()
    prune(model, "magnitude")
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    results = evaluate_model(
        model, tokenizer, model_name="tiny", method="magnitude", datasets=[path], seq_len=16, show_progress=False
    )
    assert list(results.perplexity) == [path]
    assert results.sparsity["all_2to4"] is True and results.sparsity["target_sparsity"] == pytest.approx(0.5)
    assert results.sparsity == sparsity_totals(model)
    assert "torch" in results.versions and "platform" in results.hardware and results.wall_time_s >= 0
    assert results.zeroshot == {} and results.zeroshot_mean is None


# -------------------------------------------------------------------------------------------------------- zero-shot
@pytest.fixture(scope="module")
def small_zeroshot_dir(tmp_path_factory):
    """The first 6 examples of every local task file (keeps dataset preparation in lm-eval fast)."""
    from proxsparse_hf.evaluation import LOCAL_TASK_FILES

    folder = tmp_path_factory.mktemp("zeroshot")
    for filename in LOCAL_TASK_FILES.values():
        with open(os.path.join(ZEROSHOT_DIR, filename), encoding="utf-8") as src:
            lines = [next(src) for _ in range(6)]
        (folder / filename).write_text("".join(lines), encoding="utf-8")
    return str(folder)


def test_zeroshot_default_tasks_offline_run_local_files_and_skip_the_rest(monkeypatch, small_zeroshot_dir):
    pytest.importorskip("lm_eval")
    from proxsparse_hf.evaluation import DEFAULT_TASKS

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = byte_model(), byte_tokenizer()
    results = zeroshot_eval(model, tokenizer, limit=2, data_dir=small_zeroshot_dir, skip_unavailable=True)
    local = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa"]
    assert list(results) == local == [t for t in DEFAULT_TASKS if t not in ("hellaswag", "rte")]
    for task, entry in results.items():
        assert 0.0 <= entry["acc"] <= 1.0, task
        assert entry["num_samples"] == 2
        assert entry["source"].endswith(".jsonl") and entry["lm_eval_task"] == f"proxsparse_local_{task}"
    assert "acc_norm" in results["piqa"] and "acc_norm" not in results["boolq"]
    summary = EvalResults(model="tiny", method="dense", zeroshot=results)
    assert summary.zeroshot_mean == pytest.approx(sum(e["acc"] for e in results.values()) / len(local))


def test_zeroshot_winogrande_partial_scoring_matches_hand_computation(small_zeroshot_dir):
    pytest.importorskip("lm_eval")
    model, tokenizer = byte_model(), byte_tokenizer()
    result = zeroshot_eval(model, tokenizer, ["winogrande"], limit=4, data_dir=small_zeroshot_dir)["winogrande"]
    with open(os.path.join(ZEROSHOT_DIR, "winogrande.jsonl"), encoding="utf-8") as fh:
        docs = [json.loads(next(fh)) for _ in range(4)]
    correct = 0
    with torch.no_grad():
        for doc in docs:
            scores = []
            for context in doc["context_options"]:
                ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
                cont = tokenizer(" " + doc["continuation"], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([ctx + cont])
                log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
                scores.append(sum(float(log_probs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    assert result["acc"] == pytest.approx(correct / 4)


def test_zeroshot_unavailable_tasks_and_bad_options(monkeypatch, small_zeroshot_dir):
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    model, tokenizer = byte_model(), byte_tokenizer()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"\['hellaswag'\] have no local data and the Hub is offline"):
        zeroshot_eval(model, tokenizer, ["piqa", "hellaswag"], data_dir=ZEROSHOT_DIR)
    with pytest.raises(RuntimeError, match=r"None of the requested zero-shot tasks can be evaluated"):
        zeroshot_eval(model, tokenizer, ["hellaswag"], data_dir=ZEROSHOT_DIR, skip_unavailable=True)
    # online: a name lm-eval does not know (its task index is replaced by an empty one to keep the test fast)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    real_manager = lm_eval_tasks.TaskManager
    monkeypatch.setattr(
        lm_eval_tasks,
        "TaskManager",
        lambda include_path=None, include_defaults=True: real_manager(
            include_path=include_path, include_defaults=False
        ),
    )
    with pytest.raises(ValueError, match=r"lm-eval knows no task 'no_such_task'"):
        zeroshot_eval(model, tokenizer, ["no_such_task"], data_dir=ZEROSHOT_DIR)
    results = zeroshot_eval(
        model, tokenizer, ["openbookqa", "no_such_task"], limit=2, data_dir=small_zeroshot_dir, skip_unavailable=True
    )
    assert list(results) == ["openbookqa"]
    with pytest.raises(ValueError, match=r"`tasks` is empty"):
        zeroshot_eval(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"`limit`=0 is invalid"):
        zeroshot_eval(model, tokenizer, ["piqa"], limit=0)
    with pytest.raises(ValueError, match=r"`data_dir`='/nonexistent' is not a directory"):
        zeroshot_eval(model, tokenizer, ["piqa"], data_dir="/nonexistent")


def test_zeroshot_without_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(RuntimeError, match=r'pip install "proxsparse-hf\[eval\]"'):
        zeroshot_eval(byte_model(), byte_tokenizer(), ["piqa"])


# ------------------------------------------------------------------------------------------------------------ chart
def test_perplexity_bar_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from proxsparse_hf.evaluation.plot import plot_perplexity

    dense = EvalResults(
        model="m",
        method="dense",
        perplexity={"wikitext2": {"ppl": 22.9, "nll": 3.1, "num_tokens": 10, "num_windows": 1, "seq_len": 11}},
    )
    pruned = EvalResults.from_dict({**full_results().to_dict(), "model": "m"})
    path = plot_perplexity([dense, pruned], tmp_path / "c.png")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"No result has a perplexity on `dataset`='c4'"):
        plot_perplexity([dense], tmp_path / "d.png", dataset="c4")
    with pytest.raises(ValueError, match=r"`labels` has 1 entries for 2 results"):
        plot_perplexity([dense, pruned], tmp_path / "e.png", labels=["x"])
