"""The artefact registry: a new format is one class + one registration line, and export, load_pruned, the card, the
CLI and push all pick it up. Also the RunInfo schema of run_info.json and the PrunedModel of an output folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file
from test_export import assert_state_equal, make_output
from tiny_models import tiny_model

from proxsparse_hf.artefacts import (
    ArtefactFormat,
    PrunedModel,
    RunInfo,
    artefact_names,
    detect_artefact,
    get_artefact,
    load_output_dir,
    load_pruned,
    register_artefact,
    save_artefact,
    unregister_artefact,
)
from proxsparse_hf.artefacts.base import PrunedModel as BasePrunedModel
from proxsparse_hf.cli import main
from proxsparse_hf.constants import CARD_NAME, RUN_INFO_NAME
from proxsparse_hf.hub.card import build_model_card
from proxsparse_hf.hub.checks import check_model_card
from proxsparse_hf.hub.facts import CALIBRATION_LABELS, TRAINING_LABELS
from proxsparse_hf.hub.push import push_pruned_to_hub
from proxsparse_hf.utils import save_safetensors_atomic

TOY_WEIGHTS = "toy_weights.safetensors"


class ToyFormat(ArtefactFormat):
    """A toy format: the whole state dict in one safetensors file plus config.json (no tokenizer)."""

    name = "toy"
    label = "toy checkpoint"
    files = (TOY_WEIGHTS, "config.json")
    base_model_relation = "quantized"
    card_tag = "toy-format"

    def detect(self, path):
        return os.path.isfile(os.path.join(path, TOY_WEIGHTS))

    def save(self, source, directory):
        state = {k: v.detach().contiguous() for k, v in source.model.state_dict().items()}
        save_safetensors_atomic(state, os.path.join(directory, TOY_WEIGHTS))
        source.model.config.save_pretrained(directory)

    def load(self, path, *, dtype=None, base_model=None, token=None):
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        model.load_state_dict(load_file(os.path.join(path, TOY_WEIGHTS)))
        return model.eval()

    def card_description(self, revision):
        return "This repository holds a **toy checkpoint**."

    def how_to_load(self, repo, base_model, revision):
        return f'```python\nload_pruned("{repo}")  # toy\n```'


@pytest.fixture
def toy():
    register_artefact(ToyFormat)  # the one registration line
    yield get_artefact("toy")
    unregister_artefact("toy")


def test_a_registered_toy_format_works_everywhere(toy, tmp_path, capsys, hub_url):
    assert artefact_names()[-1] == "toy" and artefact_names()[:3] == ("dense", "compact", "mask")
    out, model = make_output(tmp_path, "llama")
    path = save_artefact("toy", out.path, tmp_path / "toy")
    assert detect_artefact(path) == "toy"
    assert sorted(os.listdir(path)) == sorted(
        ["config.json", TOY_WEIGHTS, "proxsparse_config.json", "sparsity_report.json", RUN_INFO_NAME]
    )
    assert_state_equal(model, load_pruned(path))
    card = build_model_card(out.path, artefact="toy", repo_id="alice/toy")
    meta = check_model_card(card)
    assert meta["tags"][-1] == "toy-format" and meta["library_name"] == "proxsparse-hf"
    assert 'load_pruned("alice/toy")  # toy' in card.content and "**toy checkpoint**" in card.content
    # the CLI offers it and exports it with a card
    assert main(["export", out.path, str(tmp_path / "cli-toy"), "--artefact", "toy", "--card"]) == 0
    assert "README.md" in json.loads(capsys.readouterr().out)["files"]
    # push uploads exactly the toy format's files + metadata + card
    repo = "alice/toy-format"
    push_pruned_to_hub(out.path, repo, artefact="toy")
    files = set(HfApi().list_repo_files(repo)) - {".gitattributes"}
    assert files == {
        "config.json",
        TOY_WEIGHTS,
        "proxsparse_config.json",
        "sparsity_report.json",
        RUN_INFO_NAME,
        CARD_NAME,
    }
    assert_state_equal(model, load_pruned(repo))
    assert "toy-format" in open(hf_hub_download(repo, CARD_NAME)).read()


def test_a_format_writing_an_undeclared_file_is_refused(toy, tmp_path, monkeypatch):
    out, _ = make_output(tmp_path, "llama")
    save = ToyFormat.save

    def save_with_extra(self, source, directory):
        save(self, source, directory)
        open(os.path.join(directory, "notes.txt"), "w").write("x")

    monkeypatch.setattr(ToyFormat, "save", save_with_extra)
    with pytest.raises(ValueError, match=r"holds file\(s\) its format does not define: \['notes.txt'\]"):
        save_artefact("toy", out.path, tmp_path / "toy")
    assert not (tmp_path / "toy").exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_registry_refusals(toy):
    with pytest.raises(
        ValueError, match=r"`artefact`='gguf' is invalid; allowed: \('dense', 'compact', 'mask', 'toy'\)"
    ):
        get_artefact("gguf")
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_artefact(ToyFormat)

    class NoLabel(ToyFormat):
        name, label = "nolabel", ""

    class BadRelation(ToyFormat):
        name, base_model_relation = "bad", "pruned"

    class BadFiles(ToyFormat):
        name, files = "badfiles", [TOY_WEIGHTS]

    with pytest.raises(ValueError, match=r"`NoLabel.label`='' is invalid"):
        register_artefact(NoLabel)
    with pytest.raises(
        ValueError, match=r"`BadRelation.base_model_relation`='pruned' is invalid; allowed: \('adapter'"
    ):
        register_artefact(BadRelation)
    with pytest.raises(ValueError, match=r"`BadFiles.files`=.* is invalid; allowed: a tuple"):
        register_artefact(BadFiles)
    with pytest.raises(ValueError, match="a subclass of ArtefactFormat"):
        register_artefact(dict)
    assert "nolabel" not in artefact_names() and "bad" not in artefact_names()
    with pytest.raises(ValueError, match="`artefact`='nope' is invalid"):
        unregister_artefact("nope")


def test_run_info_schema():
    legacy = {
        "method": "magnitude",
        "calibration": {"source": "c4.jsonl", "n_samples": 8},
        "training": None,
        "update_weights": True,
        "device_map": {"cpu": [""]},
        "wall_time_s": 3,
    }
    info = RunInfo.from_dict(legacy)
    assert info.method == "magnitude" and info.extra == {"device_map": {"cpu": [""]}}
    assert info["device_map"] == {"cpu": [""]} and info["training"] is None and info.get("prune_time_s") is None
    assert info.calibration_source == "c4.jsonl" and info.weights_updated
    assert RunInfo.from_dict(info.to_dict()) == info and dict(info)["wall_time_s"] == 3
    assert RunInfo.from_dict({"method_config": {"update_weights": True}}).weights_updated
    assert not RunInfo.from_dict({"method_config": {"update_weights": False}}).weights_updated
    assert (
        RunInfo.from_dict(None).method == "proxsparse" and RunInfo.from_dict({"method": None}).method == "proxsparse"
    )
    assert info.replace(command="x", extra_key=1)["extra_key"] == 1
    for bad, match in (
        ({"wall_time_s": -1}, r"`wall_time_s`=-1 is invalid; allowed: None or a number of seconds >= 0"),
        ({"calibration": "c4"}, r"`calibration`='c4' is invalid; allowed: None or a dict"),
        ({"command": 3}, r"`command`=3 is invalid; allowed: None or a string"),
        ({"update_weights": "no"}, r"`update_weights`='no' is invalid"),
        ({"method": ""}, r"`method`='' is invalid"),
    ):
        with pytest.raises(ValueError, match=match):
            RunInfo.from_dict(bad)
    with pytest.raises(ValueError, match=r"`extra` repeats the field\(s\) \['command'\]"):
        RunInfo(extra={"command": "x"})
    with pytest.raises(ValueError, match="run_info must be a dict"):
        RunInfo.from_dict([1])
    # the card shows every documented key of calibration / training, and nothing it would read is undocumented
    from proxsparse_hf.artefacts.run_info import CALIBRATION_KEYS, TRAINING_KEYS

    assert tuple(CALIBRATION_LABELS) == CALIBRATION_KEYS and tuple(TRAINING_LABELS) == TRAINING_KEYS


def test_pruned_model_of_an_output_folder(tmp_path):
    out, model = make_output(tmp_path, "gpt2", wall_time_s=1.5, device_map={"cpu": [""]})
    assert PrunedModel is BasePrunedModel and isinstance(out, PrunedModel)
    meta = load_output_dir(out.path)
    assert meta.model is None and meta.method == "magnitude" and meta.masks_file.endswith(".safetensors")
    assert meta.run_info.wall_time_s == 1.5 and meta.run_info["device_map"] == {"cpu": [""]}
    assert meta.run_info.versions["torch"] == torch.__version__ and meta.run_info.hardware["cpu_count"]
    loaded = meta.with_model("bfloat16")
    assert loaded is not meta and next(loaded.model.parameters()).dtype == torch.bfloat16
    loaded.check_2to4()
    masks = loaded.get_masks()
    assert set(masks) == set(loaded.targets()) and all(m.dtype == torch.bool for m in masks.values())
    with pytest.raises(ValueError, match="not loaded; call `with_model\\(\\)` first"):
        meta.targets()
    with pytest.raises(ValueError, match=r"`method`='obs' is invalid; allowed: \("):
        from proxsparse_hf.artefacts import save_pruned_output

        save_pruned_output(tmp_path / "x", tiny_model("llama"), config=out.config, masks={}, method="obs")
    # the written run_info.json holds every schema key
    written = json.load(open(os.path.join(out.path, RUN_INFO_NAME)))
    assert set(RunInfo().to_dict()) <= set(written) and written["device_map"] == {"cpu": [""]}
