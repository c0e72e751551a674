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
        model,
        tokenizer,
        model_name=str(tmp_path),
        method="magnitude",
        datasets=[path],
        seq_len=16,
        show_progress=False,
    )
    # local paths are recorded by name: the dataset file and the model folder
    assert list(results.perplexity) == ["c.jsonl"] and results.model == os.path.basename(tmp_path)
    assert str(tmp_path) not in results.to_json_string()
    assert results.sparsity["all_2to4"] is True and results.sparsity["target_sparsity"] == pytest.approx(0.5)
    assert results.sparsity == sparsity_totals(model)
    assert "torch" in results.versions and "platform" in results.hardware and results.wall_time_s >= 0
    assert results.zeroshot == {} and results.zeroshot_mean is None
    assert results.settings == {
        "datasets": ["c.jsonl"],
        "seq_len": 16,
        "batch_size": 1,
        "max_windows": None,
        "bos": False,
    }
    assert results.perplexity["c.jsonl"]["bos"] is False  # the byte tokenizer adds no BOS token


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
def _ppl_entry(value: float) -> dict:
    return {"ppl": value, "nll": math.log(value), "num_tokens": 10, "num_windows": 1, "seq_len": 11}


def test_perplexity_bar_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from proxsparse_hf.evaluation.plot import plot_perplexity

    dense = EvalResults(model="m", method="dense", perplexity={"wikitext2": _ppl_entry(22.9), "c4": _ppl_entry(30.0)})
    pruned = EvalResults.from_dict({**full_results().to_dict(), "model": "m"})
    for kwargs in ({}, {"datasets": "wikitext2", "log_scale": False, "title": "t"}, {"labels": ["a", "b"]}):
        path = plot_perplexity([dense, pruned], tmp_path / "c.png", **kwargs)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"No result has a perplexity on `datasets`=\['lambada'\]"):
        plot_perplexity([dense], tmp_path / "d.png", datasets="lambada")
    with pytest.raises(ValueError, match=r"`labels` has 1 entries for 2 results"):
        plot_perplexity([dense, pruned], tmp_path / "e.png", labels=["x"])


def test_charts_without_matplotlib_say_how_to_install(monkeypatch, tmp_path):
    from proxsparse_hf.evaluation.plot import plot_perplexity, plot_telemetry

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    dense = EvalResults(model="m", method="dense", perplexity={"wikitext2": _ppl_entry(22.9)})
    with pytest.raises(RuntimeError, match=r'pip install "proxsparse-hf\[plots\]"'):
        plot_perplexity([dense], tmp_path / "c.png")
    with pytest.raises(RuntimeError, match=r"matplotlib"):
        plot_telemetry([{"step": 1, "proxsparse/frac_2to4": 0.5}], tmp_path / "t.png")


# ---------------------------------------------------------------------------------------------- schema 2: paths, labels
def test_eval_results_never_record_absolute_local_paths(tmp_path):
    from proxsparse_hf.data import find_assets_dir

    assets = find_assets_dir()
    data = {
        **full_results().to_dict(),
        "model": "/home/alice/models/SmolLM2-135M",
        "perplexity": {"/tmp/x/corpus.jsonl": {**_ppl_entry(5.0), "source": os.path.join(assets, "c4", "c4.jsonl")}},
        "method_config": {"calibration": {"source": "/data/calib.jsonl"}, "nested": ["/a/b/c.txt", "keep/relative"]},
        "settings": {"datasets": ["/tmp/x/corpus.jsonl"], "gguf_file": "m.gguf"},
    }
    results = EvalResults.from_dict(data)
    assert results.model == "SmolLM2-135M" and list(results.perplexity) == ["corpus.jsonl"]
    assert results.perplexity["corpus.jsonl"]["source"] == "c4/c4.jsonl"  # its place in the shared data folder
    assert results.method_config["calibration"]["source"] == "calib.jsonl"
    assert results.method_config["nested"] == ["c.txt", "keep/relative"]
    assert results.settings["datasets"] == ["corpus.jsonl"]
    text = results.to_json_string()
    assert '"/' not in text and "HuggingFaceTB" not in text
    assert EvalResults.from_dict(json.loads(text)) == results
    with pytest.raises(ValueError, match=r"two entries named 'c.jsonl'"):
        EvalResults.from_dict({**data, "perplexity": {"/a/c.jsonl": _ppl_entry(2.0), "/b/c.jsonl": _ppl_entry(3.0)}})


def test_portable_name_keeps_hub_ids_and_names_local_files(tmp_path, monkeypatch):
    from proxsparse_hf.evaluation import portable_name

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert portable_name("my-model") == "my-model" and portable_name("./my-model/") == "my-model"
    assert portable_name(str(tmp_path / "my-model")) == "my-model"
    assert portable_name("/elsewhere/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1.gguf"
    # inside a shared data folder, here or on the machine that wrote the file: the path inside it
    monkeypatch.setenv("PROXSPARSE_DATA_DIR", str(tmp_path))
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "piqa.jsonl").write_text("{}\n")
    assert portable_name(str(tmp_path / "zeroshot" / "piqa.jsonl")) == "zeroshot/piqa.jsonl"
    assert portable_name(str(tmp_path)) == tmp_path.name  # the data folder itself by its name, not "."
    assert portable_name("/other/box/shared/assets/data/c4/part.jsonl") == "c4/part.jsonl"


def test_paths_inside_a_text_are_scrubbed_and_prose_is_left_alone():
    from proxsparse_hf.paths import scrub_local_paths

    text = "calibrated on data=(/data/c4.jsonl),[/home/alice/x.txt] see https://hf.co/a/b"
    assert scrub_local_paths(text) == "calibrated on data=(c4.jsonl),[x.txt] see https://hf.co/a/b"
    prose = "the m_seed*/m_abs* runs ran in parallel, 16 x 8 / 32 x 2 accumulated, a/b relative"
    assert scrub_local_paths(prose) == prose
    assert scrub_local_paths("--note 'the m_seed*/m_abs* runs' --output /tmp/o.json") == (
        "--note 'the m_seed*/m_abs* runs' --output o.json"
    )


def test_schema_1_files_load_with_a_derived_label():
    old = full_results().to_dict()
    for key in ("label", "settings", "telemetry"):
        del old[key]
    old["schema_version"] = 1
    results = EvalResults.from_dict(old)
    assert results.label == "sparsegpt-mask" and results.schema_version == 2 and results.settings == {}
    assert EvalResults(model="m", method="wanda").label == "wanda"
    assert EvalResults(model="m", method="wanda", label="wanda (run 3)").label == "wanda (run 3)"


def test_display_label_and_summary_come_from_the_registry():
    from proxsparse_hf.pruners import get_pruner

    results = full_results()
    assert results.display_label == f"{get_pruner('sparsegpt').label} (mask only)"
    assert EvalResults(model="m", method="wanda").display_label == get_pruner("wanda").label
    assert EvalResults(model="m", method="wanda", label="mine").display_label == "mine"
    line = results.summary()
    assert "\n" not in line
    assert (
        line
        == "HuggingFaceTB/SmolLM2-135M-Instruct (sparsegpt-mask): wikitext2 ppl 88.00, zero-shot mean acc 0.5500 (2 tasks)"
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"label": ""}, r"`label`='' is invalid"),
        ({"telemetry": {"step": 1}}, r"`telemetry`=\{'step': 1\} is invalid"),
        ({"settings": []}, r"`settings`=\[\] is invalid"),
        ({"method": "obs"}, r"allowed: \(.*'magnitude'.*\)"),
    ],
)
def test_eval_results_schema_2_validation(change, match):
    with pytest.raises(ValueError, match=match):
        EvalResults.from_dict({**full_results().to_dict(), **change})


# ------------------------------------------------------------------------------------------------------ comparisons
def test_save_and_load_comparison(tmp_path):
    from proxsparse_hf.evaluation import load_comparison, save_comparison

    dense = EvalResults(model="m", method="dense", perplexity={"wikitext2": _ppl_entry(20.0)})
    rows = [dense, full_results()]
    path = save_comparison(tmp_path / "out", rows, model="/abs/m", command="proxsparse compare m")
    assert path == str(tmp_path / "out" / "comparison.json")
    payload = json.loads(open(path).read())
    assert payload["format"] == "proxsparse-comparison" and payload["model"] == "m"
    assert payload["command"] == "proxsparse compare m"
    for source in (path, str(tmp_path / "out"), payload, payload["results"], rows):
        assert load_comparison(source) == rows
    assert load_comparison(None) == []
    dense.save(tmp_path)  # a folder with only eval_results.json
    assert load_comparison(str(tmp_path)) == [dense]
    with pytest.raises(ValueError, match=r"duplicate labels \['dense'\]"):
        save_comparison(tmp_path / "dup.json", [dense, dense])
    with pytest.raises(ValueError, match=r"`metadata` keys \['format'\] are reserved"):
        save_comparison(tmp_path / "r.json", rows, format="mine")


def test_load_comparison_reads_files_of_the_first_version(tmp_path):
    from proxsparse_hf.evaluation import load_comparison

    # `proxsparse compare` before schema 2: {"label", "eval_results"} rows
    old = full_results().to_dict()
    for key in ("label", "settings", "telemetry"):
        del old[key]
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({"model": "m", "results": [{"label": "sparsegpt-mask (x)", "eval_results": old}]}))
    (row,) = load_comparison(str(path))
    assert row.label == "sparsegpt-mask (x)" and row.ppl("wikitext2") == 88.0


def test_load_comparison_reads_the_committed_quality_results():
    from proxsparse_hf.evaluation import load_comparison

    results_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    runs = load_comparison(os.path.join(results_dir, "quality_smollm2_h200.json"))
    by_label = {r.label: r for r in runs}
    assert by_label["wanda"].ppl("wikitext2") == pytest.approx(207.71, abs=0.01)
    assert by_label["sparsegpt-mask"].method_config["update_weights"] is False
    learned = by_label["ps-act-0.03-lr3e-3"]
    assert learned.method == "proxsparse" and learned.telemetry and learned.sparsity["all_2to4"] is True
    entry = learned.perplexity["wikitext2"]
    assert entry["num_tokens"] == entry["num_windows"] * (entry["seq_len"] - 1)
    assert learned.method_config["prune_time_s"] > 0 and learned.wall_time_s is None
    zeroshot = {r.label: r for r in load_comparison(os.path.join(results_dir, "quality_smollm2_zeroshot.json"))}
    assert zeroshot["dense"].zeroshot_mean == pytest.approx(0.4) and zeroshot["dense"].zeroshot["piqa"]["acc"] == 0.66
    assert zeroshot["dense"].zeroshot["piqa"]["source"] == "zeroshot/llm-foundry/piqa.jsonl"


def test_load_comparison_errors(tmp_path):
    from proxsparse_hf.evaluation import load_comparison

    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_comparison(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match=r"holds neither comparison.json nor eval_results.json"):
        load_comparison(str(tmp_path))
    good = full_results().to_dict()
    with pytest.raises(ValueError, match=r"Comparison entry 1: Unknown EvalResults key\(s\) \['x'\]"):
        load_comparison([good, {**good, "x": 1}])
    with pytest.raises(ValueError, match=r"Comparison entry 0: A comparison entry must be EvalResults or a dict"):
        load_comparison([3])
    with pytest.raises(ValueError, match=r"must be a list of results, got str"):
        load_comparison({"results": "x"})


# ------------------------------------------------------------------------------------------------------ task registry
@pytest.fixture
def task_registry(monkeypatch):
    """A private copy of the task registry, so toy tasks do not leak into other tests."""
    from proxsparse_hf.evaluation import tasks

    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    return tasks


def test_a_new_task_is_one_function_and_one_registration(task_registry, tmp_path):
    from proxsparse_hf.evaluation import register_eval_task

    calls = []

    # a zero-shot task: does the model rank the right next byte first? (no lm-eval involved)
    @register_eval_task("toy_next_byte", kind="zeroshot", label="Toy next byte", description="Argmax next byte.")
    def toy_next_byte(model, tokenizer, names, **options):
        calls.append((tuple(names), sorted(options)))
        ids = torch.tensor([tokenizer("abcabcabc", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hits = (model(ids).logits[0, :-1].argmax(-1) == ids[0, 1:]).float()
        return {name: {"acc": float(hits.mean()), "num_samples": int(hits.numel())} for name in names}

    # a perplexity task under its own name, reusing the library's scorer on a local file
    corpus = write_jsonl(tmp_path / "toy.jsonl", CORPUS)
    register_eval_task(
        "toy_corpus",
        kind="perplexity",
        label="Toy corpus",
        description="The test corpus.",
        fn=lambda model, tokenizer, names, **options: {
            n: perplexity(model, tokenizer, corpus, **options) for n in names
        },
    )
    model, tokenizer = byte_model(), byte_tokenizer()
    results = evaluate_model(
        model,
        tokenizer,
        model_name="tiny",
        datasets=["toy_corpus"],
        tasks=["toy_next_byte"],
        seq_len=16,
        show_progress=False,
    )
    assert list(results.perplexity) == ["toy_corpus"] and results.perplexity["toy_corpus"]["seq_len"] == 16
    direct = perplexity(model, tokenizer, corpus, seq_len=16, show_progress=False)
    assert results.ppl("toy_corpus") == pytest.approx(direct["ppl"], rel=1e-9)
    assert results.zeroshot["toy_next_byte"]["num_samples"] == 8
    assert results.zeroshot_mean == results.zeroshot["toy_next_byte"]["acc"]
    assert calls == [(("toy_next_byte",), ["batch_size", "data_dir", "limit", "skip_unavailable"])]
    assert "lm_eval" not in results.versions  # only lm-eval tasks record its version


def test_task_registry_lookups_and_errors(task_registry):
    from proxsparse_hf.evaluation import eval_task_names, get_eval_task, register_eval_task, resolve_eval_task

    assert eval_task_names("perplexity") == ("wikitext2", "c4")
    assert {"piqa", "arc_easy", "winogrande", "hellaswag"} <= set(eval_task_names("zeroshot"))
    assert get_eval_task("arc_easy").hub_dataset == "allenai/ai2_arc" and get_eval_task("c4").label == "C4 (en)"
    assert resolve_eval_task("some/hub-dataset", "perplexity").fn is evaluate_perplexity
    assert resolve_eval_task("lambada_openai", "zeroshot").fn is zeroshot_eval
    with pytest.raises(ValueError, match=r"Unknown evaluation task 'nope'; registered: \('wikitext2', 'c4', 'piqa'"):
        get_eval_task("nope")
    with pytest.raises(ValueError, match=r"'piqa' is a zeroshot task, not a perplexity one; pass it in --tasks"):
        resolve_eval_task("piqa", "perplexity")
    with pytest.raises(ValueError, match=r"'c4' is a perplexity task, not a zeroshot one; pass it in --datasets"):
        evaluate_model(byte_model(), byte_tokenizer(), model_name="m", datasets=[], tasks=["c4"])
    with pytest.raises(ValueError, match=r"Evaluation task 'c4' is already registered"):
        register_eval_task("c4", kind="perplexity", label="C4", description="again", fn=evaluate_perplexity)
    with pytest.raises(ValueError, match=r"`kind`='accuracy' is invalid; allowed: \('perplexity', 'zeroshot'\)"):
        register_eval_task("x", kind="accuracy", label="X", description="x", fn=evaluate_perplexity)
    with pytest.raises(ValueError, match=r"`fn`=3 is invalid"):
        register_eval_task("y", kind="zeroshot", label="Y", description="y", fn=3)
    assert "x" not in eval_task_names() and "y" not in eval_task_names()


# ------------------------------------------------------------------------------------------------ comparison runner
def test_run_comparison_starts_every_method_from_the_original_weights(tmp_path):
    from proxsparse_hf.data import load_calibration_data
    from proxsparse_hf.evaluation.compare import MethodRun, comparison_markdown, parse_methods, run_comparison

    model, tokenizer = byte_model(), byte_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = write_jsonl(tmp_path / "c.jsonl", CORPUS * 6)
    calibration = load_calibration_data(corpus, tokenizer, seq_len=32, n_samples=4)
    runs = [
        *parse_methods("magnitude,dense,sparsegpt-mask"),
        MethodRun("proxsparse", label="ps", options={"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3}),
    ]
    seen = []
    results = run_comparison(
        model,
        tokenizer,
        runs,
        model_name="tiny",
        calibration=calibration,
        calibration_spec={"source": corpus},
        eval_options={"datasets": [corpus], "seq_len": 16, "show_progress": False},
        on_result=seen.append,
    )
    assert [r.label for r in results] == ["magnitude", "dense", "sparsegpt-mask", "ps"] and seen == results
    for name, value in model.state_dict().items():  # restored after the last run
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    fresh = evaluate_model(model, tokenizer, model_name="tiny", datasets=[corpus], seq_len=16, show_progress=False)
    assert results[1].ppl("c.jsonl") == pytest.approx(fresh.ppl("c.jsonl"), rel=1e-9)  # dense after magnitude
    assert [r.sparsity["all_2to4"] for r in results] == [True, False, True, True]
    assert results[2].method_config["update_weights"] is False and results[2].method_config["calibration"] == {
        "source": "c.jsonl"
    }
    assert "calibration" not in results[0].method_config and results[0].method_config["prune_time_s"] >= 0
    assert (
        results[3].method == "proxsparse" and results[3].telemetry and "proxsparse_config" in results[3].method_config
    )
    assert all(
        set(e) <= {"step", "loss", "learning_rate"} | {k for k in e if k.startswith("proxsparse/")}
        for e in results[3].telemetry
    )
    table = comparison_markdown(results)
    assert "| sparsegpt-mask | sparsegpt |" in table and "| ps | proxsparse |" in table
    with pytest.raises(ValueError, match=r"need calibration data"):
        run_comparison(model, tokenizer, parse_methods("wanda"), model_name="tiny")
    with pytest.raises(ValueError, match=r"duplicate labels \['dense'\]"):
        run_comparison(model, tokenizer, [MethodRun("dense"), MethodRun("dense")], model_name="tiny")


def test_parse_methods_reads_the_pruner_registry():
    from proxsparse_hf.evaluation.compare import MethodRun, compare_method_names, parse_methods
    from proxsparse_hf.pruners import get_pruner, pruner_names

    names = compare_method_names()
    one_shot = [n for n in pruner_names() if not get_pruner(n).learned]
    assert [n for n in names if not n.endswith("-mask")] == one_shot
    assert "sparsegpt-mask" in names and "wanda-mask" not in names and "proxsparse" not in names
    assert "proxsparse" in compare_method_names(learned=True)
    runs = parse_methods("wanda, dense,wanda")
    assert [(r.method, r.name) for r in runs] == [("wanda", "wanda"), ("dense", "dense")]
    with pytest.raises(ValueError, match=r"`--methods`='dense,obs' is invalid; allowed: a comma-separated subset of"):
        parse_methods("dense,obs")
    with pytest.raises(ValueError, match=r"`--methods`='proxsparse' is invalid"):
        parse_methods("proxsparse")
    with pytest.raises(ValueError, match=r"`method`='obs' is invalid"):
        MethodRun("obs")
    with pytest.raises(ValueError, match=r"`method`='wanda-mask' is invalid"):
        MethodRun.from_name("wanda-mask")
