"""CPU tests of the 2:4 kernel conversion: validation, errors, CPU fallback, dispatch threshold, cache, round trip,
and projection fusion (grouping, the shared-output cache, slicing, memory accounting) through a CPU test double of the
compressed kernel."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from torch import nn

from proxsparse_hf import inference
from proxsparse_hf.inference import (
    NEVER,
    DispatchEntry,
    FusedSparseMember,
    SparseLinear2to4,
    _DispatchCache,
    _fusion_groups,
    _Kernel,
    _threshold,
    resolve_backend,
    sparse_kernels_available,
    sparse_weight_memory,
    to_dense_kernels,
    to_sparse_kernels,
)
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks, mask_2to4
from proxsparse_hf.targets import Target, find_targets


def _pruned(family: str = "llama", seed: int = 0) -> nn.Module:
    model = tiny_model(family, seed=seed)
    apply_2to4_masks(model, extract_2to4_masks(model))
    return model.eval()


def test_cpu_fallback_swaps_layers_warns_and_matches_dense(caplog):
    model = _pruned()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        to_sparse_kernels(model)
    assert "2:4 sparse kernels are unavailable" in caplog.text
    layers = [m for m in model.modules() if isinstance(m, SparseLinear2to4)]
    assert len(layers) == len(find_targets(tiny_model("llama"))) == 14
    assert all(m.backend == "dense" and m.min_tokens == NEVER for m in layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_round_trip_is_bit_exact_and_shares_parameters():
    model = _pruned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.model.layers[0].self_attn.q_proj.weight
    to_sparse_kernels(model)
    assert model.model.layers[0].self_attn.q_proj.weight is weight
    assert set(model.state_dict()) == set(before)
    to_dense_kernels(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight is weight
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, SparseLinear2to4) for m in model.modules())


def test_conv1d_round_trip_and_forward():
    from transformers.pytorch_utils import Conv1D

    model = _pruned("gpt2")
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    to_sparse_kernels(model, backend="dense")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseLinear2to4) and layer.transposed
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    to_dense_kernels(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_non_2to4_layer_error_names_the_layer_and_leaves_model_untouched():
    model = _pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(1.0)
    with pytest.raises(
        ValueError, match=r"Layer `model\.layers\.1\.mlp\.up_proj`.*not 2:4 sparse.*0\.00% of its groups"
    ):
        to_sparse_kernels(model)
    assert not any(isinstance(m, SparseLinear2to4) for m in model.modules())


def test_filter_fn_selects_layers_and_skips_non_2to4_ones():
    model = tiny_model("llama")
    masks = {k: v for k, v in extract_2to4_masks(model).items() if "mlp" in k}
    apply_2to4_masks(model, masks)
    to_sparse_kernels(model, filter_fn=lambda module, name: "mlp" in name)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, SparseLinear2to4))
    assert converted == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
    with pytest.raises(ValueError, match="No layer left to convert"):
        to_sparse_kernels(model, filter_fn=lambda module, name: "mlp" in name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "triton"}, r"`backend`='triton' is not one of"),
        ({"mode": "tiny"}, r"`mode`='tiny' is not one of"),
        ({"tune_for": "graph"}, r"`tune_for`='graph' is not one of"),
        ({"min_tokens": -1}, r"`min_tokens`=-1 must be 'auto', None or an int >= 0"),
        ({"min_tokens": "fast"}, r"`min_tokens`='fast' must be"),
        ({"min_tokens": 64, "mode": "memory"}, r"`min_tokens`=64 needs the dense weight"),
        ({"fuse_projections": "yes"}, r"`fuse_projections`='yes' must be a bool"),
        ({"fuse_projections": 1}, r"`fuse_projections`=1 must be a bool"),
        ({"fuse_projections": None}, r"`fuse_projections`=None must be a bool"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_sparse_kernels(_pruned(), **kwargs)


def test_module_argument_errors():
    linear = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    with pytest.raises(ValueError, match=r"`mode`='fast' is not one of"):
        SparseLinear2to4.from_linear(linear, backend="dense", mode="fast")
    with pytest.raises(ValueError, match=r"`mode`='memory' needs a sparse kernel"):
        SparseLinear2to4.from_linear(linear, backend="dense", mode="memory")
    layer = SparseLinear2to4.from_linear(linear, backend="dense")
    with pytest.raises(ValueError, match=r"`min_tokens`=-3 must be an int >= 0"):
        layer.set_min_tokens(-3)
    with pytest.raises(ValueError, match=r"Layer `my_layer`.*not 2:4"):
        SparseLinear2to4.from_linear(nn.Linear(16, 8), backend="dense", name="my_layer")
    with pytest.raises(ValueError, match=r"`backend`='gpu' is not one of"):
        resolve_backend("gpu")


def test_memory_mode_without_kernels_falls_back_to_speed(caplog):
    model = _pruned()
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        to_sparse_kernels(model, mode="memory")
    assert "`mode`='memory' needs sparse kernels" in caplog.text
    assert all(m.mode == "speed" for m in model.modules() if isinstance(m, SparseLinear2to4))


def test_availability_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    ok, why = sparse_kernels_available("cusparselt")
    assert not ok and "CUDA is not available" in why
    assert sparse_kernels_available("dense") == (False, "the dense backend runs no sparse kernel")
    assert resolve_backend("cusparselt") == "dense"
    with pytest.raises(ValueError, match=r"`backend`='x' is not one of"):
        sparse_kernels_available("x")


def test_threshold_takes_smallest_bucket_from_which_sparse_always_wins():
    buckets = [16, 128, 1024, 8192]
    assert _threshold(buckets, [1, 1, 1, 1], [2, 2, 0.5, 0.5], 0.03) == 1024
    # a win below a loss does not count: sparse must win at every larger bucket too
    assert _threshold(buckets, [1, 1, 1, 1], [0.5, 2, 0.5, 0.5], 0.03) == 1024
    assert _threshold(buckets, [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.03) == 16
    assert _threshold(buckets, [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.99], 0.03) == NEVER  # within the margin: dense


def test_dispatch_uses_dense_below_threshold_and_kernel_above():
    class FakeKernel:
        name = "fake"
        nbytes = 36
        weight = torch.empty(0, dtype=torch.float32)

        def __init__(self):
            self.calls = 0

        def mm(self, x2d, bias):
            self.calls += 1
            return torch.zeros(x2d.shape[0], 8)

    kernel = FakeKernel()
    linear = nn.Linear(16, 8, bias=False)
    layer = SparseLinear2to4(
        linear.weight, None, in_features=16, out_features=8, kernel=kernel, min_tokens=32, mode="speed"
    )
    x_small = torch.randn(2, 15, 16)  # 30 tokens
    x_large = torch.randn(4, 8, 16)  # 32 tokens
    with torch.no_grad():
        torch.testing.assert_close(layer(x_small), linear(x_small))
        assert kernel.calls == 0
        # CPU inputs never reach the kernel in speed mode, even above the threshold
        torch.testing.assert_close(layer(x_large), linear(x_large))
        assert kernel.calls == 0
    assert "min_tokens=32" in repr(layer) and "backend=fake" in repr(layer)
    layer.set_min_tokens(NEVER)
    assert "min_tokens=never" in repr(layer)


def test_sparse_weight_memory_counts_dense_layers():
    model = _pruned()
    to_sparse_kernels(model, backend="dense")
    report = sparse_weight_memory(model)
    hidden, inter = 64, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
    per_layer = (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) * 4
    assert report.layers == 14 and report.sparse_layers == 0
    assert report.dense_bytes == 2 * per_layer
    assert report.compressed_bytes == 0 and report.resident_bytes == report.dense_bytes
    assert report.to_dict()["resident_ratio"] == 1.0


def test_dispatch_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXSPARSE_CACHE_DIR", str(tmp_path / "default"))
    cache = _DispatchCache(tmp_path, torch.device("cpu"))
    key = cache.key("cusparselt", torch.bfloat16, 4096, 11008, "eager")
    assert "cusparselt|bfloat16|4096x11008|eager|torch" in key
    entry = DispatchEntry(min_tokens=1024, alg_id=17, buckets=[16, 1024], dense_ms=[0.1, 1.0], sparse_ms=[0.5, 0.6])
    cache.put(key, entry)
    cache.save()
    data = json.loads(cache.file.read_text())
    assert data["version"] == 1 and data["entries"][key]["alg_id"] == 17
    assert _DispatchCache(tmp_path, torch.device("cpu")).get(key) == entry
    cache.file.write_text("{not json")
    assert _DispatchCache(tmp_path, torch.device("cpu")).get(key) is None
    assert _DispatchCache(None, torch.device("cpu")).path == tmp_path / "default"


# --------------------------------------------------------------------------------------------------------------------
# projection fusion
# --------------------------------------------------------------------------------------------------------------------
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


class RefKernel(_Kernel):
    """CPU test double of a compressed 2:4 kernel: ``mm`` is ``x @ W.T (+ bias)``; counts calls and decompressions."""

    name = "ref"

    def __init__(self, weight: torch.Tensor, alg_id: int = 0):
        self.weight = weight.detach().clone()
        self.alg_id = alg_id
        self.calls = 0
        self.decompressions = 0

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        return F.linear(x2d, self.weight, bias)

    def decompress(self) -> torch.Tensor:
        self.decompressions += 1
        return self.weight.clone()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() * 9 // 16 + 7  # + a header: shares do not divide


@pytest.fixture
def ref_backend(monkeypatch, tmp_path):
    """Make ``to_sparse_kernels`` convert CPU float32 models with :class:`RefKernel` (backend ``"ref"``); measuring
    a shape records it and answers sparse from 16 tokens (never, for shapes put in ``.never``)."""
    state = SimpleNamespace(tuned=[], never=set())

    def tune(backend, weight, tune_for, buckets, select_alg):
        shape = tuple(weight.shape)
        state.tuned.append(shape)
        return DispatchEntry(min_tokens=NEVER if shape in state.never else 16, alg_id=5)

    monkeypatch.setattr(inference, "_resolve_for_model", lambda backend, device: "ref")
    monkeypatch.setattr(inference, "_build_kernel", lambda backend, weight, alg_id=0: RefKernel(weight, alg_id))
    monkeypatch.setattr(inference, "_tune_shape", tune)
    monkeypatch.setitem(inference._SHAPE_MULTIPLE, "ref", (16, 16))
    monkeypatch.setattr(inference, "_SUPPORTED_DTYPES", (torch.float32,))
    monkeypatch.setenv("PROXSPARSE_CACHE_DIR", str(tmp_path))
    return state


def _groups(model: nn.Module) -> list:
    """The distinct fused groups of ``model``, in module order."""
    groups = []
    for module in model.modules():
        if isinstance(module, FusedSparseMember) and not any(g is module._group for g in groups):
            groups.append(module._group)
    return groups


def _masked_linears(outs=(64, 32, 32), in_features=64, bias=False, seed=0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    linears = [nn.Linear(in_features, n, bias=bias) for n in outs]
    with torch.no_grad():
        for linear in linears:
            linear.weight.mul_(mask_2to4(linear.weight))
            if bias:
                linear.bias.normal_()
    return linears


def _fuse(linears, mode="memory", min_tokens=0, names=QKV) -> list[FusedSparseMember]:
    return FusedSparseMember.from_linears(
        linears, names=[f"attn.{n}" for n in names[: len(linears)]], backend="ref", mode=mode, min_tokens=min_tokens
    )


@pytest.mark.parametrize(
    ("family", "per_layer"),
    [
        ("llama", [QKV, GATE_UP]),
        ("mistral", [QKV, GATE_UP]),
        ("qwen2", [QKV, GATE_UP]),  # q/k/v with bias: all of them, so they fuse
        ("opt", [QKV]),  # fc1 / fc2 are sequential, out_proj alone
        ("phi", [QKV]),
        ("gpt_neox", []),  # query_key_value is fused already
        ("gpt2", []),  # so is c_attn
    ],
)
def test_fusion_groups_per_family(family, per_layer):
    model = tiny_model(family)
    groups = _fusion_groups(model, list(find_targets(model).values()))
    assert [tuple(t.name.rpartition(".")[2] for t in g) for g in groups] == per_layer * 2  # two decoder layers
    assert all(len({t.name.rpartition(".")[0] for t in g}) == 1 for g in groups)  # one parent per group


def test_fusion_groups_skip_cross_attention_and_incompatible_siblings():
    class Attention(nn.Module):
        def __init__(self, k_bias=False, v_in=64):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=k_bias)
            self.v_proj = nn.Linear(v_in, 32, bias=False)

    model = nn.Module()
    model.self_attn, model.encoder_attn, model.crossattention = Attention(), Attention(), Attention()
    model.cross = Attention()
    model.cross_flagged = Attention()
    model.cross_flagged.is_cross_attention = True
    model.bias_mix, model.in_mix = Attention(k_bias=True), Attention(v_in=128)
    model.alone = nn.Module()
    model.alone.q_proj = nn.Linear(64, 64)
    targets = [Target(name, module, False) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    groups = [[t.name for t in g] for g in _fusion_groups(model, targets)]
    # cross-attention parents (by name or flag), mixed bias, another input width, a lone layer: not fused
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
    # DeepSeek latent attention: q_proj with kv_a_proj_with_mqa when there is no k_proj / v_proj
    mla = nn.Module()
    mla.q_proj, mla.kv_a_proj_with_mqa, mla.kv_b_proj = nn.Linear(64, 96), nn.Linear(64, 48), nn.Linear(32, 64)
    targets = [Target(n, m, False) for n, m in mla.named_children()]
    assert [[t.name for t in g] for g in _fusion_groups(mla, targets)] == [["q_proj", "kv_a_proj_with_mqa"]]


def test_to_sparse_kernels_fuses_and_tunes_fused_shapes(ref_backend):
    model = _pruned()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q_weight, keys = attn.q_proj.weight, set(model.state_dict())
    to_sparse_kernels(model, min_tokens="auto")
    fused = sorted(n for n, m in model.named_modules() if isinstance(m, FusedSparseMember))
    assert fused == sorted(
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("mlp.gate_proj", "mlp.up_proj", *(f"self_attn.{q}" for q in QKV))
    )
    assert type(attn.o_proj) is SparseLinear2to4 and type(mlp.down_proj) is SparseLinear2to4
    # q 64 + k 32 + v 32 rows, gate + up 2 x 128 rows: measured as the fused shapes, once each
    assert sorted(ref_backend.tuned) == [(64, 64), (64, 128), (128, 64), (256, 64)]
    assert attn.q_proj._group is attn.v_proj._group is not mlp.up_proj._group
    assert attn.q_proj.weight is q_weight and set(model.state_dict()) == keys  # speed mode: same Parameters
    assert attn.k_proj.min_tokens == 16 and attn.k_proj._kernel.alg_id == 5
    assert "fused=(q_proj, k_proj, v_proj), rows=64:96 of 128x64" in repr(attn.k_proj)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # CPU inputs run each member's dense weight in speed mode
    assert all(g.kernel.calls == 0 for g in _groups(model))


def test_fuse_projections_false_converts_each_layer(ref_backend):
    model = _pruned()
    to_sparse_kernels(model, fuse_projections=False)
    assert not _groups(model)
    assert sum(isinstance(m, SparseLinear2to4) for m in model.modules()) == 14
    assert sorted(set(ref_backend.tuned)) == [(32, 64), (64, 64), (64, 128), (128, 64)]


def test_filter_fn_subset_of_a_sibling_set_still_fuses(ref_backend):
    model = _pruned()
    to_sparse_kernels(model, filter_fn=lambda module, name: not name.endswith(("v_proj", "up_proj")))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.fused_names == ("q_proj", "k_proj") and attn.k_proj._group is attn.q_proj._group
    assert type(attn.v_proj) is nn.Linear and type(mlp.up_proj) is nn.Linear
    assert type(mlp.gate_proj) is SparseLinear2to4  # a set of one is no group
    assert (96, 64) in ref_backend.tuned


def test_dense_backend_never_fuses():
    model = _pruned()
    to_sparse_kernels(model, backend="dense", fuse_projections=True)
    assert not _groups(model) and sum(isinstance(m, SparseLinear2to4) for m in model.modules()) == 14


def test_group_falls_back_to_single_layers_when_a_member_shape_is_unsupported(ref_backend, monkeypatch, caplog):
    monkeypatch.setitem(inference._SHAPE_MULTIPLE, "ref", (64, 16))  # k / v (32 rows) unsupported, q (64) fine
    model = _pruned()
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        to_sparse_kernels(model)
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is SparseLinear2to4
    assert type(attn.k_proj) is nn.Linear and type(attn.v_proj) is nn.Linear
    assert "Layer `model.layers.0.self_attn.k_proj` keeps a dense matmul: shape 32x64" in caplog.text
    assert isinstance(model.model.layers[0].mlp.up_proj, FusedSparseMember)


def test_group_stays_dense_when_the_fused_shape_never_wins(ref_backend):
    ref_backend.never.add((128, 64))
    model = _pruned()
    to_sparse_kernels(model)
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, p)) is nn.Linear for p in QKV)
    assert isinstance(model.model.layers[0].mlp.gate_proj, FusedSparseMember)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_fused_forward_runs_one_gemm_per_group_and_leaves_no_cache(family, ref_backend):
    model = _pruned(family)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    to_sparse_kernels(model, mode="memory")  # memory mode: CPU inputs reach the kernel
    groups = _groups(model)
    assert len(groups) == (4 if family != "opt" else 2)
    for context in (torch.no_grad, torch.inference_mode):
        for group in groups:
            group.kernel.calls = 0
        with context():
            out = model(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert [g.kernel.calls for g in groups] == [1] * len(groups)
        assert all(g._entry is None for g in groups)


def test_fused_generate_with_kv_cache_matches_dense(ref_backend):
    model = _pruned()
    ids = torch.randint(1, 128, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, pad_token_id=0, **kwargs)
        to_sparse_kernels(model, mode="memory")
        out = model.generate(ids, pad_token_id=0, **kwargs)
    assert torch.equal(out, ref)
    assert all(g.kernel.calls == 5 and g._entry is None for g in _groups(model))  # prefill + 4 decode steps


def test_fused_members_share_one_gemm_whatever_the_order(ref_backend):
    linears = _masked_linears(bias=True)
    q, k, v = _fuse(linears)
    kernel = q._kernel
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        outs = {"v": v(x), "q": q(x), "k": k(x)}
        assert kernel.calls == 1 and q._group._entry is None  # released once all three were served
        for name, linear in zip("qkv", linears):
            torch.testing.assert_close(outs[name], linear(x))


def test_fused_members_recompute_for_another_input_a_second_call_or_an_in_place_change(ref_backend):
    linears = _masked_linears()
    q, k, v = _fuse(linears)
    kernel = q._kernel
    x1, x2 = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        q(x1)
        torch.testing.assert_close(k(x2), linears[1](x2))  # another input: recomputed, right answer
        assert kernel.calls == 2
        torch.testing.assert_close(v(x2), linears[2](x2))  # from k's computation
        assert kernel.calls == 2
        torch.testing.assert_close(v(x1), linears[2](x1))  # x1's output was replaced: recomputed
        assert kernel.calls == 3
        q(x1)  # v already took x1's output; q has not: served
        assert kernel.calls == 3
        q(x1)  # a second call for the same member recomputes
        assert kernel.calls == 4
        x1.add_(1.0)  # modified in place: the cached output is stale
        torch.testing.assert_close(k(x1), linears[1](x1))
        assert kernel.calls == 5


def test_fused_cache_is_released_when_the_input_is_freed(ref_backend):
    q, k, v = _fuse(_masked_linears())
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        out = q(x)
    group = q._group
    assert group._entry is not None  # k and v not served yet
    del x
    assert group._entry is None  # the input is gone: nothing kept alive
    assert out.shape == (2, 8, 64)


def test_fused_outputs_are_views_of_one_output_that_reshape_per_head(ref_backend):
    linears = _masked_linears()
    q, k, v = _fuse(linears)
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        outs = [q(x), k(x), v(x)]
    base = outs[0]._base  # the kernel's [rows, 128] output
    assert base is not None and base.shape == (12, 128) and all(o._base is base for o in outs)
    assert [o.stride() for o in outs] == [(768, 128, 1)] * 3 and not outs[1].is_contiguous()
    for out, linear in zip(outs, linears):
        heads = out.view(2, 6, -1, 16)  # what attention does: split the last dimension into heads
        torch.testing.assert_close(heads, linear(x).view(2, 6, -1, 16))
        torch.testing.assert_close(out.view(-1, out.shape[-1]), linear(x).reshape(-1, out.shape[-1]))


def test_fused_speed_mode_runs_dense_below_min_tokens_and_on_cpu(ref_backend):
    linears = _masked_linears(bias=True)
    q, k, v = _fuse(linears, mode="speed", min_tokens=32)
    assert q.weight is linears[0].weight and k.bias is linears[1].bias
    with torch.no_grad():
        for x in (torch.randn(2, 15, 64), torch.randn(4, 8, 64)):  # 30 rows (below), 32 rows (CPU: dense anyway)
            for member, linear in zip((q, k, v), linears):
                assert torch.equal(member(x), linear(x))
    assert q._kernel.calls == 0 and q._group._entry is None
    k.set_min_tokens(128)  # one threshold for the whole group
    assert q.min_tokens == v.min_tokens == 128 and "min_tokens=128" in repr(v)
    with pytest.raises(ValueError, match=r"`min_tokens`=-1 must be an int >= 0"):
        q.set_min_tokens(-1)


def test_fused_conv1d_members_and_round_trip(ref_backend):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    convs = [Conv1D(n, 64) for n in (64, 32, 32)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.mul_(mask_2to4(conv.weight.t()).t())  # [in, out]: groups of 4 along dim 0
            conv.bias.normal_()
    originals = [c.weight.detach().clone() for c in convs]
    members = _fuse(convs)
    assert all(m.transposed and m.weight is None for m in members)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        for member, conv in zip(members, convs):
            torch.testing.assert_close(member(x), conv(x))
    restored = [m.to_dense_module() for m in members]
    assert all(type(r) is Conv1D for r in restored)
    assert all(torch.equal(r.weight, w) and r.bias is c.bias for r, w, c in zip(restored, originals, convs))


def test_from_linears_errors_name_the_layer(ref_backend):
    linears = _masked_linears()
    with torch.no_grad():
        linears[1].weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"Layer `attn\.k_proj`.*not 2:4"):
        _fuse(linears)
    with pytest.raises(ValueError, match=r"`attn\.q_proj`, `attn\.k_proj` cannot be fused: their input features"):
        _fuse([_masked_linears(outs=(64,))[0], _masked_linears(outs=(32,), in_features=128)[0]])
    with pytest.raises(ValueError, match=r"some have a bias and some do not"):
        _fuse([_masked_linears(outs=(64,))[0], _masked_linears(outs=(32,), bias=True)[0]])
    with pytest.raises(ValueError, match=r"Fusing needs a sparse kernel"):
        FusedSparseMember.from_linears(_masked_linears(), names=list(QKV), backend="dense")
    with pytest.raises(ValueError, match=r"two or more layers"):
        _fuse(_masked_linears(outs=(64,)))


def test_non_2to4_member_of_a_group_is_named(ref_backend):
    model = _pruned()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"Layer `model\.layers\.0\.self_attn\.v_proj`.*not 2:4"):
        to_sparse_kernels(model)
    assert not any(isinstance(m, SparseLinear2to4) for m in model.modules())


@pytest.mark.parametrize("mode", ["speed", "memory"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fused_round_trip_is_bit_exact(family, mode, ref_backend):
    model = _pruned(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    weights = {t.param_name for t in find_targets(model).values()}
    to_sparse_kernels(model, mode=mode)
    groups = _groups(model)
    assert groups and all(m.mode == mode for m in model.modules() if isinstance(m, SparseLinear2to4))
    to_dense_kernels(model)
    assert not any(isinstance(m, SparseLinear2to4) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    same = [name for name, p in model.named_parameters() if p is params[name]]
    if mode == "speed":
        assert len(same) == len(params)  # the very same Parameters
    else:
        assert all(g.kernel.decompressions == 1 for g in groups)  # each fused matrix decompressed once, then split
        assert not weights & set(same)  # weights rebuilt from the compressed ones
        assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_sparse_weight_memory_counts_each_fused_matrix_once(mode, ref_backend):
    model = _pruned()
    dense_bytes = sum(t.weight.numel() * 4 for t in find_targets(model).values())
    to_sparse_kernels(model, mode=mode)
    report = sparse_weight_memory(model)
    kernels = {id(m._kernel): m._kernel for m in model.modules() if isinstance(m, SparseLinear2to4)}
    assert report.layers == report.sparse_layers == 14 and report.fused_groups == 4
    assert len(kernels) == 8  # per layer: q/k/v, gate/up, o, down
    assert report.compressed_bytes == sum(k.nbytes for k in kernels.values())
    assert report.dense_bytes == dense_bytes
    resident = report.compressed_bytes + (dense_bytes if mode == "speed" else 0)
    assert report.resident_bytes == resident
    for group in _groups(model):
        assert sum(m.compressed_nbytes for m in model.modules() if getattr(m, "_group", None) is group) == (
            group.kernel.nbytes
        )


def test_fused_model_deep_copies_with_its_own_group(ref_backend):
    model = _pruned()
    to_sparse_kernels(model, mode="memory")
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 9))
    original, copied = _groups(model), _groups(clone)
    assert len(copied) == 4 and not any(c is o for c in copied for o in original)
    assert clone.model.layers[0].self_attn.q_proj._group is clone.model.layers[0].self_attn.k_proj._group
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    assert [g.kernel.calls for g in copied] == [1] * 4 and all(g._entry is None for g in copied)


def test_fused_forward_compiles_without_graph_breaks(ref_backend):
    model = _pruned()
    to_sparse_kernels(model, mode="memory")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for group in _groups(model):
            group.kernel.calls = 0
        out = compiled(ids).logits
    torch.testing.assert_close(out, ref)
    assert all(g.kernel.calls == 1 and g._entry is None for g in _groups(model))
