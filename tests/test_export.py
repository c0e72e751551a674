"""Dense / compact / mask-only artefacts: bit-exact round trips, sizes, and every refusal."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model

from proxsparse_hf.artefacts import (
    MASK_MANIFEST_NAME,
    apply_proxsparse,
    detect_artefact,
    load_pruned,
    resolve_source,
    save_artefact,
    save_compact,
    save_dense,
    save_mask_adapter,
    save_pruned_output,
)
from proxsparse_hf.config import ProxSparseConfig
from proxsparse_hf.constants import COMPACT_INDEX_NAME, COMPACT_WEIGHTS_NAME, CONFIG_NAME, PACKED_MASKS_NAME
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_state_equal(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        ref = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert ref.dtype == sb[name].dtype, name
        assert torch.equal(_bits(ref.contiguous()), _bits(sb[name].contiguous())), name


def random_2to4_masks(family: str, config: ProxSparseConfig) -> dict[str, torch.Tensor]:
    """Valid 2:4 masks (storage layout, Conv1D included) that are unrelated to the weights: the top-2 of random scores."""
    scores = tiny_model(family)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in scores.parameters():
            param.copy_(torch.rand(param.shape, generator=generator))
    return extract_2to4_masks(scores, config)


def make_output(tmp_path, family: str, name: str = "out", method: str = "magnitude", **run_info):
    model = tiny_model(family)
    config = ProxSparseConfig(base_model_name_or_path=f"tiny-org/{family}", revision="rev-0")
    masks = random_2to4_masks(family, config)  # not the top-2 |W|: a loader that recomputed magnitude masks would fail
    magnitude = extract_2to4_masks(model, config)
    assert sum(int((masks[n] != magnitude[n]).any()) for n in masks) == len(masks)
    apply_2to4_masks(model, masks)
    out = save_pruned_output(
        tmp_path / name, model, None, config=config, masks=masks, method=method, run_info=run_info
    )
    return out, model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pruned(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    out, model = make_output(tmp, request.param)
    return request.param, out, model, tmp


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_dense_round_trip(pruned, dtype):
    family, out, model, tmp = pruned
    path = save_dense(out.path, tmp / f"dense-{dtype}", dtype=dtype)
    assert detect_artefact(path) == "dense"
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, dtype="auto")  # no dependency on us
    assert_state_equal(model, plain, dtype)
    assert_state_equal(model, load_pruned(path), dtype)
    for name in (CONFIG_NAME, "sparsity_report.json", "run_info.json"):
        assert os.path.isfile(os.path.join(path, name))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compact_round_trip_bit_exact(pruned, dtype):
    family, out, model, tmp = pruned
    path = save_compact(out.path, tmp / f"compact-{dtype}", dtype=dtype)
    assert detect_artefact(path) == "compact"
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    loaded = load_pruned(path)
    assert_state_equal(model, loaded, dtype)
    index = json.load(open(os.path.join(path, COMPACT_INDEX_NAME)))
    assert len(index["compressed"]) == len(out.report.layers)
    assert all(info["transposed"] == (family == "gpt2") for info in index["compressed"].values())
    if family == "gpt2":
        assert index["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    if dtype is None:  # the same input gives the same logits
        ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_compact_size_within_bound(pruned):
    family, out, model, tmp = pruned
    path = save_compact(out.path, tmp / "compact-size", dtype="bfloat16")
    index = json.load(open(os.path.join(path, COMPACT_INDEX_NAME)))
    dense_bytes = compact_bytes = 0
    with safe_open(os.path.join(path, COMPACT_WEIGHTS_NAME), "pt") as fh:
        for name, info in index["compressed"].items():
            dense_bytes += 2 * info["shape"][0] * info["shape"][1]
            for suffix in (".values", ".positions"):
                t = fh.get_tensor(name + suffix)
                compact_bytes += t.numel() * t.element_size()
    ratio = compact_bytes / dense_bytes
    assert 0.5 < ratio <= 0.5625 - 0.02  # 0.5 + 1/24 with base-6 positions
    assert abs(ratio - (0.5 + 1 / 24)) < 1e-3


def test_mask_adapter_round_trip(pruned):
    family, out, model, tmp = pruned
    path = save_mask_adapter(out.path, tmp / "mask")
    assert detect_artefact(path) == "mask"
    assert sorted(os.listdir(path)) == sorted(
        [CONFIG_NAME, MASK_MANIFEST_NAME, PACKED_MASKS_NAME, "run_info.json", "sparsity_report.json"]
    )
    manifest = json.load(open(os.path.join(path, MASK_MANIFEST_NAME)))
    assert manifest["base_model_name_or_path"] == f"tiny-org/{family}" and manifest["revision"] == "rev-0"
    config = ProxSparseConfig.from_pretrained(path)
    assert config.base_model_name_or_path == f"tiny-org/{family}"
    numel = sum(row.numel for row in out.report.layers)
    assert os.path.getsize(os.path.join(path, PACKED_MASKS_NAME)) * 8 < numel  # < 1 bit per weight incl. header
    base = tiny_model(family)  # the same seed: the original weights
    result = apply_proxsparse(base, path)
    assert result is base
    assert_state_equal(model, result)
    # the one loader also handles the adapter when given the base model
    assert_state_equal(model, load_pruned(path, base_model=tiny_model(family)))
    base_dir = tmp / "base-folder"
    tiny_model(family).save_pretrained(base_dir)  # a base model given as a local folder (no tokenizer needed)
    assert_state_equal(model, apply_proxsparse(str(base_dir), path))
    with pytest.raises(ValueError, match="Cannot load the base model 'alice/no-such-model'"):
        apply_proxsparse("alice/no-such-model", path)


def test_mask_adapter_refusals(pruned):
    family, out, model, tmp = pruned
    path = save_mask_adapter(out.path, tmp / "mask-refusals")
    with pytest.raises(ValueError, match="weights differ from the ones the mask was learned on"):
        apply_proxsparse(tiny_model(family, seed=1), path)
    apply_proxsparse(tiny_model(family, seed=1), path, verify_weights=False)
    with pytest.raises(ValueError, match="Shape mismatch|lacks"):
        apply_proxsparse(tiny_model(family, hidden=128), path)
    with pytest.raises(ValueError, match="lacks .* weight"):
        apply_proxsparse(tiny_model("opt" if family != "opt" else "llama"), path)
    other = tiny_model(family)
    other.config._commit_hash = "rev-1"
    with pytest.raises(ValueError, match="Revision mismatch.*'rev-0'.*'rev-1'"):
        apply_proxsparse(other, path)
    with pytest.warns(UserWarning, match="Revision mismatch"):
        apply_proxsparse(other, path, check_revision=False)
    with pytest.raises(ValueError, match="not a mask adapter"):
        apply_proxsparse(tiny_model(family), out.path)
    with pytest.raises(TypeError, match="`base_model` must be"):
        apply_proxsparse(3, path)


def test_mask_adapter_needs_pure_mask_and_base(tmp_path):
    out, _ = make_output(tmp_path, "llama", method="sparsegpt", update_weights=True)
    with pytest.raises(ValueError, match="kept weights of this model were updated"):
        save_mask_adapter(out.path, tmp_path / "a")
    model = tiny_model("llama")
    apply_2to4_masks(model, extract_2to4_masks(model))
    with pytest.raises(ValueError, match="`base_model_name_or_path` is unknown"):
        save_mask_adapter(model, tmp_path / "b", config=ProxSparseConfig())
    path = save_mask_adapter(model, tmp_path / "c", config=ProxSparseConfig(), base_model_name_or_path="org/base")
    assert json.load(open(os.path.join(path, MASK_MANIFEST_NAME)))["base_model_name_or_path"] == "org/base"
    wrong = {k: ~v for k, v in extract_2to4_masks(model).items()}
    src = resolve_source(model, masks=wrong, config=ProxSparseConfig(base_model_name_or_path="org/base"))
    with pytest.raises(ValueError, match="disagrees with the pruned weights"):
        save_mask_adapter(src, tmp_path / "f")


def test_in_memory_model_and_tokenizer_free_source(tmp_path):
    model = tiny_model("llama")
    apply_2to4_masks(model, extract_2to4_masks(model))
    path = save_compact(model, tmp_path / "c", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not modified
    assert_state_equal(model, load_pruned(path), torch.bfloat16)


def test_not_2to4_is_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"claims 2:4 sparsity but 14 target weight\(s\) are not 2:4"):
        save_dense(model, tmp_path / "a")
    with pytest.raises(ValueError, match="claims 2:4 sparsity"):
        save_compact(model, tmp_path / "b")
    with pytest.raises(ValueError, match="claims 2:4 sparsity"):
        save_mask_adapter(model, tmp_path / "c", base_model_name_or_path="org/x")
    assert not os.path.exists(tmp_path / "a")


def test_negative_zero_outside_kept_pair_is_stored_dense(tmp_path):
    model = tiny_model("llama")
    apply_2to4_masks(model, extract_2to4_masks(model))
    weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        weight[0, :4] = torch.tensor([1.0, 2.0, -0.0, 0.0])
    with pytest.warns(UserWarning, match="stored dense in the compact checkpoint"):
        path = save_compact(model, tmp_path / "c")
    index = json.load(open(os.path.join(path, COMPACT_INDEX_NAME)))
    assert index["stored_dense_targets"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert_state_equal(model, load_pruned(path))


def test_bad_destinations_sources_and_formats(pruned, tmp_path):
    family, out, model, tmp = pruned
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_dense(out.path, tmp_path / "full")
    with pytest.raises(ValueError, match="is a file"):
        save_dense(out.path, tmp_path / "full" / "x")
    with pytest.raises(ValueError, match="`artefact`='gguf' is invalid"):
        save_artefact("gguf", out.path, tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a proxsparse output folder"):
        resolve_source(tmp_path / "full")
    with pytest.raises(TypeError, match="`source` must be"):
        resolve_source(42)
    with pytest.raises(ValueError, match="holds no pruned-model artefact"):
        detect_artefact(tmp_path / "full")
    with pytest.raises(ValueError, match="is a file"):
        load_pruned(tmp_path / "full" / "x")
    with pytest.raises(ValueError, match="neither an existing directory nor a valid Hub repo id"):
        load_pruned("not a//repo")
    path = save_compact(out.path, tmp_path / "compact")
    index_file = os.path.join(path, COMPACT_INDEX_NAME)
    index = json.load(open(index_file))
    json.dump({**index, "format_version": 99}, open(index_file, "w"))
    with pytest.raises(ValueError, match="format version 99.*Upgrade proxsparse-hf"):
        load_pruned(path)
    json.dump({**index, "format": "other"}, open(index_file, "w"))
    with pytest.raises(ValueError, match="has format 'other'"):
        load_pruned(path)
    first = next(iter(index["compressed"]))
    json.dump(
        {**index, "compressed": {**index["compressed"], first + ".x": index["compressed"][first]}},
        open(index_file, "w"),
    )
    with pytest.raises(ValueError, match="lacks the entries of"):
        load_pruned(path)


def test_cli_export_each_artefact_with_card(pruned, tmp_path, capsys):
    from proxsparse_hf.cli import main

    family, out, model, tmp = pruned
    for artefact in ("dense", "compact", "mask"):
        dest = tmp_path / artefact
        args = ["export", out.path, str(dest), "--artefact", artefact, "--card", "--repo-id", f"alice/{family}"]
        assert main(args + (["--dtype", "bfloat16"] if artefact != "mask" else [])) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["artefact"] == artefact and "README.md" in summary["files"]
        assert summary["size_bytes"] == sum(f.stat().st_size for f in dest.iterdir())
        loaded = load_pruned(dest, base_model=tiny_model(family)) if artefact == "mask" else load_pruned(dest)
        assert_state_equal(model, loaded, torch.bfloat16 if artefact != "mask" else None)
    with pytest.raises(SystemExit) as info:
        main(["export", out.path, str(tmp_path / "dense")])  # not empty
    assert info.value.code == 2 and "not empty" in capsys.readouterr().err
