"""CPU tests of the 2:4 kernel conversion: validation, errors, CPU fallback, dispatch threshold, cache, round trip."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from torch import nn

from proxsparse_hf.inference import (
    NEVER,
    DispatchEntry,
    SparseKernel,
    SparseLinear2to4,
    backends,
    resolve_backend,
    sparse_kernels_available,
    sparse_weight_memory,
    to_dense_kernels,
    to_sparse_kernels,
)
from proxsparse_hf.inference.backends import (
    CusparseltKernel,
    SubclassKernel,
    backend_choices,
    backend_names,
    build_kernel,
    cusparselt_alg_count,
    fp16_cusparselt_blocked,
    get_backend,
    register_backend,
)
from proxsparse_hf.inference.tuning import DispatchCache, break_even_tokens
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks, mask_2to4
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
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
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
    assert break_even_tokens(buckets, [1, 1, 1, 1], [2, 2, 0.5, 0.5], 0.03) == 1024
    # a win below a loss does not count: sparse must win at every larger bucket too
    assert break_even_tokens(buckets, [1, 1, 1, 1], [0.5, 2, 0.5, 0.5], 0.03) == 1024
    assert break_even_tokens(buckets, [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.03) == 16
    assert break_even_tokens(buckets, [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.99], 0.03) == NEVER  # within the margin: dense


def _fake_kernel_layer(
    min_tokens: int, eager_min_tokens: int | None = None, mode: str = "speed", device_type: str = "cpu"
) -> SparseLinear2to4:
    """A 16 -> 8 ``SparseLinear2to4`` over a stand-in kernel for ``device_type`` inputs that counts its calls
    (``layer._kernel.calls``) and returns the dense result plus one, so that its output is told from the fallback's."""

    class FakeKernel(SparseKernel):
        name = "fake"
        nbytes = 36

        def __init__(self, weight: torch.Tensor):
            self.weight, self.dtype, self.device_type, self.calls = weight, weight.dtype, device_type, 0

        def mm(self, x2d, bias):
            self.calls += 1
            return F.linear(x2d, self.weight, bias) + 1

    linear = nn.Linear(16, 8, bias=False)
    return SparseLinear2to4(
        linear.weight,
        None,
        in_features=16,
        out_features=8,
        kernel=FakeKernel(linear.weight.detach()),
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
        torch.testing.assert_close(layer(x_large), linear(x_large) + 1)  # the kernel's answer
        assert kernel.calls == 1
        layer.set_min_tokens(33)
        torch.testing.assert_close(layer(x_large), linear(x_large))
        assert kernel.calls == 1
        layer.set_min_tokens(0)
        torch.testing.assert_close(layer(x_small[:, :1]), linear(x_small[:, :1]) + 1)  # 2 tokens, always sparse
        assert kernel.calls == 2
    # autograd-tracked inputs take the dense path (the kernels have no backward), even above the threshold
    x_grad = x_large.clone().requires_grad_()
    out = layer(x_grad)
    assert out.requires_grad and kernel.calls == 2
    torch.testing.assert_close(out.detach(), linear(x_large))
    # inputs on another device than the kernel's stay dense: CPU inputs never reach a CUDA kernel in speed mode
    cuda_layer = _fake_kernel_layer(0, device_type="cuda")
    with torch.no_grad():
        torch.testing.assert_close(cuda_layer(x_large), F.linear(x_large, cuda_layer.weight))
    assert cuda_layer._kernel.calls == 0
    assert "min_tokens=0" in repr(layer) and "backend=fake" in repr(layer)
    layer.set_min_tokens(NEVER)
    assert "min_tokens=never" in repr(layer)


def test_forward_applies_the_graph_threshold_in_graphs_and_the_eager_one_outside(monkeypatch):
    layer = _fake_kernel_layer(64, eager_min_tokens=4096)
    kernel = layer._kernel
    x = torch.randn(2, 32, 16)  # 64 tokens
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # eager: below 4096
        assert kernel.calls == 0
        monkeypatch.setattr(SparseLinear2to4, "in_graph", staticmethod(lambda: True))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight) + 1)  # traced / captured: from 64 on
        assert kernel.calls == 1
        torch.testing.assert_close(layer(x[:, :31]), F.linear(x[:, :31], layer.weight))  # 62 tokens
        assert kernel.calls == 1


def test_memory_mode_always_runs_the_kernel_in_its_dtype_and_refuses_autograd():
    layer = _fake_kernel_layer(0, mode="memory")
    assert layer.weight is None and layer.dense_nbytes == 16 * 8 * 4 and layer.compressed_nbytes == 36
    x = torch.randn(1, 1, 16, dtype=torch.float64)  # one token, another dtype: cast to the kernel's and back
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float64 and layer._kernel.calls == 1
    torch.testing.assert_close(out, F.linear(x, layer._kernel.weight.double()) + 1)
    with pytest.raises(RuntimeError, match="memory mode has no backward"):
        layer(x.float().requires_grad_())


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
    cache = DispatchCache(tmp_path, torch.device("cpu"))
    key = cache.key("cusparselt", torch.bfloat16, 4096, 11008, "eager")
    assert "cusparselt|bfloat16|4096x11008|eager|torch" in key
    entry = DispatchEntry(
        min_tokens=1024, alg_id=17, buckets=[16, 1024], dense_ms=[0.1, 1.0], sparse_ms=[0.5, 0.6], bucket_algs=[4, 17]
    )
    cache.put(key, entry)
    cache.save()
    data = json.loads(cache.file.read_text())
    assert data["version"] == 2 and data["entries"][key]["bucket_algs"] == [4, 17]
    assert DispatchCache(tmp_path, torch.device("cpu")).get(key) == entry
    assert entry.algorithms() == {16: 4, 1024: 17}
    assert DispatchEntry(min_tokens=NEVER, alg_id=3).algorithms() == 3
    # a cache written before algorithms were chosen per bucket (version 1) is ignored: the shapes are measured again
    cache.file.write_text(json.dumps({"version": 1, "entries": {key: {"min_tokens": 16, "alg_id": 0}}}))
    assert DispatchCache(tmp_path, torch.device("cpu")).get(key) is None
    cache.file.write_text("{not json")
    assert DispatchCache(tmp_path, torch.device("cpu")).get(key) is None
    assert DispatchCache(None, torch.device("cpu")).path == tmp_path / "default"


def test_cusparselt_algorithm_per_token_count():
    """The algorithm of the largest measured token count <= the call's rows; below every count, the smallest's."""
    kernel = object.__new__(CusparseltKernel)  # the algorithm table only (compressing a weight needs CUDA)
    kernel.set_alg({2048: 20, 16: 4, 8192: 17})
    assert kernel.alg_id == 17
    assert [kernel.alg_for(rows) for rows in (1, 16, 2047, 2048, 5000, 8192, 10**6)] == [4, 4, 4, 20, 20, 17, 17]
    kernel.set_alg(11)
    assert kernel.alg_for(1) == kernel.alg_for(10**6) == kernel.alg_id == 11
    with pytest.raises(ValueError, match="alg_id"):
        kernel.set_alg({})


# --- backends: the registry, availability and the kernel wrappers, on CPU with stand-ins for GPU-only calls -------
@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(major, minor, cusparselt=True)``: torch reports a CUDA device of that compute capability."""

    def pretend(major: int, minor: int, cusparselt: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)

    return pretend


class _Marked(torch.Tensor):
    """Stands for torch's ``SparseSemiStructuredTensor``: a dense tensor with its compressed parts as attributes."""

    @property
    def packed(self) -> torch.Tensor:
        return torch.zeros(self.shape[0], self.shape[1] // 2, dtype=self.dtype)

    @property
    def meta(self) -> torch.Tensor:
        return torch.zeros(self.shape[0], self.shape[1] // 16, dtype=torch.int16)


def _fake_torchao(monkeypatch, *, new_api: bool = True) -> list:
    """A stand-in ``torchao`` whose ``sparsify_`` swaps each linear's weight for a :class:`_Marked` copy; returns the
    ``(model, config, weight it was given)`` of every call. ``new_api=False``: the names of torchao before
    ``SemiSparseWeightConfig``."""
    calls = []

    class SemiSparseWeightConfig:
        pass

    def sparsify_(model, config):
        for module in model.modules():
            if isinstance(module, nn.Linear):
                calls.append((model, config, module.weight))
                marked = module.weight.detach().clone().as_subclass(_Marked)
                module.weight = nn.Parameter(marked, requires_grad=False)

    torchao, sparsity = types.ModuleType("torchao"), types.ModuleType("torchao.sparsity")
    torchao.sparsity = sparsity
    if new_api:
        api = types.ModuleType("torchao.sparsity.sparse_api")
        api.SemiSparseWeightConfig, api.sparsify_ = SemiSparseWeightConfig, sparsify_
        sparsity.sparse_api = api
        monkeypatch.setitem(sys.modules, "torchao.sparsity.sparse_api", api)
    else:
        sparsity.semi_sparse_weight, sparsity.sparsify_ = SemiSparseWeightConfig, sparsify_
        monkeypatch.setitem(sys.modules, "torchao.sparsity.sparse_api", None)  # importing it fails
    monkeypatch.setitem(sys.modules, "torchao", torchao)
    monkeypatch.setitem(sys.modules, "torchao.sparsity", sparsity)
    return calls


def _masked_linear(out_features: int = 32, in_features: int = 64, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(mask_2to4(linear.weight))
    return linear


def test_backend_registry_lists_the_built_in_backends_and_rejects_unknown_names():
    assert backend_names() == ("cusparselt", "cutlass", "torchao")
    assert backend_choices() == ("auto", "cusparselt", "cutlass", "torchao", "dense")
    assert importlib.import_module("proxsparse_hf.inference").BACKENDS == backend_choices()
    assert [get_backend(name).auto for name in backend_names()] == [True, True, False]
    assert get_backend("cutlass").shape_multiple == (32, 64) and get_backend("torchao").requires == {
        "torchao": "pip install 'proxsparse-hf[torchao]'"
    }
    with pytest.raises(ValueError, match=r"`backend`='triton' is not one of the registered .*'cusparselt', 'cutlass'"):
        get_backend("triton")
    with pytest.raises(ValueError, match=r"`backend`='dense' is not one of the registered"):
        build_kernel("dense", torch.zeros(16, 16))
    for taken in ("cusparselt", "auto", "dense"):
        with pytest.raises(ValueError, match=rf"`name`='{taken}' is already taken; registered backends: \("):
            register_backend(taken)(lambda weight, alg_id: None)


def test_a_registered_backend_is_one_registration_away_from_a_layer(monkeypatch, fake_gpu, caplog):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))  # registrations end with the test
    built = []

    class CpuKernel(SparseKernel):
        name, device_type = "cpu_reference", "cpu"

        def __init__(self, weight: torch.Tensor):
            self.weight, self.dtype = weight.clone(), weight.dtype

        def mm(self, x2d, bias):
            return F.linear(x2d, self.weight, bias)

        def decompress(self):
            return self.weight.clone()

        @property
        def nbytes(self) -> int:
            return self.weight.numel() * self.weight.element_size() // 2

    @register_backend("cpu_reference", description="test", check=lambda major, minor: "" if major >= 9 else "no")
    def build(weight, alg_id):
        built.append(alg_id)
        return CpuKernel(weight)

    assert backend_names()[-1] == "cpu_reference" and backend_choices()[-2:] == ("cpu_reference", "dense")
    fake_gpu(9, 0)
    assert sparse_kernels_available("cpu_reference") == (True, "")
    assert resolve_backend("cpu_reference") == "cpu_reference"
    assert resolve_backend("auto") == "cusparselt"  # not marked auto: "auto" keeps to the built-in order
    fake_gpu(8, 6)
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        assert resolve_backend("cpu_reference") == "dense"
    assert "2:4 backend 'cpu_reference' is unavailable (no)" in caplog.text
    linear = _masked_linear()
    layer = SparseLinear2to4.from_linear(linear, backend="cpu_reference", min_tokens=4, alg_id=3)
    assert built == [3] and layer.backend == "cpu_reference" and layer.compressed_nbytes == 32 * 64 * 4 // 2
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x))


def test_availability_and_auto_resolution_on_each_kind_of_gpu(fake_gpu, caplog):
    fake_gpu(7, 5)
    for name in backend_names():
        assert sparse_kernels_available(name) == (False, "compute capability 7.5 < 8.0 has no sparse tensor cores")
    fake_gpu(9, 0)
    assert sparse_kernels_available("cusparselt") == (True, "")
    assert sparse_kernels_available("cutlass") == (
        False,
        "torch's CUTLASS 2:4 kernels run on compute capability 8.x only (found 9.0)",
    )
    assert resolve_backend("auto") == "cusparselt"
    fake_gpu(8, 0, cusparselt=False)
    assert sparse_kernels_available("cusparselt") == (False, "this torch build has no cuSPARSELt")
    assert sparse_kernels_available("cutlass") == (True, "")
    assert resolve_backend("auto") == resolve_backend("cutlass") == "cutlass"
    fake_gpu(9, 0, cusparselt=False)
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        assert resolve_backend("auto") == "dense"
        assert resolve_backend("cutlass") == "dense"
    assert (
        "2:4 sparse kernels are unavailable (cusparselt: this torch build has no cuSPARSELt; cutlass: torch's "
        "CUTLASS 2:4 kernels run on compute capability 8.x only (found 9.0))" in caplog.text
    )
    assert "2:4 backend 'cutlass' is unavailable (torch's CUTLASS" in caplog.text


def test_torchao_availability_names_the_missing_package_and_its_install_command(monkeypatch, fake_gpu, caplog):
    fake_gpu(9, 0)
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    why = "torchao is not installed (pip install 'proxsparse-hf[torchao]')"
    assert sparse_kernels_available("torchao") == (False, why)
    with pytest.raises(
        ImportError, match=r"backend='torchao' needs torchao: .*pip install 'proxsparse-hf\[torchao\]'"
    ):
        resolve_backend("torchao")
    assert resolve_backend("auto") == "cusparselt"  # auto never needs torchao
    _fake_torchao(monkeypatch)
    assert sparse_kernels_available("torchao") == (True, "")
    assert resolve_backend("torchao") == "torchao"
    fake_gpu(9, 0, cusparselt=False)  # installed, but this torch has no cuSPARSELt: dense with a warning, no error
    assert sparse_kernels_available("torchao") == (False, "this torch build has no cuSPARSELt")
    with caplog.at_level(logging.WARNING, logger="proxsparse_hf.inference"):
        assert resolve_backend("torchao") == "dense"
    assert "2:4 backend 'torchao' is unavailable (this torch build has no cuSPARSELt)" in caplog.text


def test_unsupported_layers_are_named_by_dtype_shape_and_blocked_fp16(monkeypatch):
    bf16 = torch.zeros(32, 64, dtype=torch.bfloat16)
    assert all(get_backend(name).unsupported_reason(bf16) == "" for name in backend_names())
    assert get_backend("cusparselt").unsupported_reason(bf16.float()) == (
        "dtype torch.float32 (2:4 kernels here take float16/bfloat16)"
    )
    assert get_backend("cutlass").unsupported_reason(bf16[:16]) == (
        "shape 16x64 is not a multiple of 32x64 as cutlass needs"
    )
    assert get_backend("cusparselt").unsupported_reason(bf16[:16]) == ""
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 800)
    monkeypatch.delenv("PROXSPARSE_ALLOW_FP16_CUSPARSELT", raising=False)
    assert fp16_cusparselt_blocked()
    fp16 = bf16.half()
    for name in ("cusparselt", "torchao"):  # both run cuSPARSELt
        assert get_backend(name).unsupported_reason(fp16).startswith("float16 kernels of cuSPARSELt 800 failed")
    assert get_backend("cutlass").unsupported_reason(fp16) == ""
    monkeypatch.setenv("PROXSPARSE_ALLOW_FP16_CUSPARSELT", "1")
    assert not fp16_cusparselt_blocked() and get_backend("cusparselt").unsupported_reason(fp16) == ""
    monkeypatch.delenv("PROXSPARSE_ALLOW_FP16_CUSPARSELT")
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 900)
    assert not fp16_cusparselt_blocked()


def test_cusparselt_kernel_calls_the_operator_with_the_algorithm_of_the_call_size(monkeypatch):
    monkeypatch.setattr(torch, "_cslt_compress", lambda weight: weight.clone())  # "packed" = the dense weight here
    calls = []

    def eager_op(x2d, packed, bias, out_features, alg_id):
        calls.append(("eager", x2d.shape[0], out_features, alg_id))
        return F.linear(x2d, packed, bias)

    monkeypatch.setattr(backends, "cslt_linear", eager_op)
    linear = _masked_linear()
    kernel = build_kernel("cusparselt", linear.weight.detach(), {16: 4, 64: 7})
    assert isinstance(kernel, CusparseltKernel) and kernel.alg_id == 7 and kernel.dtype == torch.float32
    assert kernel.nbytes == 32 * 64 * 4
    for rows in (20, 100):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(kernel.mm(x, linear.bias), linear(x).detach())
    assert calls == [("eager", 20, 32, 4), ("eager", 100, 32, 7)]
    # while torch.compile traces, the registered operator (one opaque node for Inductor) is called instead
    lib = torch.library.Library("proxsparse_hf", "IMPL")
    lib.impl(
        "cslt_linear",
        lambda x2d, packed, bias, out_features, alg_id: (
            calls.append(("op", x2d.shape[0], out_features, alg_id)) or F.linear(x2d, packed, bias)
        ),
        "CPU",
    )
    try:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        kernel.mm(torch.randn(64, 64), None)
    finally:
        lib._destroy()
    assert calls[-1] == ("op", 64, 32, 7)
    # decompress multiplies by identity blocks through torch._cslt_sparse_mm
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda packed, eye, alg_id=0: packed @ eye)
    assert torch.equal(kernel.decompress(), linear.weight.detach())


def test_cutlass_kernel_forces_cutlass_only_while_compressing(monkeypatch):
    from torch.sparse import SparseSemiStructuredTensor

    seen = []

    def compress(weight):
        seen.append((SparseSemiStructuredTensor._FORCE_CUTLASS, weight.is_contiguous()))
        return weight.clone().as_subclass(_Marked)

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", compress)
    linear = _masked_linear()
    weight = linear.weight.detach()
    kernel = build_kernel("cutlass", weight.t().contiguous().t())  # a non-contiguous view is made contiguous first
    assert seen == [(True, True)] and SparseSemiStructuredTensor._FORCE_CUTLASS is False
    assert isinstance(kernel, SubclassKernel) and kernel.name == "cutlass" and kernel.dtype == torch.float32
    assert kernel.nbytes == 32 * 32 * 4 + 32 * 4 * 2  # packed values + metadata
    x = torch.randn(5, 64)
    torch.testing.assert_close(kernel.mm(x, linear.bias).as_subclass(torch.Tensor), linear(x).detach())
    assert torch.equal(kernel.decompress(), weight)

    def failing(weight):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", failing)
    with pytest.raises(RuntimeError, match="no kernel for this shape"):
        build_kernel("cutlass", weight)
    assert SparseSemiStructuredTensor._FORCE_CUTLASS is False  # restored on failure too


@pytest.mark.parametrize("new_api", [True, False], ids=["SemiSparseWeightConfig", "semi_sparse_weight"])
def test_torchao_kernel_sparsifies_a_copy_of_the_weight(monkeypatch, new_api):
    calls = _fake_torchao(monkeypatch, new_api=new_api)
    linear = _masked_linear()
    weight = linear.weight.detach()
    kernel = build_kernel("torchao", weight)
    ((holder, config, given),) = calls
    assert type(config).__name__ == "SemiSparseWeightConfig"
    assert torch.equal(given, weight) and given.data_ptr() != weight.data_ptr()  # torchao gets a copy
    assert not given.requires_grad and holder[0].weight.data_ptr() != weight.data_ptr()
    assert isinstance(kernel, SubclassKernel) and kernel.name == "torchao" and isinstance(kernel.weight, _Marked)
    x = torch.randn(5, 64)
    torch.testing.assert_close(kernel.mm(x, linear.bias).as_subclass(torch.Tensor), linear(x).detach())
    assert kernel.nbytes == 32 * 32 * 4 + 32 * 4 * 2


def test_subclass_backed_layer_in_memory_mode_runs_the_kernel_and_decompresses_exactly(monkeypatch):
    calls = _fake_torchao(monkeypatch)
    linear = _masked_linear()
    layer = SparseLinear2to4.from_linear(linear, backend="torchao", mode="memory", name="proj")
    assert len(calls) == 1 and layer.weight is None and layer.backend == "torchao"
    assert sparse_weight_memory(nn.Sequential(layer)).compressed_bytes == 32 * 32 * 4 + 32 * 4 * 2
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).as_subclass(torch.Tensor), linear(x))
        dense = layer.to_dense_module()
    assert type(dense) is nn.Linear and torch.equal(dense.weight.as_subclass(torch.Tensor), linear.weight.detach())


def test_cusparselt_algorithm_candidates(monkeypatch):
    candidates = get_backend("cusparselt").alg_candidates
    assert tuple(candidates(torch.float16)) == backends._FP16_SAFE_ALGS
    monkeypatch.setattr(torch.backends.cusparselt, "get_max_alg_id", lambda: None, raising=False)
    assert cusparselt_alg_count() == 21 and list(candidates(torch.bfloat16)) == list(range(21))
    monkeypatch.setattr(torch.backends.cusparselt, "get_max_alg_id", lambda: 5, raising=False)
    assert list(candidates(torch.bfloat16)) == [0, 1, 2, 3, 4]
    assert get_backend("cutlass").alg_candidates is None and get_backend("torchao").alg_candidates is None


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
        # Inductor's fused RMSNorm reduces in another order than eager; q + k·v of O(10) values amplifies that to
        # ~2e-5 on some CPUs, far below any real error of the graph (a wrong operand moves it by O(1))
        torch.testing.assert_close(out, block(h), rtol=1e-4, atol=1e-4)
        calls = re.findall(r"torch\.ops\.proxsparse_hf\.cslt_linear\.default\((\w+\(buf\d+|buf\d+)", "\n".join(codes))
        assert len(calls) == 3
        assert len(set(calls)) == 1, calls  # all three projections read the same buffer
    finally:
        lib._destroy()
        torch._dynamo.reset()
