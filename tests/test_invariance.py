"""Scale-free mask learning: the relative step (``step_scaling="weight_rms"``) and the function-preserving rescaling that
tests it. A model and a copy with the same function but target weights at another scale must learn the same mask."""

import math

import pytest
import torch
from tiny_models import random_windows, tiny_model
from torch import nn

from proxsparse_hf import ProxSparseConfig
from proxsparse_hf.data import TokenWindows
from proxsparse_hf.learning.learner import MaskLearner
from proxsparse_hf.learning.rescale import INPUT_SIDE_PROJECTIONS, rescale_function_preserving
from proxsparse_hf.learning.step_scaling import RMS_KEY, relative_adam, relative_optimizer, relative_param_groups
from proxsparse_hf.learning.trainer import learn_mask

RELATIVE = dict(lambda1=0.5, lambda_scaling="weight_scale", step_scaling="weight_rms")


def _llama_02(seed: int = 0):
    """The issue's model: a tiny Llama, hidden 128, 2 layers, ``initializer_range=0.2``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config)


def _identical_groups(a: dict, b: dict, parts=INPUT_SIDE_PROJECTIONS) -> float:
    same = total = 0
    for name, mask in a.items():
        if any(f".{p}." in name for p in parts):
            same += int((mask.reshape(-1, 4) == b[name].reshape(-1, 4)).all(dim=1).sum())
            total += mask.numel() // 4
    return same / total


def _factors(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj') else 'mlp'}.{p}": math.exp(
            float(torch.empty(()).uniform_(math.log(0.2), math.log(5.0), generator=gen))
        )
        for i in range(len(model.model.layers))
        for p in INPUT_SIDE_PROJECTIONS
    }


# ---------------------------------------------------------------------------------------------------------------------
# the rescaling helper


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("mode", ["uniform", "per_layer"])
def test_rescaling_preserves_the_logits(family, mode):
    model = tiny_model(family)
    ids = random_windows(2, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    factors = 0.1 if mode == "uniform" else _factors(model)
    applied = rescale_function_preserving(model, factors)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert len(applied) == 7 * len(model.model.layers)
    for name, factor in applied.items():
        torch.testing.assert_close(model.state_dict()[name], before[name] * factor)
        if mode == "uniform":
            expected = 1.0 if (".o_proj." in name or ".down_proj." in name) else 0.1
            assert factor == pytest.approx(expected)
    if mode == "per_layer":  # every target is rescaled, o_proj and down_proj by the compensating factors
        assert all(abs(math.log(f)) > 1e-3 for f in applied.values())
    norm = "model.layers.0.input_layernorm.weight"
    if mode == "uniform":
        torch.testing.assert_close(model.state_dict()[norm], before[norm] * 10)


def test_rescaling_errors():
    with pytest.raises(ValueError, match="has no Llama-like decoder layer"):
        rescale_function_preserving(tiny_model("gpt2"), 2.0)
    with pytest.raises(ValueError, match=r"allowed: a finite number > 0"):
        rescale_function_preserving(tiny_model("llama"), 0.0)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match=r"no entry for `model.layers.0.self_attn.q_proj`"):
        rescale_function_preserving(model, {"model.layers.1.mlp.up_proj": 2.0})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed on error


# ---------------------------------------------------------------------------------------------------------------------
# the relative step


def _one_step(model, config, optimizer_cls=torch.optim.AdamW, lr=0.01, steps=1, **opt_kwargs):
    """``steps`` steps of the learner's custom-loop protocol without a prox step (prox_every_n_steps > steps)."""
    learner = MaskLearner(model, ProxSparseConfig(**config, prox_every_n_steps=100))
    learner.freeze_non_targets()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr, **opt_kwargs)
    grads = {}
    for step in range(1, steps + 1):
        ids = random_windows(2, 16, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {t.param_name: t.weight.grad.clone() for t in learner.targets.values()}
        learner.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        assert learner.after_optimizer_step(step, 100) is False  # no prox: the change is the optimizer's alone
    return learner, grads


def test_one_step_on_a_layer_scaled_by_c_moves_it_c_times_as_much():
    c = 0.1
    original, copy = tiny_model("llama"), tiny_model("llama")
    factors = rescale_function_preserving(copy, c)
    w0 = {k: v.clone() for k, v in original.state_dict().items()}
    w0_copy = {k: v.clone() for k, v in copy.state_dict().items()}
    learner, grads = _one_step(original, RELATIVE)
    _one_step(copy, RELATIVE)
    for name, factor in factors.items():
        moved = original.state_dict()[name] - w0[name]
        moved_copy = copy.state_dict()[name] - w0_copy[name]
        rms = float(w0[name].pow(2).mean().sqrt())
        assert moved.abs().max() > 0
        # (weights whose gradient is near Adam's eps are sensitive to the rounding of their gradient: atol 0.5 % of a step)
        torch.testing.assert_close(moved_copy, moved * factor, rtol=1e-3, atol=5e-3 * 0.01 * rms * factor)
        # AdamW's first step on w = W/r with gradient g_w = r·g is -lr·g_w/(|g_w| + eps) - lr·wd·w: in W, r times that
        assert learner.weight_rms[name] == pytest.approx(rms, rel=1e-6)
        g_w = rms * grads[name]
        expected = -0.01 * rms * g_w / (g_w.abs() + 1e-8) - 0.01 * 0.01 * w0[name]
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-9)
    # today's absolute step moves both copies by the same ±lr
    absolute, absolute_copy = tiny_model("llama"), tiny_model("llama")
    rescale_function_preserving(absolute_copy, c)
    _one_step(absolute, dict(lambda1=0.5))
    _one_step(absolute_copy, dict(lambda1=0.5))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert float((absolute.state_dict()[name] - w0[name]).abs().max()) == pytest.approx(0.01, rel=1e-3)
    assert float((absolute_copy.state_dict()[name] - w0_copy[name]).abs().max()) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_relative_param_groups_take_exactly_the_relative_adamw_step(weight_decay):
    """For AdamW the relative step is one parameter group per layer with ``lr · r``, ``eps / r`` and
    ``weight_decay / r`` (``r = RMS(W0)``): the groups of ``relative_param_groups`` move the weights as the rescaling
    passes do, and a learner that attaches them skips those passes."""
    relative, grouped = tiny_model("llama"), tiny_model("llama")
    learner, _ = _one_step(relative, RELATIVE, steps=3, lr=0.02, weight_decay=weight_decay)
    reference = MaskLearner(grouped, ProxSparseConfig(**RELATIVE, prox_every_n_steps=100))
    reference.freeze_non_targets()
    groups = relative_param_groups(grouped, reference.config, learning_rate=0.02, weight_decay=weight_decay)
    assert len(groups) == len(reference.targets)  # non-targets are frozen: one group per target, nothing else
    optimizer = torch.optim.AdamW(groups, lr=0.02)
    assert reference.attach_optimizer(optimizer) == len(reference.targets)
    before = {t.param_name: t.weight.detach().clone() for t in reference.targets.values()}
    for step in range(1, 4):
        ids = random_windows(2, 16, seed=step)
        grouped(input_ids=ids, labels=ids).loss.backward()
        reference.before_optimizer_step()  # no pass left: the weights are untouched until the optimizer's step
        assert all(torch.equal(t.weight, before[t.param_name]) for t in reference.targets.values())
        optimizer.step()
        optimizer.zero_grad()
        reference.after_optimizer_step(step, 100)
        before = {t.param_name: t.weight.detach().clone() for t in reference.targets.values()}
    for t in reference.targets.values():
        assert optimizer.param_groups[0][RMS_KEY] > 0
        torch.testing.assert_close(relative.state_dict()[t.param_name], t.weight.detach(), rtol=1e-5, atol=1e-7)


def test_attaching_relative_groups_checks_the_recipe_and_the_scale():
    model = tiny_model("llama")
    absolute = MaskLearner(model, ProxSparseConfig(lambda1=0.5))
    groups = relative_param_groups(model, absolute.config, learning_rate=0.01)
    with pytest.raises(ValueError, match="step_scaling`='none'"):
        absolute.attach_optimizer(torch.optim.AdamW(groups))
    assert absolute.attach_optimizer(torch.optim.AdamW(model.parameters())) == 0  # a plain optimizer: nothing to do
    learner = MaskLearner(model, ProxSparseConfig(**RELATIVE))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # built on moved weights: its RMS is not the snapshot's
    moved = relative_param_groups(model, learner.config, learning_rate=0.01)
    with pytest.raises(ValueError, match="records RMS .* the original weights have"):
        learner.attach_optimizer(torch.optim.AdamW(moved))


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi", "unnamed-norm"])
def test_non_target_groups_split_weight_decay_as_the_trainer_does(family, tmp_path):
    """With ``train_non_target_params`` the other trainable parameters keep absolute steps, and weight decay falls on
    exactly the parameters the Trainer decays (not biases, not LayerNorm weights), in families that have both and in
    a model whose LayerNorm's name says nothing of a norm (the Trainer goes by its type)."""
    from transformers import Trainer, TrainingArguments

    if family == "unnamed-norm":
        model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16))
        config = ProxSparseConfig(**RELATIVE, target_modules=["0"])
    else:
        model = tiny_model(family)
        config = ProxSparseConfig(**RELATIVE, target_modules="all-linear")
    groups = relative_param_groups(model, config, learning_rate=0.01, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    relative = {names[id(p)] for g in groups if RMS_KEY in g for p in g["params"]}
    decayed = {names[id(p)] for g in groups if RMS_KEY not in g and g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if RMS_KEY not in g and g["weight_decay"] == 0 for p in g["params"]}
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # a tied weight once, by its first name
    assert decayed == (set(trainer.get_decay_parameter_names(model)) & trainable) - relative
    assert decayed | plain | relative == trainable
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert norms and norms <= plain and any(n.endswith("bias") for n in plain)


def test_relative_adam_builds_the_trainers_optimizer_and_refuses_others(tmp_path):
    from transformers import TrainingArguments

    model = tiny_model("llama")
    config = ProxSparseConfig(**RELATIVE)
    args = TrainingArguments(str(tmp_path), learning_rate=0.02, weight_decay=0.1, optim="adamw_torch", use_cpu=True)
    optimizer = relative_adam(model, config, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    relative = [g for g in optimizer.param_groups if RMS_KEY in g]
    assert len(relative) == len(optimizer.param_groups) == len(MaskLearner(model, config).targets)  # rest frozen
    for group in relative:
        r = group[RMS_KEY]
        assert r == pytest.approx(float(group["params"][0].detach().pow(2).mean().sqrt()), rel=1e-6)
        assert (group["lr"], group["eps"], group["weight_decay"]) == pytest.approx((0.02 * r, 1e-8 / r, 0.1 / r))
    sgd = TrainingArguments(str(tmp_path), optim="sgd", use_cpu=True)
    with pytest.raises(ValueError, match="`optim`='sgd' builds SGD; relative_adam needs torch's Adam/AdamW"):
        relative_adam(tiny_model("llama"), config, sgd)


def test_relative_optimizer_only_where_the_groups_apply(tmp_path, monkeypatch):
    """``learn_mask``'s choice: the relative groups for Adam/AdamW on weights the Trainer does not shard, else None
    (the Trainer's optimizer with the callback's rescaling)."""
    from transformers import TrainingArguments

    relative = ProxSparseConfig(**RELATIVE)

    def args(**kw):
        return TrainingArguments(str(tmp_path), learning_rate=0.02, use_cpu=True, **kw)

    built = relative_optimizer(tiny_model("llama"), relative, args(optim="adamw_torch"))
    assert isinstance(built, torch.optim.AdamW) and all(RMS_KEY in g for g in built.param_groups)
    assert relative_optimizer(tiny_model("llama"), ProxSparseConfig(lambda1=0.5), args()) is None  # absolute steps
    assert relative_optimizer(tiny_model("llama"), relative, args(optim="sgd")) is None
    assert relative_optimizer(tiny_model("llama"), relative, args(optim="adafactor")) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an `accelerate launch` with FSDP shards the weights
    assert relative_optimizer(tiny_model("llama"), relative, args()) is None


def test_learn_mask_takes_relative_steps_through_parameter_groups():
    """``learn_mask`` with the recommended recipe hands the Trainer the relative groups (no rescaling passes); with
    another optimizer the callback rescales."""
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(sum(RMS_KEY in g for g in optimizer.param_groups))

    data = TokenWindows(random_windows(8, 16))
    for optim in ("adamw_torch", "sgd"):
        model = tiny_model("llama")
        result = learn_mask(model, data, ProxSparseConfig.recommended(), max_steps=2, callbacks=[Spy()], optim=optim)
        assert result.report.num_2to4_layers == len(result.masks)
    assert seen == [len(MaskLearner(tiny_model("llama"), ProxSparseConfig.recommended()).targets), 0]


def test_relative_sgd_works_in_layer_units():
    """Any optimizer sees ``w = W / r``: plain SGD moves ``W`` by ``−lr · r² · ∂L/∂W``."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner, grads = _one_step(model, RELATIVE, optimizer_cls=torch.optim.SGD, lr=100.0)
    for name, grad in grads.items():
        r = learner.weight_rms[name]
        # (atol: the float32 rounding of dividing and multiplying W by r, a few 1e-9 at |W| ~ 0.1)
        torch.testing.assert_close(
            model.state_dict()[name] - before[name], -100.0 * r * r * grad, rtol=1e-3, atol=2e-8
        )


def test_frozen_weight_term_is_taken_in_layer_units():
    """With the relative step the λ2 term is the paper's term on ``W / RMS(W0)`` (ε relative to the layer scale)."""
    model = tiny_model("llama")
    learner = MaskLearner(model, ProxSparseConfig(**RELATIVE, lambda2=2.0, epsilon=0.1))
    learner.freeze_non_targets()
    t = next(iter(learner.targets.values()))
    with torch.no_grad():
        t.weight.mul_(0.9)
    r = learner.weight_rms[t.param_name]
    w = (t.weight.detach().clone() / r).requires_grad_(True)
    w0 = learner.original[t.param_name] / r
    a = 1.0 / (w0 + 0.1 * torch.where(w0 >= 0, 1.0, -1.0))
    (2.0 * ((w * (w - w0) * a) ** 2).sum()).backward()  # d/dW = d/dw / r
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    learner.add_frozen_weight_grad()
    torch.testing.assert_close(t.weight.grad, w.grad / r, rtol=1e-4, atol=1e-6)


def test_the_layer_scale_comes_from_the_snapshot_on_resume():
    """A learner restored from a snapshot (resume) gets RMS(W0) of the snapshot, not of the moved weights."""
    model = tiny_model("llama")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    first = MaskLearner(model, ProxSparseConfig(**RELATIVE))
    with torch.no_grad():
        for t in first.targets.values():
            t.weight.mul_(3.0)
    resumed = MaskLearner(model, ProxSparseConfig(**RELATIVE), original=snapshot)
    assert resumed.weight_rms == pytest.approx(first.weight_rms, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# issue #21 "Done when", in miniature


def test_recommended_recipe_learns_the_same_mask_on_a_rescaled_copy():
    """The recommended recipe with its default (relative) learning rate learns >= 90 % identical 2:4 groups in
    q/k/v/gate/up on a model and on its copy with those weights × 0.1 and the norms × 10 (identical logits); the
    absolute step of the published setting does not."""
    data = TokenWindows(random_windows(160, 32))
    ids = random_windows(2, 32, seed=5)
    model, copy = _llama_02(), _llama_02()
    rescale_function_preserving(copy, 0.1)
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    kwargs = dict(max_steps=40, per_device_train_batch_size=4)
    masks = learn_mask(model, data, ProxSparseConfig.recommended(), **kwargs).masks
    masks_copy = learn_mask(copy, data, ProxSparseConfig.recommended(), **kwargs).masks
    assert _identical_groups(masks, masks_copy) >= 0.9
    # the same recipe with absolute steps (step_scaling="none", the published setting's) at the same step on the
    # original model (lr 0.01 · RMS 0.2) is not scale-free
    absolute = ProxSparseConfig.recommended(step_scaling="none")
    model, copy = _llama_02(), _llama_02()
    rescale_function_preserving(copy, 0.1)
    masks = learn_mask(model, data, absolute, learning_rate=2e-3, **kwargs).masks
    masks_copy = learn_mask(copy, data, absolute, learning_rate=2e-3, **kwargs).masks
    assert _identical_groups(masks, masks_copy) < 0.8
