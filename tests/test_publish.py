"""Publishing safety, end to end through the CLI and the local Hub server (minihub): no link is followed, no local path
is published, visibility is applied, export --overwrite replaces atomically, and compare -> card works."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
from conftest import HUB_OTHER_TOKEN
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from test_evaluation import CORPUS, byte_model, byte_tokenizer, write_jsonl
from test_export import assert_state_equal

from proxsparse_hf.artefacts import load_output_dir, load_pruned
from proxsparse_hf.artefacts.mask_adapter import MASK_MANIFEST_NAME
from proxsparse_hf.cli import main
from proxsparse_hf.constants import CARD_NAME, CONFIG_NAME, EVAL_RESULTS_NAME, PERMUTATION_NAME, RUN_INFO_NAME
from proxsparse_hf.hub.checks import check_model_card
from proxsparse_hf.pruners import get_pruner

pytestmark = pytest.mark.usefixtures("hub_url")


def _repo(prefix: str) -> str:
    return f"alice/{prefix}-{uuid.uuid4().hex[:8]}"


def _cli(argv: list[str]) -> int:
    return main(["--log-level", "WARNING", *argv])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A local base model folder, a magnitude output folder pruned from it and evaluated (eval_results.json), and a
    comparison of dense vs magnitude written by `proxsparse compare` — all with absolute local paths."""
    root = tmp_path_factory.mktemp("publish")
    base = str(root / "tiny-base")
    byte_model().save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    corpus = write_jsonl(root / "corpus.jsonl", CORPUS * 6)
    out = str(root / "pruned")
    assert _cli(["prune", base, "--method", "magnitude", "-o", out, "--no-progress"]) == 0
    eval_args = ["--datasets", corpus, "--eval-seq-len", "16", "--no-progress"]
    assert _cli(["eval", out, *eval_args]) == 0
    comparison = str(root / "cmp")
    assert _cli(["compare", base, "--methods", "dense,magnitude", "-o", comparison, *eval_args]) == 0
    return {"root": root, "base": base, "out": out, "corpus": corpus, "comparison": comparison}


def _copy_output(workspace, tmp_path, name="copy") -> str:
    dest = str(tmp_path / name)
    shutil.copytree(workspace["out"], dest)
    return dest


def test_a_symbolic_link_in_the_output_folder_is_refused(workspace, tmp_path, capsys):
    out = _copy_output(workspace, tmp_path)
    token_file = tmp_path / "hf-home" / "token"
    token_file.parent.mkdir()
    token_file.write_text("hf_secret_token_value")
    os.symlink(token_file, os.path.join(out, "chat_template.jinja"))
    repo = _repo("symlink")
    for argv in (["push", out, repo], ["export", out, str(tmp_path / "exported"), "--card"]):
        with pytest.raises(SystemExit) as info:
            _cli(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "'chat_template.jinja'" in err and "symbolic link" in err and "hf_secret" not in err
    assert not HfApi().repo_exists(repo) and not (tmp_path / "exported").exists()
    os.remove(os.path.join(out, "chat_template.jinja"))
    os.symlink(tmp_path / "hf-home", os.path.join(out, "extra"))  # a linked folder is refused as well
    with pytest.raises(SystemExit) as info:
        _cli(["push", out, repo, "--artefact", "mask"])
    assert info.value.code == 2 and "'extra'" in capsys.readouterr().err
    assert not HfApi().repo_exists(repo)


def _local_strings(workspace) -> list[bytes]:
    home = os.path.expanduser("~")
    roots = [str(workspace["root"]), os.path.dirname(str(workspace["root"])), os.getcwd()]
    return [s.encode() for s in roots + ([home] if len(home) > 1 else [])]


@pytest.mark.parametrize("artefact", ["dense", "compact", "mask"])
def test_no_local_path_in_any_pushed_file(workspace, tmp_path, artefact):
    out = _copy_output(workspace, tmp_path)
    # an eval_results.json of an older version, with absolute paths in it
    legacy = json.load(open(os.path.join(out, EVAL_RESULTS_NAME)))
    legacy["method_config"]["output_dir"] = os.path.abspath(out)
    legacy["settings"] = {"datasets": [workspace["corpus"]], "cache": os.path.expanduser("~/.cache/x")}
    json.dump(legacy, open(os.path.join(out, EVAL_RESULTS_NAME), "w"))
    # an output folder of an older version, which recorded the base model and the data by their local paths
    info = json.load(open(os.path.join(out, RUN_INFO_NAME)))
    info.update(base_model=workspace["base"], command=f"proxsparse prune {workspace['base']} -o {out}")
    json.dump(info, open(os.path.join(out, RUN_INFO_NAME), "w"))
    recipe = json.load(open(os.path.join(out, CONFIG_NAME)))
    recipe["base_model_name_or_path"] = workspace["base"]
    json.dump(recipe, open(os.path.join(out, CONFIG_NAME), "w"))
    assert load_output_dir(out).config.base_model_name_or_path == workspace["base"]
    repo = _repo(f"paths-{artefact}")
    assert _cli(["push", out, repo, "--artefact", artefact, "--comparison", workspace["comparison"]]) == 0
    folder = snapshot_download(repo)
    forbidden = _local_strings(workspace)
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        for needle in forbidden:
            assert needle not in data, (name, needle)
    config = json.load(open(os.path.join(folder, CONFIG_NAME)))
    run_info = json.load(open(os.path.join(folder, RUN_INFO_NAME)))
    assert config["base_model_name_or_path"] == "tiny-base" and config["revision"] is None
    assert run_info["base_model"] == "tiny-base" and len(run_info["base_model_sha256"]) == 64
    assert run_info["calibration"] is None and run_info["method"] == "magnitude"
    if artefact == "mask":
        manifest = json.load(open(os.path.join(folder, MASK_MANIFEST_NAME)))
        assert manifest["base_model_name_or_path"] == "tiny-base"
        assert manifest["base_model_sha256"] == run_info["base_model_sha256"]
        with pytest.raises(ValueError, match=r"made from a local base model 'tiny-base' \(sha256 .*pass `base_model`"):
            load_pruned(repo)
        # on another machine, given that base model (a folder or a loaded model)
        expected = load_output_dir(workspace["out"]).with_model().model
        assert_state_equal(expected, load_pruned(repo, base_model=workspace["base"]))
        assert_state_equal(expected, load_pruned(repo, base_model=byte_model()))


def test_push_base_model_rewrites_every_reference(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    base_repo = _repo("tiny-base")
    AutoModelForCausalLM.from_pretrained(workspace["base"]).push_to_hub(base_repo)
    repo = _repo("rewritten")
    argv = ["push", workspace["out"], repo, "--artefact", "mask", "--base-model", base_repo]
    assert _cli([*argv, "--comparison", workspace["comparison"]]) == 0
    folder = snapshot_download(repo)
    manifest = json.load(open(os.path.join(folder, MASK_MANIFEST_NAME)))
    config = json.load(open(os.path.join(folder, CONFIG_NAME)))
    run_info = json.load(open(os.path.join(folder, RUN_INFO_NAME)))
    meta = check_model_card(open(os.path.join(folder, CARD_NAME)).read())
    assert manifest["base_model_name_or_path"] == config["base_model_name_or_path"] == base_repo
    assert run_info["base_model"] == meta["base_model"] == base_repo and meta["base_model_relation"] == "adapter"
    assert "base_model_sha256" not in manifest and run_info["base_model_sha256"] is None
    for name in os.listdir(folder):
        assert b'tiny-base"' not in open(os.path.join(folder, name), "rb").read().replace(base_repo.encode(), b"")
    # loads with no base model given: the adapter names one on the Hub
    assert_state_equal(load_output_dir(workspace["out"]).with_model().model, load_pruned(repo))


def test_push_private_makes_an_existing_public_repo_private(workspace):
    repo = _repo("visibility")
    assert _cli(["push", workspace["out"], repo, "--artefact", "mask"]) == 0
    api = HfApi()
    assert api.model_info(repo).private is False
    assert _cli(["push", workspace["out"], repo, "--artefact", "mask", "--private"]) == 0
    assert api.model_info(repo).private is True
    with pytest.raises(Exception) as info:
        HfApi(token=HUB_OTHER_TOKEN).model_info(repo)
    assert getattr(getattr(info.value, "response", None), "status_code", None) in (401, 403, 404)
    assert _cli(["push", workspace["out"], repo, "--artefact", "mask"]) == 0  # no flag: the visibility is kept
    assert api.model_info(repo).private is True
    assert _cli(["push", workspace["out"], repo, "--artefact", "mask", "--public"]) == 0
    assert HfApi(token=HUB_OTHER_TOKEN).model_info(repo).private is False


def test_export_overwrite_replaces_the_folder_atomically(workspace, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "stale.bin").write_text("from an older export")
    with pytest.raises(SystemExit) as info:
        _cli(["export", workspace["out"], str(dest)])
    assert info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert _cli(["export", workspace["out"], str(dest), "--artefact", "dense", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "stale.bin" not in os.listdir(dest) and sorted(os.listdir(dest)) == summary["files"]
    before = {name: (dest / name).read_bytes() for name in os.listdir(dest)}
    # a card that fails (bad comparison, or a check failing after the weights were written) changes nothing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"label": "x"}]}))
    argv = ["export", workspace["out"], str(dest), "--artefact", "compact", "--overwrite", "--card"]
    with pytest.raises(SystemExit) as info:
        _cli([*argv, "--comparison", str(bad)])
    assert info.value.code == 2 and "Comparison entry 0" in capsys.readouterr().err

    def failing_check(card):
        raise ValueError("card check failed")

    monkeypatch.setattr("proxsparse_hf.hub.card.check_model_card", failing_check)
    with pytest.raises(SystemExit) as info:
        _cli(argv)
    assert info.value.code == 2 and "card check failed" in capsys.readouterr().err
    assert {name: (dest / name).read_bytes() for name in os.listdir(dest)} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "export"]  # no staging folder left behind
    repo = _repo("failing-card")
    with pytest.raises(SystemExit):
        _cli(["push", workspace["out"], repo])
    assert not HfApi().repo_exists(repo)  # validated before the repo is created


def test_compare_then_card_end_to_end(workspace, tmp_path, capsys):
    dest = tmp_path / "with-card"
    comparison = os.path.join(workspace["comparison"], "comparison.json")
    assert (
        _cli(["export", workspace["out"], str(dest), "--artefact", "compact", "--card", "--comparison", comparison])
        == 0
    )
    text = (dest / CARD_NAME).read_text()
    meta = check_model_card(text)
    dense, magnitude = get_pruner("dense").label, get_pruner("magnitude").label
    body = text.split("## Evaluation", 1)[1]
    assert body.index(f"| {dense} |") < body.index(f"| {magnitude} |") < body.index(f"| **this model ({magnitude})**")
    assert "corpus.jsonl ppl" in body and (dest / "perplexity.png").is_file()
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "perplexity"
    repo = _repo("compare-card")
    assert _cli(["push", workspace["out"], repo, "--comparison", workspace["comparison"]]) == 0
    pushed = open(hf_hub_download(repo, CARD_NAME)).read()
    assert f"| {dense} |" in pushed and "perplexity.png" in HfApi().list_repo_files(repo)


def test_a_permuted_mask_adapter_round_trips_through_the_hub(workspace, tmp_path):
    """A mask found after a channel permutation: the pushed adapter holds the permutation, and the model loaded from
    the Hub onto the local base equals the pruned model bit for bit."""
    out = str(tmp_path / "permuted")
    assert _cli(["prune", workspace["base"], "--method", "magnitude", "--permute", "-o", out, "--no-progress"]) == 0
    assert load_output_dir(out).run_info.permuted_layers
    repo = _repo("permuted-mask")
    assert _cli(["push", out, repo, "--artefact", "mask"]) == 0
    folder = snapshot_download(repo)
    manifest = json.load(open(os.path.join(folder, MASK_MANIFEST_NAME)))
    assert manifest["permutation_file"] == PERMUTATION_NAME and os.path.isfile(os.path.join(folder, PERMUTATION_NAME))
    assert_state_equal(load_output_dir(out).with_model().model, load_pruned(repo, base_model=workspace["base"]))
