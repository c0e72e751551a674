"""importance="activation": the prox and the final top-2 act on |W|·s (Wanda's score) instead of |W|."""

import pytest
import torch
from test_callback import _check_pruned, _train
from tiny_models import random_windows, tiny_model

from proxsparse_hf import ProxSparseConfig
from proxsparse_hf.learning.learner import INPUT_NORMS_NAME, SNAPSHOT_NAME, MaskLearner
from proxsparse_hf.learning.prox import prox_2to4
from proxsparse_hf.pruners.wanda import wanda_mask

ACT = dict(importance="activation", importance_batches=2)


def _batches(n=3, seed=0):
    windows = random_windows(2 * n, 16, seed=seed)
    return [{"input_ids": windows[2 * i : 2 * i + 2], "labels": windows[2 * i : 2 * i + 2]} for i in range(n)]


def _reference_norms(model, learner, batches):
    """‖X_j‖₂ of every target's input, recorded independently with forward hooks."""
    sums, handles = {}, []
    for t in learner.targets.values():

        def hook(module, args, name=t.param_name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        handles.append(t.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for h in handles:
        h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norms_are_measured_on_the_first_batches(family):
    model = tiny_model(family)
    learner = MaskLearner(model, ProxSparseConfig(lambda1=1.0, **ACT))
    assert learner.needs_input_norms
    batches = _batches(3)
    norms = learner.measure_input_norms(batches)
    assert not learner.needs_input_norms
    expected = _reference_norms(model, learner, batches[:2])  # importance_batches=2: the third batch is not used
    assert norms.keys() == expected.keys()
    for name in norms:
        torch.testing.assert_close(norms[name], expected[name], rtol=1e-5, atol=1e-6)
    assert model.training is False  # the mode the model was in is restored


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_learning_the_mask_is_wandas(family):
    model = tiny_model(family)
    learner = MaskLearner(model, ProxSparseConfig(lambda1=1.0, **ACT))
    norms = learner.measure_input_norms(_batches())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = learner.finalize()
    for t in learner.targets.values():
        expected = wanda_mask(original[t.param_name], norms[t.param_name], transposed=t.transposed)
        assert torch.equal(masks[t.param_name], expected), t.name


def test_prox_runs_in_scaled_coordinates():
    model = tiny_model("llama")
    config = ProxSparseConfig(lambda1=0.3, lambda_scaling="weight_scale", solver_backend="torch", **ACT)
    learner = MaskLearner(model, config)
    learner.measure_input_norms(_batches())
    t = next(iter(learner.targets.values()))
    before = t.weight.detach().clone()
    scale = learner.column_scale[t.param_name]
    assert scale.shape == (before.shape[1],)
    torch.testing.assert_close(scale.pow(2).mean(), torch.tensor(1.0))  # RMS-normalised
    w0_scaled = learner.original[t.param_name] * scale
    torch.testing.assert_close(learner.layer_scale[t.param_name], 1.0 / float(w0_scaled.pow(2).mean().sqrt()))
    assert learner.prox_step(1, 10)
    lam = 0.3 * learner.layer_scale[t.param_name]
    expected = prox_2to4(before * scale, lam, backend="torch") / scale
    torch.testing.assert_close(t.weight.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_callback_end_to_end(family, tmp_path):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = ProxSparseConfig(lambda1=2.0, lambda_scaling="weight_scale", **ACT)
    trainer, cb = _train(model, tmp_path, config)
    _check_pruned(model, original, cb)
    assert cb.report.all_2to4 and set(cb.learner.input_norms) == set(cb.masks)
    history = [h for h in trainer.state.log_history if "proxsparse/frac_2to4" in h]
    assert history and history[-1]["proxsparse/frac_2to4"] > 0


def test_resume_restores_the_norms_and_gives_identical_masks(tmp_path):
    config = ProxSparseConfig(lambda1=2.0, lambda_scaling="weight_scale", **ACT)
    _, full = _train(tiny_model("llama"), tmp_path, config, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "trainer" / "checkpoint-3"
    assert (checkpoint / SNAPSHOT_NAME).is_file() and (checkpoint / INPUT_NORMS_NAME).is_file()
    saved = MaskLearner.load_input_norms(checkpoint)
    assert all(torch.equal(saved[k], full.learner.input_norms[k]) for k in saved)
    model = tiny_model("llama")
    _, resumed = _train(model, tmp_path, config, resume=str(checkpoint), save_strategy="steps", save_steps=3)
    assert all(torch.equal(full.masks[k], resumed.masks[k]) for k in full.masks)
    _check_pruned(model, tiny_model("llama").state_dict(), resumed)


def test_errors():
    with pytest.raises(ValueError, match="`importance`='wanda' is invalid; allowed: one of"):
        ProxSparseConfig(importance="wanda")
    with pytest.raises(ValueError, match="`importance_batches`=0 is invalid"):
        ProxSparseConfig(importance_batches=0)
    model = tiny_model("llama")
    learner = MaskLearner(model, ProxSparseConfig(lambda1=1.0, **ACT))
    with pytest.raises(RuntimeError, match="measure the input norms"):
        learner.prox_step(1, 10)
    with pytest.raises(RuntimeError, match="never measured"):
        learner.finalize()
    name = next(iter(learner.targets.values())).param_name
    norms = {t.param_name: torch.ones(4) for t in learner.targets.values()}
    with pytest.raises(ValueError, match=f"Input norms of `{name}`: expected 64 finite values"):
        learner.set_input_norms(norms)
    with pytest.raises(KeyError, match="no entry for target"):
        learner.set_input_norms({})
    plain = MaskLearner(model, ProxSparseConfig(lambda1=1.0))
    with pytest.raises(ValueError, match="only used with `importance`='activation'"):
        plain.set_input_norms(norms)


def test_recipes():
    from proxsparse_hf.config import RECIPES, recipe_learning_rate

    rec = ProxSparseConfig.recommended()
    assert (rec.importance, rec.lambda_scaling, rec.lambda1) == ("activation", "weight_scale", 0.03)
    assert recipe_learning_rate(rec) == 3e-3
    pub = ProxSparseConfig.from_recipe("published", lambda1=8.0)
    assert (pub.importance, pub.lambda_scaling, pub.lambda1) == ("magnitude", "none", 8.0)
    assert recipe_learning_rate(pub) == 1e-4 == RECIPES["published"]["learning_rate"]
    assert ProxSparseConfig.recommended(lambda2=1.0).lambda2 == 1.0
    with pytest.raises(ValueError, match="`recipe`='best' is invalid; allowed: one of"):
        ProxSparseConfig.from_recipe("best")
    with pytest.raises(ValueError, match="`lambda1`=-1"):
        ProxSparseConfig.recommended(lambda1=-1)


@pytest.mark.parametrize("recipe", ["recommended", "published"])
def test_cli_recipe_sets_config_and_learning_rate(recipe, tmp_path, capsys):
    import json

    from tiny_models import tiny_corpus, tiny_tokenizer

    from proxsparse_hf.artefacts.output_dir import load_output_dir
    from proxsparse_hf.cli import main

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in tiny_corpus(20)))
    argv = ["learn", str(tmp_path / "model"), "--dataset", str(tmp_path / "calib.jsonl"), "--seq-len", "32"]
    argv += ["--n-samples", "4", "--max-steps", "2", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--recipe", recipe]) == 0
    result = load_output_dir(tmp_path / "out")
    expected = ProxSparseConfig.from_recipe(recipe)
    assert (result.config.importance, result.config.lambda_scaling, result.config.lambda1) == (
        expected.importance,
        expected.lambda_scaling,
        expected.lambda1,
    )
    assert result.run_info["training"]["learning_rate"] == (3e-3 if recipe == "recommended" else 1e-4)
    assert result.report.all_2to4
