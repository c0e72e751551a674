"""ProxSparseCallback on a real transformers.Trainer with tiny random models (CPU)."""

import glob
import os

import pytest
import torch
from tiny_models import random_windows, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from proxsparse_hf import ProxSparseConfig, extract_2to4_masks, is_2to4
from proxsparse_hf.data import TokenWindows
from proxsparse_hf.learning.learner import SNAPSHOT_NAME, MaskLearner
from proxsparse_hf.learning.prox import Prox2to4Batch
from proxsparse_hf.learning.regularizers import frozen_weight_grad
from proxsparse_hf.learning.step_scaling import relative_adam
from proxsparse_hf.learning.trainer import warmup_arguments
from trainer_callbacks import ProxSparseCallback


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "trainer"),
        learning_rate=5e-3,
        max_steps=6,
        per_device_train_batch_size=2,
        **warmup_arguments(0.1),
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train(model, tmp_path, config, callbacks=(), resume=None, relative_groups=False, **kw):
    """Train with the callback; ``relative_groups``: the optimizer of ``relative_adam`` instead of the Trainer's."""
    data = TokenWindows(random_windows(16, 32))
    cb = ProxSparseCallback(config)
    args = _args(tmp_path, **kw)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[cb, *callbacks],
        optimizers=(relative_adam(model, config, args) if relative_groups else None, None),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def _check_pruned(model, original, cb):
    state = model.state_dict()
    masked = set(cb.masks)
    assert masked == {t.param_name for t in cb.learner.targets.values()}
    for name, value in state.items():
        if name in masked:
            t = next(t for t in cb.learner.targets.values() if t.param_name == name)
            assert is_2to4(value, dim=0 if t.transposed else -1), name
            keep = cb.masks[name]
            assert torch.equal(value[keep], original[name][keep]), name  # surviving = original, bit for bit
            assert (value[~keep] == 0).all()
        else:
            assert torch.equal(value, original[name]), f"non-target {name} changed"


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_end_to_end(family, tmp_path):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, cb = _train(model, tmp_path, ProxSparseConfig(lambda1=2.0, lambda_scaling="weight_scale"))
    assert trainer.model is model
    _check_pruned(model, original, cb)
    assert cb.report.all_2to4 and cb.report.target_sparsity == 0.5
    history = [h for h in trainer.state.log_history if "loss" in h]
    frac = [h["proxsparse/frac_2to4"] for h in history]
    assert frac[-1] > frac[0] >= 0  # the prox pushes groups to 2:4 during training
    assert all(h["proxsparse/dist_to_original"] > 0 for h in history)


def test_masks_come_from_learning_not_magnitude(tmp_path):
    """With a strong prox the learned mask differs from magnitude pruning somewhere."""
    model = tiny_model("llama")
    magnitude = extract_2to4_masks(model)
    _, cb = _train(model, tmp_path, ProxSparseConfig(lambda1=5.0, lambda_scaling="weight_scale"), learning_rate=5e-2)
    assert any(not torch.equal(cb.masks[k], magnitude[k]) for k in magnitude)


def test_metrics_reach_log_history_later_callbacks_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = Recorder()
    trainer, cb = _train(
        tiny_model("llama"), tmp_path, ProxSparseConfig(lambda1=1.0), callbacks=[recorder], report_to=["tensorboard"]
    )
    keys = ["proxsparse/frac_2to4", "proxsparse/mask_flips", "proxsparse/regularizer", "proxsparse/dist_to_original"]
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert all(k in entry for k in keys)
    assert [r["proxsparse/frac_2to4"] for r in recorder.logs if "loss" in r] == [
        h["proxsparse/frac_2to4"] for h in train_logs
    ]
    tags = set()
    for path in glob.glob(str(tmp_path / "trainer" / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/loss" in tags
    assert {f"train/{k}" for k in keys[:1] + keys[2:]} <= tags


_RELATIVE = ProxSparseConfig(lambda1=2.0, lambda_scaling="weight_scale", step_scaling="weight_rms", lambda2=1.0)


@pytest.mark.parametrize(
    ("config", "relative_groups"),
    [(ProxSparseConfig(lambda1=2.0, lambda_scaling="weight_scale"), False), (_RELATIVE, False), (_RELATIVE, True)],
    ids=["absolute", "relative", "relative_groups"],
)
def test_resume_gives_bit_identical_masks(tmp_path, config, relative_groups):
    """Resuming restores the snapshot, and with it the per-layer scales (λ1's and the relative step's RMS(W0)); with
    the relative parameter groups of ``relative_adam`` the resumed optimizer's groups carry the same scales, and the
    learner leaves their steps to them."""
    lr = 5e-3 if config.step_scaling == "none" else 0.2  # a relative step: 20 % of the layer's RMS per unit step
    kw = dict(save_strategy="steps", save_steps=3, learning_rate=lr, relative_groups=relative_groups)
    _, full = _train(tiny_model("llama"), tmp_path / "a", config, **kw)
    checkpoint = tmp_path / "a" / "trainer" / "checkpoint-3"
    assert (checkpoint / SNAPSHOT_NAME).is_file()
    model = tiny_model("llama")
    _, resumed = _train(model, tmp_path / "a", config, resume=str(checkpoint), **kw)
    assert (resumed.learner._relative_step is None) == (relative_groups or config.step_scaling == "none")
    assert full.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(full.masks[k], resumed.masks[k]) for k in full.masks)
    assert resumed.learner.weight_rms == full.learner.weight_rms
    reference = tiny_model("llama").state_dict()  # resumed run still applies the masks to the ORIGINAL weights
    _check_pruned(model, reference, resumed)
    assert any(not torch.equal(full.masks[k], mask) for k, mask in extract_2to4_masks(tiny_model("llama")).items())


def test_resume_without_snapshot_is_a_clear_error(tmp_path):
    config = ProxSparseConfig(lambda1=1.0)
    _train(tiny_model("llama"), tmp_path, config, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "trainer" / "checkpoint-3"
    os.remove(checkpoint / SNAPSHOT_NAME)
    with pytest.raises(FileNotFoundError, match="original-weight snapshot"):
        _train(tiny_model("llama"), tmp_path, config, resume=str(checkpoint))


def _record_prox_strengths(monkeypatch) -> list[float]:
    """The λ of every batched prox call (one per prox step), in order."""
    calls: list[float] = []
    original_call = Prox2to4Batch.__call__

    def recording(self, lam):
        calls.append(lam)
        return original_call(self, lam)

    monkeypatch.setattr(Prox2to4Batch, "__call__", recording)
    return calls


def test_grad_accumulation_lambda2_and_prox_every(tmp_path, monkeypatch):
    """``prox_every_n_steps=2`` runs the prox at optimizer steps 2, 4, 6 only, and ``ramp`` gives it λ1·t/T there."""
    calls = _record_prox_strengths(monkeypatch)
    model = tiny_model("qwen2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = ProxSparseConfig(lambda1=1.0, lambda2=1.0, epsilon=0.1, prox_every_n_steps=2, lambda_schedule="ramp")
    _, cb = _train(model, tmp_path, config, gradient_accumulation_steps=2)
    assert calls == pytest.approx([2 / 6, 4 / 6, 6 / 6])
    _check_pruned(model, original, cb)


def test_lr_scaled_prox_uses_the_scheduled_learning_rate(tmp_path, monkeypatch):
    """``lambda_schedule="lr_scaled"``: λ1 times the learning rate of the step (linear schedule, 1 warm-up step of 6:
    0 at step 1, so no prox, then 5e-3·(6 − k)/5 for k = 1..5)."""
    calls = _record_prox_strengths(monkeypatch)
    config = ProxSparseConfig(lambda1=3.0, lambda_schedule="lr_scaled")
    _train(tiny_model("llama"), tmp_path, config)
    assert calls == pytest.approx([3.0 * 5e-3 * (6 - k) / 5 for k in range(1, 6)])
    learner = MaskLearner(tiny_model("llama"), config)
    with pytest.raises(ValueError, match="'lr_scaled' needs the current learning rate"):
        learner.prox_step(1, 6)


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path):
    model = tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, cb = _train(model, tmp_path, ProxSparseConfig(lambda1=1.0), gradient_checkpointing=True)
    _check_pruned(model, original, cb)
    assert [h for h in trainer.state.log_history if "loss" in h][-1]["proxsparse/dist_to_original"] > 0


def test_bf16_weights(tmp_path):
    model = tiny_model("mistral").to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _, cb = _train(model, tmp_path, ProxSparseConfig(lambda1=1.0, snapshot_device="same"))
    _check_pruned(model, original, cb)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


class _NonTargetsAtLastStep(TrainerCallback):
    """Copies the non-target parameters at the end of the last step, before ``on_train_end`` restores them."""

    def __init__(self, names):
        self.names, self.values = names, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps:
            self.values = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.names}


def test_train_non_target_params_are_restored(tmp_path):
    model = tiny_model("phi")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    targets = {t.param_name for t in MaskLearner(model, ProxSparseConfig()).targets.values()}
    recorder = _NonTargetsAtLastStep({n for n, _ in model.named_parameters()} - targets)
    config = ProxSparseConfig(lambda1=1.0, train_non_target_params=True)
    _, cb = _train(model, tmp_path, config, callbacks=[recorder], learning_rate=5e-2)
    changed = [n for n, value in recorder.values.items() if not torch.equal(value, original[n])]
    assert len(recorder.values) > 0 and len(changed) == len(recorder.values)  # they did train...
    _check_pruned(model, original, cb)  # ...and are back to their original values


def test_device_map_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map={"": "cpu"})
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _, cb = _train(model, tmp_path, ProxSparseConfig(lambda1=1.0))
    _check_pruned(model, original, cb)
    assert cb.config.base_model_name_or_path == str(tmp_path / "m")


def test_frozen_targets_fail_early(tmp_path):
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"have frozen weights.*model.layers.0.self_attn.q_proj"):
        _train(model, tmp_path, ProxSparseConfig())


def test_no_targets_fail_at_trainer_construction(tmp_path):
    with pytest.raises(ValueError, match="matched no nn.Linear/Conv1D module"):
        Trainer(
            model=tiny_model("llama"),
            args=_args(tmp_path),
            train_dataset=TokenWindows(random_windows(4, 8)),
            callbacks=[ProxSparseCallback(ProxSparseConfig(target_modules=["nothing_here"]))],
        )


def test_callback_accepts_dict_and_rejects_other():
    assert ProxSparseCallback({"lambda1": 3.0}).config.lambda1 == 3.0
    with pytest.raises(TypeError, match="must be a ProxSparseConfig or a dict"):
        ProxSparseCallback(3.0)


def test_learner_in_a_custom_loop_and_lambda2_gradient():
    model = tiny_model("llama")
    learner = MaskLearner(model, ProxSparseConfig(lambda1=0.5, lambda2=2.0, epsilon=0.1))
    assert learner.freeze_non_targets() > 0
    t = next(iter(learner.targets.values()))
    with torch.no_grad():
        t.weight.mul_(0.9)
    w = t.weight.detach().clone().requires_grad_(True)
    w0 = learner.original[t.param_name]
    a = 1.0 / (w0 + 0.1 * torch.where(w0 >= 0, 1.0, -1.0))
    (2.0 * ((w * (w - w0) * a) ** 2).sum()).backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    learner.add_frozen_weight_grad()
    torch.testing.assert_close(t.weight.grad, w.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(frozen_weight_grad(w.detach(), w0, 0.1) * 2.0, w.grad, rtol=1e-5, atol=1e-8)
    assert learner.prox_step(3, 10) is True
    masks = learner.finalize()
    assert all(is_2to4(model.state_dict()[k]) for k in masks)


def test_statistics_match_a_direct_computation():
    """The telemetry accumulates on the device and reads once; every value equals the plain per-layer computation."""
    from proxsparse_hf.learning.regularizers import regularizer_2to4
    from proxsparse_hf.masks import count_mask_flips, mask_2to4

    torch.manual_seed(0)
    model = tiny_model("llama")
    learner = MaskLearner(model, ProxSparseConfig(lambda1=0.5))
    targets = list(learner.shards.values())

    def reference(previous):
        groups = ok = flips = numel = 0
        reg = dist = 0.0
        masks = {}
        for s in targets:
            w = s.target.weight.detach()
            nonzero = (s.grouped(w).reshape(-1, 4) != 0).sum(dim=1)
            groups, ok = groups + nonzero.numel(), ok + int((nonzero <= 2).sum())
            reg += float(regularizer_2to4(s.grouped(w)))
            dist += float((w - learner.original[s.name]).abs().sum())
            numel += w.numel()
            masks[s.name] = mask_2to4(s.grouped(w))
            if previous is not None:
                flips += count_mask_flips(previous[s.name], masks[s.name])
        return {"frac_2to4": ok / groups, "mask_flips": flips, "regularizer": reg, "dist": dist / numel}, masks

    with torch.no_grad():
        for s in targets:
            s.target.weight.add_(0.01 * torch.randn_like(s.target.weight))
    learner.prox_step(1, 10)
    expected, masks = reference(None)
    first = learner.statistics()
    with torch.no_grad():
        for s in targets:
            s.target.weight.mul_(1 + 0.5 * torch.rand_like(s.target.weight))  # moves some top-2 positions
    learner.prox_step(2, 10)
    expected2, _ = reference(masks)
    second = learner.statistics()
    assert first["proxsparse/mask_flips"] != first["proxsparse/mask_flips"]  # NaN: nothing to compare with yet
    assert expected2["mask_flips"] > 0 and second["proxsparse/mask_flips"] == expected2["mask_flips"]
    for got, want in ((first, expected), (second, expected2)):
        assert got["proxsparse/frac_2to4"] == pytest.approx(want["frac_2to4"], abs=1e-12)
        assert got["proxsparse/regularizer"] == pytest.approx(want["regularizer"], rel=1e-5)
        assert got["proxsparse/dist_to_original"] == pytest.approx(want["dist"], rel=1e-5)
    assert 0 < expected["frac_2to4"] <= 1 and expected2["dist"] > expected["dist"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_snapshot_of_a_cuda_model_is_pinned_and_exact():
    model = tiny_model("llama").cuda()
    learner = MaskLearner(model, ProxSparseConfig(lambda1=0.5, snapshot_device="cpu"))
    for s in learner.shards.values():
        snap = learner.original[s.name]
        assert snap.device.type == "cpu" and snap.is_pinned()
        assert torch.equal(snap, s.target.weight.detach().cpu())
    assert learner.statistics()["proxsparse/dist_to_original"] == 0.0
