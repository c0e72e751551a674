"""2:4-masked LoRA: training keeps the mask, merge is 2:4 with the same mask, adapters round-trip through PEFT."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import random_windows, tiny_model

from proxsparse_hf.artefacts import save_pruned_output
from proxsparse_hf.config import ProxSparseConfig
from proxsparse_hf.constants import CONFIG_NAME
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks, is_2to4, save_masks
from proxsparse_hf.sparse_lora import (
    SparseLoraConfig,
    SparseLoraLinear,
    get_sparse_peft_model,
    load_sparse_peft_model,
    merge_sparse,
    sparse_lora_masks,
)
from proxsparse_hf.targets import module_input_dim

VOCAB = 128


def pruned(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed, vocab=VOCAB)
    masks = extract_2to4_masks(model)
    apply_2to4_masks(model, masks)
    return model, masks


def lora(**kwargs) -> LoraConfig:
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return LoraConfig(**{**defaults, **kwargs})


def grouped(module, tensor):
    return tensor.t() if module_input_dim(module) == 0 else tensor


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def train(model, out_dir: str, steps: int = 4, save_steps: int | None = None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(random_windows(8, 16, VOCAB, seed=1)))
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------- the layer itself
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_forward_and_delta_are_masked(family):
    model, masks = pruned(family)
    peft_model = get_sparse_peft_model(model, lora())
    name, layer = next(
        (n, m) for n, m in peft_model.get_base_model().named_modules() if isinstance(m, SparseLoraLinear)
    )
    base = layer.get_base_layer()
    mask = masks[f"{name}.weight"]
    assert torch.equal(layer.proxsparse_mask, mask)
    assert layer.fan_in_fan_out == (family == "gpt2")
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    dense_delta = grouped(base, (b @ a) * s)  # storage layout
    assert (dense_delta[~mask] != 0).all()  # the unmasked delta would break 2:4 everywhere
    effective = ((base.weight + dense_delta) * mask).detach()  # (W0 + ΔW) ⊙ M, storage layout
    x = torch.randn(3, 5, grouped(base, base.weight).shape[1])
    expected = F.linear(x, grouped(base, effective), base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    delta = layer.get_delta_weight("default")
    assert torch.equal(delta != 0, mask) and not torch.signbit(delta[~mask]).any()  # exactly +0 off the mask
    assert repr(layer).startswith("lora.SparseLoraLinear(")


def test_masks_are_inferred_from_the_pruned_weights():
    model, masks = pruned("llama")
    peft_model = get_sparse_peft_model(model, lora())
    found = sparse_lora_masks(peft_model)
    assert set(found) == set(masks)
    assert all(torch.equal(found[k], masks[k]) for k in masks)
    assert isinstance(peft_model.peft_config["default"], SparseLoraConfig)
    assert not any(hasattr(m, "_proxsparse_pending_mask") for m in peft_model.modules())


def test_inferred_mask_completes_groups_with_fewer_than_two_nonzeros():
    model, _ = pruned("llama")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[0, :4] = 0.0  # a kept weight that is exactly zero (e.g. after quantisation)
        q.weight[0, 4:8] = torch.tensor([0.0, 0.5, 0.0, 0.0])
    peft_model = get_sparse_peft_model(model, lora(target_modules=["q_proj"]))
    mask = sparse_lora_masks(peft_model)["model.layers.0.self_attn.q_proj.weight"]
    assert mask[0, :8].tolist() == [True, True, False, False, True, True, False, False]
    assert (mask.view(-1, 4).sum(dim=1) == 2).all()


# ------------------------------------------------------------------------------------------- Trainer → merge_sparse
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_then_merge_keeps_exact_mask(family, tmp_path):
    model, masks = pruned(family)
    pruned_weights = {name: model.get_parameter(name).detach().clone() for name in masks}
    ids = random_windows(2, 16, VOCAB, seed=3)
    before = logits(model, ids)
    ps_config = ProxSparseConfig(lambda1=0.3)
    peft_model = get_sparse_peft_model(model, lora(init_lora_weights=True), proxsparse_config=ps_config)
    trainer = train(peft_model, str(tmp_path / "run"), steps=4, save_steps=4)
    assert trainer.state.global_step == 4
    # Trainer checkpoints go through PeftModel.save_pretrained: the ProxSparse recipe is recorded beside the adapter
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / CONFIG_NAME).is_file()
    assert ProxSparseConfig.from_pretrained(checkpoint).lambda1 == 0.3
    # the plain, unmasked delta after training is dense: masking is doing real work
    layers = [m for m in peft_model.modules() if isinstance(m, SparseLoraLinear)]
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in layers)
    trained = logits(peft_model, ids)
    assert not torch.allclose(trained, before, atol=1e-4)

    merged = merge_sparse(peft_model)
    assert not isinstance(merged, PeftModel) and type(merged).__name__ == type(model).__name__
    assert not any(isinstance(m, SparseLoraLinear) for m in merged.modules())
    changed = 0
    for name, mask in masks.items():
        module = merged.get_submodule(name[: -len(".weight")])
        weight = module.weight.detach()
        assert is_2to4(grouped(module, weight)), name
        assert torch.equal(weight != 0, mask), name  # exactly the same mask
        changed += int((weight != pruned_weights[name]).any())
    assert changed == len(masks)  # every target received its (masked) LoRA delta
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-5, rtol=1e-4)
    assert "proxsparse_mask" not in dict(merged.named_buffers())


def test_unmasked_lora_merge_loses_2to4():
    """The problem this module solves: a plain LoRA merge is dense."""
    model, masks = pruned("llama")
    merged = get_peft_model(model, lora()).merge_and_unload()
    assert not any(is_2to4(merged.get_parameter(name).detach()) for name in masks)


# --------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_round_trip_through_peft(family, tmp_path):
    model, masks = pruned(family)
    peft_model = get_sparse_peft_model(model, lora(), proxsparse_config=ProxSparseConfig(lambda1=0.7))
    ids = random_windows(2, 16, VOCAB, seed=4)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", CONFIG_NAME} <= files
    assert "proxsparse" not in (tmp_path / "adapter" / "adapter_config.json").read_text()  # a plain LoRA config

    fresh, _ = pruned(family)
    loaded = load_sparse_peft_model(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=1e-6)
    assert loaded.peft_config["default"].proxsparse_config.lambda1 == 0.7
    assert not any(p.requires_grad for p in loaded.parameters())

    # plain PEFT loading works too, but its layers are not masked (hence load_sparse_peft_model)
    plain_base, _ = pruned(family)
    plain = PeftModel.from_pretrained(plain_base, tmp_path / "adapter")
    assert not torch.allclose(logits(plain, ids), expected, atol=1e-4)

    trainable = load_sparse_peft_model(pruned(family)[0], tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    merged = merge_sparse(loaded)
    assert all(torch.equal(merged.get_parameter(k).detach() != 0, v) for k, v in masks.items())


def test_masks_from_output_folder_and_file(tmp_path):
    model, masks = pruned("llama")
    ps_config = ProxSparseConfig(lambda1=0.2, base_model_name_or_path="tiny")
    save_pruned_output(tmp_path / "out", model, config=ps_config, masks=masks, method="magnitude")
    peft_model = get_sparse_peft_model(model, lora(), masks=tmp_path / "out")
    assert peft_model.peft_config["default"].proxsparse_config.lambda1 == 0.2
    peft_model.save_pretrained(tmp_path / "adapter")
    assert ProxSparseConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == "tiny"

    save_masks({"base_model.model." + k: v for k, v in masks.items()}, tmp_path / "m.safetensors")  # PEFT-style keys
    again = load_sparse_peft_model(pruned("llama")[0], tmp_path / "adapter", masks=tmp_path / "m.safetensors")
    assert set(sparse_lora_masks(again)) == set(masks)


# --------------------------------------------------------------------------------------------------- dense targets
def test_dense_target_is_refused_by_default():
    model, _ = pruned("llama")
    with pytest.raises(ValueError, match=r"not 2:4 \(not pruned\).*lm_head.*on_dense_target='warn'"):
        get_sparse_peft_model(model, lora(target_modules=["q_proj", "lm_head"]))
    # the failed call leaves the model as it was
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not any(hasattr(m, "_proxsparse_pending_mask") for m in model.modules())


def test_dense_target_allowed_with_warning_stays_dense_lora():
    model, masks = pruned("llama")
    lm_head_before = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"not 2:4.*lm_head"):
        peft_model = get_sparse_peft_model(model, lora(target_modules=["q_proj", "lm_head"]), on_dense_target="warn")
    assert peft_model.get_base_model().lm_head.proxsparse_mask is None
    ids = random_windows(2, 16, VOCAB, seed=5)
    expected = logits(peft_model, ids)
    merged = merge_sparse(peft_model)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-4)
    assert (merged.lm_head.weight != lm_head_before).float().mean() > 0.9  # dense delta on the dense module
    for name in (k for k in masks if "q_proj" in k):
        assert torch.equal(merged.get_parameter(name).detach() != 0, masks[name])


# --------------------------------------------------------------------------------------------------- error paths
def test_dense_model_is_refused():
    with pytest.raises(ValueError, match="not 2:4-pruned"):
        get_sparse_peft_model(tiny_model("llama"), lora())


def test_masks_that_do_not_match_the_weights_are_refused():
    model = tiny_model("llama")
    masks = extract_2to4_masks(model)
    with pytest.raises(ValueError, match="outside its mask.*apply_2to4_masks"):
        get_sparse_peft_model(model, lora(), masks)
    model, masks = pruned("llama")
    name = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]: its transpose has the wrong shape
    with pytest.raises(ValueError, match="has shape"):
        get_sparse_peft_model(model, lora(), {name: masks[name].t()})
    with pytest.raises(ValueError, match="not a 2:4 mask"):
        get_sparse_peft_model(model, lora(), {name: torch.ones_like(masks[name])})
    with pytest.raises(KeyError, match="names no module"):
        get_sparse_peft_model(model, lora(), {"model.nope.weight": masks[name]})
    with pytest.raises(KeyError, match="not a weight name"):
        get_sparse_peft_model(model, lora(), {"model.layers.0.self_attn.q_proj": masks[name]})
    with pytest.raises(FileNotFoundError, match="no masks file"):
        get_sparse_peft_model(model, lora(), "/nonexistent/folder")
    with pytest.raises(ValueError, match="non-empty"):
        get_sparse_peft_model(model, lora(), {})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": True}, "`use_dora`=True is not supported"),
        ({"init_lora_weights": "pissa"}, "`init_lora_weights`='pissa' is not supported"),
        ({"modules_to_save": ["o_proj"]}, "modules_to_save.*densely"),
        ({"target_modules": ["embed_tokens"]}, "targets none of the 2:4-pruned modules"),
    ],
)
def test_unsupported_lora_configs(kwargs, match):
    model, _ = pruned("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            get_sparse_peft_model(model, lora(**kwargs), on_dense_target="warn")


def test_bad_arguments():
    model, _ = pruned("llama")
    with pytest.raises(ValueError, match="`on_dense_target`='ignore' is invalid"):
        get_sparse_peft_model(model, lora(), on_dense_target="ignore")
    with pytest.raises(ValueError, match="must be a peft.LoraConfig"):
        get_sparse_peft_model(model, {"r": 4})
    peft_model = get_sparse_peft_model(model, lora())
    with pytest.raises(ValueError, match="already holds PEFT adapter layers"):
        get_sparse_peft_model(peft_model, lora())
    with pytest.raises(ValueError, match="expects a peft.PeftModel"):
        merge_sparse(peft_model.get_base_model())


def test_merge_sparse_errors():
    plain = get_peft_model(pruned("llama")[0], lora())
    with pytest.raises(ValueError, match="no 2:4-masked LoRA layer"):
        merge_sparse(plain)
    peft_model = get_sparse_peft_model(pruned("llama")[0], lora())
    q = peft_model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    with torch.no_grad():
        q.weight.fill_(1.0)  # someone wrote into the frozen base weight
    with pytest.raises(ValueError, match="outside its 2:4 mask"):
        merge_sparse(peft_model)


def test_mixed_adapter_batches_are_refused():
    peft_model = get_sparse_peft_model(pruned("llama")[0], lora()).eval()
    with pytest.raises(ValueError, match="Mixed-adapter batches"):
        peft_model(input_ids=random_windows(2, 8, VOCAB), adapter_names=["default", "default"])


def test_peft_merge_unmerge_and_disable_adapter_stay_masked():
    model, masks = pruned("gpt2")
    ids = random_windows(2, 16, VOCAB, seed=6)
    base_logits = logits(model, ids)
    originals = {k: model.get_parameter(k).detach().clone() for k in masks}
    peft_model = get_sparse_peft_model(model, lora())
    expected = logits(peft_model, ids)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), base_logits)
    peft_model.merge_adapter()  # PEFT's in-place merge uses the masked get_delta_weight
    base = peft_model.get_base_model()
    for name, mask in masks.items():
        assert torch.equal(base.get_parameter(name.replace(".weight", ".base_layer.weight")).detach() != 0, mask)
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=1e-4)
    peft_model.unmerge_adapter()
    for name, mask in masks.items():
        weight = base.get_parameter(name.replace(".weight", ".base_layer.weight")).detach()
        assert not weight[~mask].any()
        torch.testing.assert_close(weight, originals[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_and_unfused_forward_agree_in_values_and_gradients(family):
    model, _ = pruned(family)
    peft_model = get_sparse_peft_model(model, lora(lora_dropout=0.5)).train()
    layer = next(m for m in peft_model.modules() if isinstance(m, SparseLoraLinear))
    x = torch.randn(2, 3, layer.get_base_layer().weight.numel() // layer.out_features)

    def run(fuse: bool):
        layer.fuse_forward = fuse
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.grad = b.grad = None
        out = layer(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), a.grad.clone(), b.grad.clone()

    layer.lora_dropout["default"].eval()  # dropout inactive: the fused path applies
    fused, unfused = run(True), run(False)
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layer.lora_dropout["default"].train()  # active dropout needs the separate LoRA path even with fuse_forward
    assert not layer._can_fuse(["default"], (), {})
    torch.manual_seed(0)
    dropped = run(True)[0]
    assert not torch.allclose(dropped, fused[0], atol=1e-4)
