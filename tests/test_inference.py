"""CPU tests of the 2:4 kernel conversion: validation, errors, CPU fallback, dispatch threshold, cache, round trip."""

from __future__ import annotations

import importlib
import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from torch import nn

from proxsparse_hf.inference.convert import (
    NEVER,
    DispatchEntry,
    SparseLinear2to4,
    _DispatchCache,
    _threshold,
    resolve_backend,
    sparse_kernels_available,
    sparse_weight_memory,
    to_dense_kernels,
    to_sparse_kernels,
)
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks
from proxsparse_hf.targets import find_targets


def _pruned(family: str = "llama", seed: int = 0) -> nn.Module:
    model = tiny_model(family, seed=seed)
    apply_2to4_masks(model, extract_2to4_masks(model))
    return model.eval()


def test_cpu_fallback_swaps_layers_warns_and_matches_dense(caplog):
    model = _pruned()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference.convert"):
        to_sparse_kernels(model)
    assert "layers keep dense matmuls" in caplog.text  # no CUDA here, or CUDA but the model on the CPU
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
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference.convert"):
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


def _fake_kernel_layer(min_tokens: int, eager_min_tokens: int | None = None, mode: str = "speed"):
    """A 16 -> 8 ``SparseLinear2to4`` over a stand-in kernel that counts its calls (``layer._kernel.calls``)."""

    class FakeKernel:
        name = "fake"
        nbytes = 36
        weight = torch.empty(0, dtype=torch.float32)

        def __init__(self):
            self.calls = 0

        def mm(self, x2d, bias):
            self.calls += 1
            return torch.zeros(x2d.shape[0], 8)

    linear = nn.Linear(16, 8, bias=False)
    return SparseLinear2to4(
        linear.weight,
        None,
        in_features=16,
        out_features=8,
        kernel=FakeKernel(),
        min_tokens=min_tokens,
        mode=mode,
        eager_min_tokens=eager_min_tokens,
    )


def test_dispatch_uses_dense_below_threshold_and_kernel_above():
    layer = _fake_kernel_layer(32)
    kernel = layer._kernel

    def linear(x):
        return F.linear(x, layer.weight)

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


def test_graph_and_eager_thresholds_apply_to_their_own_calls():
    layer = _fake_kernel_layer(64, eager_min_tokens=4096)
    assert (layer.min_tokens, layer.eager_min_tokens) == (64, 4096)
    assert not layer.wants_sparse(63, in_graph=True) and layer.wants_sparse(64, in_graph=True)
    assert not layer.wants_sparse(4095, in_graph=False) and layer.wants_sparse(4096, in_graph=False)
    assert "min_tokens=64, eager_min_tokens=4096" in repr(layer)
    # an eager threshold below the graph one is honoured too
    layer.set_min_tokens(512, eager_min_tokens=128)
    assert layer.wants_sparse(128, in_graph=False) and not layer.wants_sparse(128, in_graph=True)
    # one threshold for both unless told otherwise; repr then shows one
    layer.set_min_tokens(256)
    assert layer.eager_min_tokens == 256 and "eager_min_tokens" not in repr(layer)
    layer.set_min_tokens(256, eager_min_tokens=NEVER)
    assert not layer.wants_sparse(1 << 40, in_graph=False) and "eager_min_tokens=never" in repr(layer)
    with pytest.raises(ValueError, match=r"`eager_min_tokens`=-1 must be an int >= 0"):
        layer.set_min_tokens(256, eager_min_tokens=-1)
    with pytest.raises(ValueError, match=r"`eager_min_tokens`=True must be an int >= 0"):
        layer.set_min_tokens(256, eager_min_tokens=True)
    # memory mode always runs sparse; no kernel always dense
    memory = _fake_kernel_layer(64, eager_min_tokens=4096, mode="memory")
    assert (memory.min_tokens, memory.eager_min_tokens) == (0, 0)
    zeros = nn.Linear(16, 8)
    nn.init.zeros_(zeros.weight)
    dense = SparseLinear2to4.from_linear(zeros, backend="dense")
    assert dense.min_tokens == dense.eager_min_tokens == NEVER


def test_in_graph_is_true_only_while_compiling():
    def branch(x):
        return x + 1 if SparseLinear2to4.in_graph() else x - 1

    assert branch(torch.zeros(1)).item() == -1
    assert torch.compile(branch, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1


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
    entry = DispatchEntry(
        min_tokens=1024, alg_id=17, buckets=[16, 1024], dense_ms=[0.1, 1.0], sparse_ms=[0.5, 0.6], bucket_algs=[4, 17]
    )
    cache.put(key, entry)
    cache.save()
    data = json.loads(cache.file.read_text())
    assert data["version"] == 2 and data["entries"][key]["bucket_algs"] == [4, 17]
    assert _DispatchCache(tmp_path, torch.device("cpu")).get(key) == entry
    assert entry.algorithms() == {16: 4, 1024: 17}
    assert DispatchEntry(min_tokens=NEVER, alg_id=3).algorithms() == 3
    # a cache written before algorithms were chosen per bucket (version 1) is ignored: the shapes are measured again
    cache.file.write_text(json.dumps({"version": 1, "entries": {key: {"min_tokens": 16, "alg_id": 0}}}))
    assert _DispatchCache(tmp_path, torch.device("cpu")).get(key) is None
    cache.file.write_text("{not json")
    assert _DispatchCache(tmp_path, torch.device("cpu")).get(key) is None
    assert _DispatchCache(None, torch.device("cpu")).path == tmp_path / "default"


def test_cusparselt_algorithm_per_token_count():
    """The algorithm of the largest measured token count <= the call's rows; below every count, the smallest's."""
    from proxsparse_hf.inference.convert import _CusparseltKernel

    kernel = object.__new__(_CusparseltKernel)  # the algorithm table only (compressing a weight needs CUDA)
    kernel.set_alg({2048: 20, 16: 4, 8192: 17})
    assert kernel.alg_id == 17
    assert [kernel.alg_for(rows) for rows in (1, 16, 2047, 2048, 5000, 8192, 10**6)] == [4, 4, 4, 20, 20, 17, 17]
    kernel.set_alg(11)
    assert kernel.alg_for(1) == kernel.alg_for(10**6) == kernel.alg_id == 11
    with pytest.raises(ValueError, match="alg_id"):
        kernel.set_alg({})


# --- the cuSPARSELt operator seen by torch.compile -------------------------------------------------------------------
def test_cslt_operator_is_registered_flexible_with_a_shape_only_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from proxsparse_hf.kernels.cusparselt_op import OP_NAME

    op = torch.ops.proxsparse_hf.cslt_linear.default
    assert OP_NAME == "proxsparse_hf::cslt_linear"
    importlib.reload(importlib.import_module("proxsparse_hf.kernels.cusparselt_op"))  # registers only once
    assert torch.Tag.flexible_layout in op.tags
    with FakeTensorMode():
        x = torch.empty(37, 64, dtype=torch.bfloat16)
        out = torch.ops.proxsparse_hf.cslt_linear(x, torch.empty(100, dtype=torch.bfloat16), None, 48, 17)
    assert out.shape == (37, 48) and out.dtype == torch.bfloat16


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None, reason="Inductor on CPU needs a C++ compiler"
)
def test_compiled_projections_read_one_copy_of_the_normed_input():
    """Inductor hands q/k/v one realised buffer of an RMSNorm's output (an aten ``_cslt_sparse_mm`` fallback got one
    copy per projection). A test-local CPU stand-in for the operator (``packed`` = the dense weight) lets Inductor
    compile the pattern on CPU."""
    import re

    from torch._inductor.utils import run_and_get_code

    lib = torch.library.Library("proxsparse_hf", "IMPL")
    lib.impl("cslt_linear", lambda x2d, packed, bias, out_features, alg_id: x2d @ packed.t(), "CPU")
    try:
        torch.manual_seed(0)
        weights = [torch.randn(48, 64) for _ in range(3)]
        gain = torch.rand(64) + 0.5

        def block(h: torch.Tensor) -> torch.Tensor:
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
            x2d = x.reshape(-1, 64)
            q, k, v = (torch.ops.proxsparse_hf.cslt_linear(x2d, w, None, 48, 0) for w in weights)
            return q + k * v

        h = torch.randn(2, 16, 64)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(block, fullgraph=True), h)
        torch.testing.assert_close(out, block(h))
        calls = re.findall(r"torch\.ops\.proxsparse_hf\.cslt_linear\.default\((\w+\(buf\d+|buf\d+)", "\n".join(codes))
        assert len(calls) == 3
        assert len(set(calls)) == 1, calls  # all three projections read the same buffer
    finally:
        lib._destroy()
        torch._dynamo.reset()
