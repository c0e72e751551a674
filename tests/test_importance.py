"""Importance measures: the registry (a toy measure registered, used and removed), and importance="activation", where
the prox and the final top-2 act on |W|·s (Wanda's score) instead of |W|."""

import pytest
import torch
from test_callback import _check_pruned, _train
from tiny_models import random_windows, tiny_model

from proxsparse_hf import ProxSparseConfig
from proxsparse_hf.learning.importance import (
    ImportanceMeasure,
    get_importance,
    importance_names,
    register_importance,
    unregister_importance,
)
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
    with pytest.raises(RuntimeError, match="`importance`='activation': measure the input norms"):
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
    with pytest.raises(ValueError, match="not used by `importance`='magnitude'"):
        plain.set_input_norms(norms)


# ---------------------------------------------------------------------------------------------------------------------
# the registry


def test_built_in_measures():
    assert importance_names()[:2] == ("magnitude", "activation")
    magnitude, activation = get_importance("magnitude"), get_importance("activation")
    assert (magnitude.label, magnitude.needs_input_norms) == ("|W| (magnitude)", False)
    assert (activation.label, activation.needs_input_norms) == ("|W|·‖X‖ (activation)", True)
    scale = activation.column_scale(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # RMS of the norms: sqrt(14 / 4)
    torch.testing.assert_close(scale, torch.tensor([1e-3, 1.0 / 3.5**0.5, 2.0 / 3.5**0.5, 3.0 / 3.5**0.5]))
    torch.testing.assert_close(activation.column_scale(torch.zeros(4)), torch.ones(4))  # all dead: no scaling


def test_a_registered_toy_importance_learns_a_mask(tmp_path):
    """One class and one decorator: the config accepts the name, the callback measures the norms the measure asks for
    and the prox and the mask use its column scale; unregistered, the name is refused again."""

    @register_importance(
        "toy-first", label="toy", description="the first weight of every group wins", needs_input_norms=True
    )
    class FirstOfGroup(ImportanceMeasure):
        def column_scale(self, input_norms):
            scale = torch.ones_like(input_norms)
            scale[0::4] = 100.0
            return scale

    try:
        assert get_importance("toy-first").label == "toy" and "toy-first" in importance_names()
        model = tiny_model("llama")
        original = {k: v.clone() for k, v in model.state_dict().items()}
        config = ProxSparseConfig(
            lambda1=2.0, lambda_scaling="weight_scale", importance="toy-first", importance_batches=2
        )
        _, cb = _train(model, tmp_path, config)
        _check_pruned(model, original, cb)
        assert cb.report.all_2to4 and set(cb.learner.input_norms) == set(cb.masks)
        for name, mask in cb.masks.items():  # the toy scale decided the mask (|W| alone keeps the first weight ~50 %)
            assert mask.reshape(-1, 4)[:, 0].float().mean() > 0.9, name
    finally:
        unregister_importance("toy-first")
    assert "toy-first" not in importance_names()
    with pytest.raises(ValueError, match="`importance`='toy-first' is invalid"):
        ProxSparseConfig(importance="toy-first")


def test_registry_errors():
    with pytest.raises(ValueError, match="`name`='Bad Name' is invalid"):
        register_importance("Bad Name", label="x", description="")
    with pytest.raises(ValueError, match="`label`='' is invalid"):
        register_importance("ok", label="", description="")
    with pytest.raises(ValueError, match="named 'magnitude' is already registered"):
        register_importance("magnitude", label="again", description="")(type("Again", (ImportanceMeasure,), {}))
    with pytest.raises(TypeError, match="decorates a subclass of ImportanceMeasure"):
        register_importance("not-a-measure", label="x", description="")(object)
    with pytest.raises(ValueError, match="built-in importance measure and cannot be unregistered"):
        unregister_importance("activation")
    with pytest.raises(ValueError, match="`name`='nothing' is not a registered importance measure"):
        unregister_importance("nothing")
    with pytest.raises(ValueError, match=r"`importance`='nothing' is invalid; allowed: one of \('magnitude'"):
        get_importance("nothing")

    @register_importance("toy-bad-scale", label="bad", description="", needs_input_norms=True)
    class BadScale(ImportanceMeasure):
        def column_scale(self, input_norms):
            return -torch.ones_like(input_norms)

    try:
        learner = MaskLearner(tiny_model("llama"), ProxSparseConfig(importance="toy-bad-scale"))
        with pytest.raises(ValueError, match=r"`importance`='toy-bad-scale': column_scale\(\) of `.*` must return 64"):
            learner.measure_input_norms(_batches())
    finally:
        unregister_importance("toy-bad-scale")


@pytest.mark.parametrize("recipe", ["recommended", "published"])
def test_cli_recipe_sets_config_and_learning_rate(recipe, tmp_path, capsys):
    import json

    from tiny_models import tiny_corpus, tiny_tokenizer

    from proxsparse_hf.artefacts import load_output_dir
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
    from proxsparse_hf.config import RECIPES

    training = result.run_info["training"]
    assert training["learning_rate"] == RECIPES[recipe]["learning_rate"]
    # the recommended recipe's learning rate is relative and trains without global gradient clipping
    assert training["learning_rate_is_relative"] is (recipe == "recommended")
    assert training["max_grad_norm"] == (0.0 if recipe == "recommended" else 1.0)
    assert result.report.all_2to4
