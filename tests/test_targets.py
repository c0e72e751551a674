import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from proxsparse_hf import ProxSparseConfig, find_targets
from proxsparse_hf.targets import match_module_name

EXPECTED = {  # targets per decoder block
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "gpt_neox": 4,
    "opt": 6,
    "gpt2": 4,
    "phi": 6,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_per_family(family):
    model = tiny_model(family)
    targets = find_targets(model)
    assert len(targets) == 2 * EXPECTED[family]
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    for t in targets.values():
        assert t.module is not embeddings and t.module is not output
        assert "lm_head" not in t.name and "embed" not in t.name
        grouped = t.grouped(t.weight)
        assert grouped.shape[-1] % 4 == 0
        assert t.param_name in dict(model.named_parameters())
    transposed = {t.transposed for t in targets.values()}
    assert transposed == ({True} if family == "gpt2" else {False})


def test_gpt2_conv1d_grouped_is_input_dim():
    model = tiny_model("gpt2")
    t = find_targets(model)["transformer.h.0.mlp.c_proj"]
    assert tuple(t.weight.shape) == (256, 64)  # Conv1D stores [in, out]
    assert tuple(t.grouped(t.weight).shape) == (64, 256)
    view = t.grouped(t.weight.data)
    view[0, 0] = 123.0  # a view: writes reach the weight
    assert t.weight.data[0, 0] == 123.0


def test_list_regex_and_exclude():
    model = tiny_model("llama")
    names = list(find_targets(model, target_modules=["q_proj", "mlp.down_proj"]))
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    names = list(find_targets(model, target_modules=r"model\.layers\.1\..*_proj"))
    assert len(names) == 7 and all(".layers.1." in n for n in names)
    names = list(find_targets(model, ProxSparseConfig(exclude_modules=["k_proj", "v_proj"])))
    assert len(names) == 10 and not any(n.endswith(("k_proj", "v_proj")) for n in names)
    names = list(find_targets(model, ProxSparseConfig(exclude_modules=r".*layers\.0\..*")))
    assert len(names) == 7
    # suffix matching respects module boundaries: "proj" is not a suffix of "q_proj"
    assert not match_module_name("model.layers.0.self_attn.q_proj", ["proj"])


def test_lm_head_never_a_target_even_when_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matched no nn.Linear/Conv1D module"):
        find_targets(model, target_modules=["lm_head"])
    tied = tiny_model("gpt2")  # GPT-2 ties lm_head to wte
    assert not any("lm_head" in n for n in find_targets(tied, target_modules=r".*"))


def test_no_match_error_names_the_pattern():
    with pytest.raises(ValueError, match=r"`target_modules`=\['nope'\].*matched no nn.Linear/Conv1D"):
        find_targets(tiny_model("llama"), target_modules=["nope"])
    with pytest.raises(ValueError, match="matched no"):
        find_targets(torch.nn.Sequential(torch.nn.ReLU()))


def test_non_divisible_input_dim_names_module_and_shape():
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(126, 64)
    with pytest.raises(
        ValueError, match=r"`model.layers.0.mlp.down_proj` has weight shape \(64, 126\).*not divisible by 4"
    ):
        find_targets(model)
    assert len(find_targets(model, ProxSparseConfig(exclude_modules=["down_proj"]))) == 12
