"""Channel permutation for 2:4 (proxsparse_hf.permutation): exact folding, better groups, the CLI and the records."""

from __future__ import annotations

import itertools
import json
import re
import sys

import pytest
import torch
from tiny_models import random_windows, tiny_config, tiny_corpus, tiny_model, tiny_tokenizer

from proxsparse_hf import permutation
from proxsparse_hf.artefacts import load_output_dir
from proxsparse_hf.cli import main as cli_main
from proxsparse_hf.constants import PERMUTATION_NAME
from proxsparse_hf.masks import is_2to4
from proxsparse_hf.permutation import (
    find_permutation,
    kept_importance,
    permutation_importance_for,
    permute_channels,
)
from proxsparse_hf.pruners import prune, register_pruner
from proxsparse_hf.targets import find_targets


def model_with_biases(family: str, seed: int = 0):
    """A tiny model of ``family`` with random (non-zero) biases wherever it has them: llama with attention and MLP
    biases, qwen2 with its q/k/v biases, mistral without biases but with grouped-query attention."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    if family == "llama":
        config.attention_bias = True
        config.mlp_bias = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    return model


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize(
    "family, importance",
    [("llama", "magnitude"), ("mistral", "activation"), ("qwen2", "ria"), ("qwen2", "activation")],
)
def test_folding_keeps_the_dense_logits(family, importance):
    model = model_with_biases(family)
    windows = random_windows(2, 24)
    before = logits(model, windows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = permute_channels(model, importance=importance, calibration=random_windows(4, 16))
    torch.testing.assert_close(logits(model, windows), before, atol=1e-5, rtol=1e-5)
    names = sorted(layer.name for layer in report.layers)
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    # only consumers and their producers move (v_proj bias included where the model has one)
    assert changed and all(
        re.search(r"(o_proj|down_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$", k) for k in changed
    )
    if family == "qwen2":
        assert "model.layers.0.self_attn.v_proj.bias" in changed
    assert report.kept_change > 0 and report.pruned_change < 0 and not report.skipped


def test_o_proj_permutation_stays_inside_each_head_and_is_shared_by_the_query_heads_of_a_kv_head():
    model = tiny_model("mistral")  # 4 query heads of 16 dims, 2 key/value heads
    report = permute_channels(model)
    perm = report.permutations["model.layers.0.self_attn.o_proj"]
    head_dim, rep = 16, 2
    for head in range(4):
        block = perm[head * head_dim : (head + 1) * head_dim]
        assert sorted(block.tolist()) == list(range(head * head_dim, (head + 1) * head_dim))
    for kv in range(2):
        first, second = (perm[(kv * rep + r) * head_dim : (kv * rep + r + 1) * head_dim] % head_dim for r in range(2))
        assert torch.equal(first, second)


def test_permuted_then_pruned_model_is_exactly_2to4():
    model = tiny_model("qwen2")
    calib = random_windows(4, 16)
    permute_channels(model, importance="activation", calibration=calib)
    masks = prune(model, "wanda", calib)
    assert masks and all(is_2to4(model.get_parameter(name)) for name in masks)


def test_known_optimum_is_reached_and_never_worse_than_identity():
    # identity groups put the four large channels together: per row 10+10 (group 1) + 1+1 (group 2) = 22;
    # the best grouping has two large and two small channels in each group: 2 × (10+10) = 40
    scores = torch.tensor([[10.0] * 4 + [1.0] * 4] * 3)
    assert kept_importance(scores) == 66
    for refine in ("hungarian", "swap", "none"):
        perm = find_permutation(scores, refine=refine)
        assert sorted(perm.tolist()) == list(range(8)) and kept_importance(scores[:, perm]) == 120
    gen = torch.Generator().manual_seed(0)
    random_scores = torch.rand(32, 64, generator=gen) ** 3
    for refine in ("hungarian", "swap"):
        perm = find_permutation(random_scores, refine=refine)
        assert kept_importance(random_scores[:, perm]) > kept_importance(random_scores)
    # already optimal: the identity comes back
    best = torch.tensor([[5.0, 5.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0]])
    assert torch.equal(find_permutation(best), torch.arange(8))


def test_search_is_a_permutation_between_identity_and_the_brute_force_optimum():
    # the refinement re-assigns one position of the groups at a time (RIA's scheme), a local search: on small layers it
    # may stop short of the optimum, never below the identity
    for seed in range(5):
        scores = torch.rand(6, 8, generator=torch.Generator().manual_seed(seed))
        optimum = max(
            kept_importance(scores[:, list(first) + [c for c in range(8) if c not in first]])
            for first in itertools.combinations(range(8), 4)
        )
        for refine in ("hungarian", "swap", "none"):
            perm = find_permutation(scores, refine=refine, rounds=2)
            assert sorted(perm.tolist()) == list(range(8))
            assert kept_importance(scores) <= kept_importance(scores[:, perm]) <= optimum + 1e-9


def test_permute_channels_reaches_the_known_optimum_of_a_constructed_down_proj():
    model = tiny_model("llama")  # down_proj: 64 outputs, 128 input channels
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight.copy_(torch.cat([torch.full((64, 64), 2.0), torch.full((64, 64), 0.5)], dim=1))
        down.weight.mul_(torch.sign(torch.randn(64, 128)))
    windows = random_windows(2, 16)
    before = logits(model, windows)
    report = permute_channels(model, targets=["down_proj"])
    layer = next(layer for layer in report.layers if layer.name == "model.layers.0.mlp.down_proj")
    assert (layer.kept_before, layer.kept_after) == (64 * (16 * 4 + 16 * 1), 64 * 32 * 4)
    assert layer.producers == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert all(name.endswith("down_proj") for name in report.summary()["layers"])
    torch.testing.assert_close(logits(model, windows), before, atol=1e-5, rtol=1e-5)


def test_hungarian_and_swap_both_improve_and_auto_falls_back_without_scipy(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(48, 128, generator=gen) ** 4
    base = kept_importance(scores)
    hungarian = kept_importance(scores[:, find_permutation(scores, refine="hungarian")])
    swap = kept_importance(scores[:, find_permutation(scores, refine="swap")])
    assert hungarian > base and swap > base
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize now raises ImportError
    model = tiny_model("llama")
    assert permute_channels(model, refine="auto").refine == "swap"
    with pytest.raises(ValueError, match=r"^`refine`='hungarian' needs scipy"):
        find_permutation(scores, refine="hungarian")


def test_importance_matching_each_method():
    from proxsparse_hf import ProxSparseConfig

    assert permutation_importance_for("magnitude") == "magnitude"
    assert permutation_importance_for("wanda") == "activation"
    assert permutation_importance_for("sparsegpt") == "activation"
    assert permutation_importance_for("ria") == "ria"
    assert permutation_importance_for("proxsparse", ProxSparseConfig.recommended()) == "activation"
    assert permutation_importance_for("proxsparse", ProxSparseConfig(importance="magnitude")) == "magnitude"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"importance": "weights"}, r"^`importance`='weights' is invalid; allowed: one of \('magnitude', "),
        (
            {"refine": "greedy"},
            r"^`refine`='greedy' is invalid; allowed: one of \('auto', 'hungarian', 'swap', 'none'\)",
        ),
        ({"rounds": -1}, r"^`rounds`=-1 is invalid; allowed: an integer >= 0\.$"),
        ({"alpha": -0.5}, r"^`alpha`=-0.5 is invalid; allowed: a number >= 0\.$"),
        ({"batch_size": 0}, r"^`batch_size`=0 is invalid; allowed: an integer >= 1\.$"),
        ({"importance": "activation"}, r"^`importance`='activation' reads activations; pass `calibration` windows\.$"),
    ],
)
def test_bad_values_are_one_clear_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        permute_channels(tiny_model("llama"), **kwargs)


def test_unsupported_architecture_and_already_pruned_models_are_refused():
    with pytest.raises(
        ValueError, match=r"^`model_type`='gpt2' is not supported .*; allowed: llama, mistral, qwen2\.$"
    ):
        permute_channels(tiny_model("gpt2"))
    model = tiny_model("llama")
    prune(model, "magnitude")
    with pytest.raises(ValueError, match=r"`model\.layers\.0\.mlp\.down_proj` is already 2:4 sparse"):
        permute_channels(model)
    with pytest.raises(ValueError, match=r"`scores` of shape \(4, 6\) is invalid"):
        find_permutation(torch.rand(4, 6))
    with pytest.raises(ValueError, match=r"must be finite and >= 0"):
        find_permutation(-torch.rand(4, 8))
    with pytest.raises(ValueError, match=r"^`permutation_importance`='size' is invalid"):
        register_pruner(
            "never-registered", label="X", description="", needs_calibration=False, permutation_importance="size"
        )


def test_no_consumer_among_the_targets_warns_and_changes_nothing():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"no o_proj / down_proj target to permute"):
        report = permute_channels(model, targets=["q_proj", "k_proj"])
    assert report.layers == [] and report.summary()["layers"] == {}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_permutation_that_changes_the_logits_is_undone(monkeypatch):
    # a wrong producer (k_proj instead of v_proj) breaks the function; the probe catches it and restores the weights
    monkeypatch.setitem(
        permutation.SUPPORTED_ARCHITECTURES, "llama", permutation.folding._BlockNames(value="self_attn.k_proj")
    )
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"changed the model's logits .* it was undone"):
        permute_channels(model, targets=["o_proj"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_comparison_rows_with_and_without_permutation():
    from proxsparse_hf.evaluation.compare import MethodRun, parse_methods, run_comparison

    runs = parse_methods("magnitude,magnitude+perm,sparsegpt-mask+perm")
    assert [r.name for r in runs] == ["magnitude", "magnitude+perm", "sparsegpt-mask+perm"]
    assert runs[1].permute == {} and runs[2].options == {"update_weights": False} and runs[0].permute is None
    with pytest.raises(ValueError, match=r"followed by '\+perm'"):
        parse_methods("wanda+permute")
    with pytest.raises(ValueError, match=r"need calibration data"):
        run_comparison(
            tiny_model("llama"),
            tiny_tokenizer(),
            [MethodRun("magnitude", permute={"importance": "ria"})],
            model_name="m",
        )

    model = tiny_model("llama")
    calls = []
    monkey = MethodRun("magnitude", label="magnitude+perm", permute={}, apply=None)
    results = run_comparison(
        model,
        tiny_tokenizer(),
        [runs[0], monkey],
        model_name="tiny",
        eval_options={"datasets": [], "tasks": []},
        on_result=calls.append,
    )
    assert [r.label for r in results] == ["magnitude", "magnitude+perm"]
    info = results[1].method_config["permutation"]
    assert info["importance"] == "magnitude" and len(info["layers"]) == 4 and info["pruned_importance_change"] < 0
    assert "permutation" not in results[0].method_config and results[1].sparsity["all_2to4"]


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("permute-cli")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    tiny_model("gpt2").save_pretrained(root / "gpt2")
    tiny_tokenizer().save_pretrained(root / "gpt2")
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in tiny_corpus(40)))
    return root


CALIB = ["--calibration", "CALIB", "--n-samples", "4", "--seq-len", "16", "--no-progress"]


def _argv(argv, root, tmp_path):
    names = {"MODEL": root / "model", "GPT2": root / "gpt2", "CALIB": root / "calib.jsonl", "OUT": tmp_path / "out"}
    return [str(names[a]) if a in names else a for a in argv]


def test_prune_with_permute_end_to_end(workspace, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    argv = _argv(["prune", "MODEL", "--method", "ria", "--permute", "-o", "OUT", *CALIB], workspace, tmp_path)
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["permuted_layers"] == 4 and summary["layers_2to4"] == summary["target_layers"] == 14
    output = load_output_dir(str(tmp_path / "out"))
    info = output.run_info["permutation"]
    assert info["importance"] == "ria" and info["refine"] == "hungarian"
    assert info["layers"]["model.layers.1.self_attn.o_proj"] == ["model.layers.1.self_attn.v_proj"]
    assert output.run_info.permuted_layers == list(info["layers"]) and output.report.all_2to4
    # a plain checkpoint: transformers loads it, every target exactly 2:4
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert all(is_2to4(target.weight) for target in find_targets(model).values())
    # the card says so; a mask-only adapter is refused (the masks no longer fit the base model's weights)
    from proxsparse_hf.hub.card import build_model_card
    from proxsparse_hf.hub.facts import hyperparameters

    rows = dict(hyperparameters(output.config, output.run_info))
    assert rows["channel permutation"].startswith("input channels of 4 layers (down_proj, o_proj) permuted")
    card = build_model_card(output, artefact="dense")
    assert "after a channel permutation of 4 layers" in card.content
    from proxsparse_hf.artefacts import get_artefact

    get_artefact("mask").validate(output.with_model())  # the folder keeps the permutation: an adapter can replay it
    (tmp_path / "out" / PERMUTATION_NAME).unlink()  # without it (a folder of an older version) it cannot
    with pytest.raises(ValueError, match=r"input channels of 4 layers were permuted .* was not saved .*--no-permute"):
        get_artefact("mask").validate(load_output_dir(str(tmp_path / "out")).with_model())


def test_learn_permutes_by_default_and_its_mask_adapter_replays_the_permutation(workspace, tmp_path, capsys):
    """``proxsparse learn`` permutes the channels by default; the folder keeps the permutation, the mask-only adapter
    carries it, and applied to the base model the adapter reproduces the learned model bit for bit. A permutation
    that does not fit the base model is refused before the model changes."""
    from transformers import AutoModelForCausalLM

    from proxsparse_hf import apply_proxsparse
    from proxsparse_hf.permutation import load_index_maps, save_index_maps

    argv = ["learn", "MODEL", "--dataset", "CALIB", "--n-samples", "4", "--seq-len", "16", "--max-steps", "2"]
    assert cli_main(_argv([*argv, "--device", "cpu", "-o", "OUT"], workspace, tmp_path)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["permuted_layers"] == 4
    out = tmp_path / "out"
    output = load_output_dir(str(out))
    assert output.run_info["permutation"]["importance"] == "activation" and len(output.run_info.permuted_layers) == 4
    maps = output.load_permutation()
    assert {f"{name}.weight" for name in output.run_info.permuted_layers} <= set(maps)
    assert {dim for dim, _ in maps.values()} == {0, 1}
    assert cli_main(["export", str(out), "-o", str(tmp_path / "adapter"), "--artefact", "mask", "--card"]) == 0
    adapter = tmp_path / "adapter"
    assert (adapter / PERMUTATION_NAME).is_file()
    card = (adapter / "README.md").read_text()
    assert "carries the channel permutation of 4 layers" in card and "apply_proxsparse` folds it" in card
    learned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    changed = [k for k in learned if not torch.equal(learned[k], original[k])]
    assert any(k.endswith("v_proj.weight") for k in changed)  # a producer moved: the permutation, not only masks
    model = apply_proxsparse(base, str(adapter))
    assert all(torch.equal(v, learned[k]) for k, v in model.state_dict().items())
    # an index that is not a permutation of its dimension: refused, the base model untouched
    bad = load_index_maps(adapter / PERMUTATION_NAME)
    name = next(n for n in bad if n.endswith("down_proj.weight"))
    dim, index = bad[name]
    bad[name] = (dim, torch.zeros_like(index))
    save_index_maps(bad, adapter / PERMUTATION_NAME)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    with pytest.raises(ValueError, match=rf"permutation of `{re.escape(name)}` is not a permutation"):
        apply_proxsparse(base, str(adapter))
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    # an adapter that names its permutation but lost the file
    (adapter / PERMUTATION_NAME).unlink()
    with pytest.raises(ValueError, match=r"names a channel permutation .* but does not hold it"):
        apply_proxsparse(base, str(adapter))


def test_learn_with_permute_records_it(workspace, tmp_path, capsys):
    argv = ["learn", "MODEL", "--dataset", "CALIB", "--n-samples", "4", "--seq-len", "16", "--max-steps", "2"]
    argv += ["--device", "cpu", "--permute", "--permute-importance", "magnitude", "-o", "OUT"]
    assert cli_main(_argv(argv, workspace, tmp_path)) == 0
    capsys.readouterr()
    output = load_output_dir(str(tmp_path / "out"))
    assert output.run_info["permutation"]["importance"] == "magnitude" and len(output.run_info.permuted_layers) == 4
    assert output.report.all_2to4


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["prune", "MODEL", "--method", "magnitude", "--permute-importance", "ria", "-o", "OUT"],
            r"`--permute-importance`='ria' needs `--permute` \(yes or auto\)\.$",
        ),
        (
            ["prune", "GPT2", "--method", "magnitude", "--permute", "-o", "OUT"],
            r"`model_type`='gpt2' is not supported by the channel permutation; allowed: llama, mistral, qwen2\.$",
        ),
        (
            ["prune", "MODEL", "--method", "magnitude", "--permute", "--permute-importance", "size", "-o", "OUT"],
            r"invalid choice: 'size'",
        ),
        (
            ["learn", "GPT2", "--permute", "yes", "-o", "OUT", *CALIB[:-1]],
            r"`model_type`='gpt2' is not supported by the channel permutation; allowed: llama, mistral, qwen2\.$",
        ),
        (
            ["learn", "MODEL", "--no-permute", "--permute-importance", "ria", "-o", "OUT", *CALIB[:-1]],
            r"`--permute-importance`='ria' needs `--permute` \(yes or auto\)\.$",
        ),
        (["learn", "MODEL", "--permute", "maybe", "-o", "OUT", *CALIB[:-1]], r"invalid choice: 'maybe'"),
        (
            ["compare", "MODEL", "--methods", "dense,wanda+permutation", "-o", "OUT", *CALIB],
            r"`--methods`='dense,wanda\+permutation' is invalid; .* followed by '\+perm'\.$",
        ),
    ],
)
def test_bad_flags_are_one_line_errors_before_loading(argv, pattern, workspace, tmp_path, capsys, monkeypatch):
    from proxsparse_hf import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(loading, "load_model", refuse)
    with pytest.raises(SystemExit) as exc:
        cli_main(_argv(argv, workspace, tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_quality_benchmark_runs_with_and_without_permutation(workspace, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from proxsparse_hf.evaluation import load_comparison

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    calib = str(workspace / "calib.jsonl")
    experiment = {
        "model": str(workspace / "model"),
        "calibration": {"dataset": calib, "seq_len": 16, "n_samples": 4},
        "evaluation": {"datasets": [calib], "seq_len": 16, "batch_size": 2, "max_windows": 2},
        "runs": [
            {"name": "wanda", "method": "wanda"},
            {"name": "wanda+perm", "method": "wanda", "permute": {}},
        ],
    }
    (tmp_path / "exp.json").write_text(json.dumps(experiment))
    out = tmp_path / "perm.json"
    assert quality.main([str(tmp_path / "exp.json"), "--output", str(out), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    assert lines[1]["name"] == "wanda+perm" and lines[1]["pruned_importance_change"] < 0
    rows = {r.label: r for r in load_comparison(out)}
    assert rows["wanda+perm"].method_config["permutation"]["importance"] == "activation"
    assert all(r.sparsity["all_2to4"] for r in rows.values())
    assert "* `wanda+perm`: 4 layers permuted (activation, hungarian)" in (tmp_path / "perm.md").read_text()


def test_permutation_search_benchmark_measures_every_refinement_and_the_residual_stream(workspace, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "permutation_search.py"
    spec = importlib.util.spec_from_file_location("permutation_search", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "search.json"
    argv = ["--model", str(workspace / "model"), "--output", str(out), "--refine", "none,swap", "--rounds", "1"]
    assert script.main([*argv, "--residual", "--residual-layers", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["command"] == "python benchmarks/permutation_search.py " + " ".join(
        [*argv, "--residual", "--residual-layers", "2", "--device", "cpu"]
    )
    assert "torch" in data["versions"] and data["hardware"]
    search = [r for r in data["results"] if r["measurement"] == "search"]
    assert [r["refine"] for r in search] == ["none", "swap"]
    for row in search:  # never worse than the identity order, per layer kind and in total
        assert row["pruned_change"] <= 0 and row["pruned_change_o_proj"] <= 0 and row["pruned_change_down_proj"] <= 0
    assert search[1]["pruned_change"] <= search[0]["pruned_change"]  # refining improves on the allocation alone
    shared = [r for r in data["results"] if r["measurement"] == "residual-shared"]
    assert len(shared) == 1 and shared[0]["layers"] == 10  # q/k/v/gate/up of the tiny model's 2 blocks
    per_layer = [r for r in data["results"] if r["measurement"] == "residual-per-layer"]
    assert len(per_layer) == 2 and all(r["pruned_change_own"] <= 0 for r in per_layer)
    with pytest.raises(SystemExit):
        script.main(["--output", str(out), "--refine", "greedy"])


def test_input_norms_read_only_the_first_max_windows():
    """A large calibration set costs no extra pass: the norms come from the first ``max_windows`` windows, so the
    permutation equals the one computed on those windows alone, and differs from the one on all of them."""
    from proxsparse_hf.pruners.capture import CalibrationBatches

    windows = torch.cat([random_windows(3, 16, seed=1), random_windows(5, 16, seed=2) * 0 + 7])
    first = {}
    for calibration, max_windows in ((windows, 3), (windows[:3], None), (windows, None)):
        model = tiny_model("llama")
        report = permute_channels(
            model, importance="activation", calibration=calibration, batch_size=2, max_windows=max_windows
        )
        first[(calibration.shape[0], max_windows)] = {k: v.clone() for k, v in report.permutations.items()}
    capped, alone, everything = first[(8, 3)], first[(3, None)], first[(8, None)]
    assert all(torch.equal(capped[k], alone[k]) for k in capped)
    assert any(not torch.equal(capped[k], everything[k]) for k in capped)
    batches = CalibrationBatches.from_any(windows, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches.first(3).batches] == [2, 1]
    assert batches.first(100).num_samples == 8
    with pytest.raises(ValueError, match=r"`max_windows`=0 is invalid; allowed: None or an integer >= 1\."):
        permute_channels(tiny_model("llama"), importance="activation", calibration=windows, max_windows=0)


def test_permute_auto_decides_from_the_architecture_and_the_launch(monkeypatch):
    """``--permute auto`` permutes a supported architecture in a single-process run only; ``yes`` insists (and
    refuses an unsupported one); ``no`` never permutes."""
    import argparse

    from proxsparse_hf.commands.common import resolve_permutation

    llama, gpt2 = tiny_config("llama"), tiny_config("gpt2")

    def args(permute, fsdp=False):
        return argparse.Namespace(permute=permute, fsdp=fsdp)

    assert resolve_permutation(args("auto"), "activation", llama) == "activation"
    assert resolve_permutation(args("auto"), "activation", gpt2) is None
    assert resolve_permutation(args("auto", fsdp=True), "activation", llama) is None
    assert resolve_permutation(args("no"), None, llama) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / accelerate launch: every rank would search on its own
    assert resolve_permutation(args("auto"), "activation", llama) is None
    assert resolve_permutation(args("yes"), "activation", llama) == "activation"
    with pytest.raises(ValueError, match=r"`model_type`='gpt2' is not supported"):
        resolve_permutation(args("yes"), "activation", gpt2)
