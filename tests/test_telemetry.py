import itertools
import math

import pytest
import torch

from proxsparse_hf.evaluation.plot import plot_telemetry
from proxsparse_hf.evaluation.telemetry import telemetry_series

HISTORY = [
    {
        "loss": 3.0,
        "proxsparse/frac_2to4": 0.1,
        "proxsparse/mask_flips": float("nan"),
        "proxsparse/regularizer": 5.0,
        "step": 2,
    },
    {
        "loss": 2.5,
        "proxsparse/frac_2to4": 0.6,
        "proxsparse/mask_flips": 40.0,
        "proxsparse/regularizer": 1.0,
        "step": 4,
    },
    {"train_runtime": 1.0, "step": 4},
]


def test_series_skip_nan_and_missing():
    series = telemetry_series(HISTORY)
    assert series["loss"] == ([2, 4], [3.0, 2.5])
    assert series["proxsparse/mask_flips"] == ([4], [40.0])


def test_plot_single_and_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    one = plot_telemetry(HISTORY, tmp_path / "one.png")
    many = plot_telemetry({"a": HISTORY, "b": HISTORY[:1]}, tmp_path / "many.png", title="t")
    for path in (one, many):
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No ProxSparse telemetry"):
        plot_telemetry([{"loss": 1.0}], tmp_path / "none.png")


def test_entries_keep_only_telemetry_keys():
    from proxsparse_hf.evaluation.telemetry import telemetry_entries

    history = [*HISTORY, {"step": 5, "eval_loss": 2.0}, {"step": 6, "learning_rate": 1e-3, "grad_norm": 0.5}]
    entries = telemetry_entries(history)
    assert entries == [
        HISTORY[0],
        HISTORY[1],
        {"step": 6, "learning_rate": 1e-3},
    ]  # runtime / eval-only entries dropped


def test_plot_telemetry_of_eval_results(tmp_path):
    pytest.importorskip("matplotlib")
    from proxsparse_hf.evaluation import EvalResults

    rows = [
        EvalResults(model="m", method="proxsparse", label="a", telemetry=HISTORY[:2]),
        EvalResults(model="m", method="dense"),
    ]
    path = plot_telemetry(rows, tmp_path / "rows.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No ProxSparse telemetry"):
        plot_telemetry(rows[1:], tmp_path / "none.png")


# ---------------------------------------------------------------- per-weight statistics (learning/telemetry.py)
def _tricky(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random weights with many exact ties, zeros (+0 and -0), sign flips and a few NaNs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    u = torch.rand(rows, cols, generator=g)
    x = torch.where(u < 0.15, torch.zeros(()), x)
    x = torch.where((u >= 0.15) & (u < 0.45), torch.round(x * 2) / 2, x)  # ties within groups
    x = torch.where((u >= 0.45) & (u < 0.5), -x, x)
    x = torch.where((u >= 0.5) & (u < 0.52), torch.full((), float("nan")), x)
    x = torch.where((u >= 0.52) & (u < 0.55), -torch.zeros(()), x)
    return x.to(dtype)


def _reference(view, scale=None, previous=None, original=None, stride=1):
    """Brute force, one group at a time in Python floats: ([codes], [ok, flips, regulariser, distance])."""
    rows, cols = view.shape
    codes, ok, flips, reg = [], 0, 0, 0.0
    for r in range(rows):
        for g0 in range(0, cols, 4):
            raw = [float(view[r, g0 + i]) for i in range(4)]
            ok += sum(v != 0 for v in raw) <= 2  # NaN != 0
            vals = [v * float(scale[g0 + i]) if scale is not None else v for i, v in enumerate(raw)]
            if scale is not None:  # the product as float32, like the torch rule
                vals = [float(torch.tensor(raw[i], dtype=torch.float32) * scale[g0 + i]) for i in range(4)]
            mags = [math.inf if math.isnan(v) else abs(v) for v in vals]
            code = 0
            for i in range(4):
                rank = sum(mags[j] > mags[i] or (mags[j] == mags[i] and j < i) for j in range(4))
                code |= (rank < 2) << i
            codes.append(code)
            a = [abs(v) for v in vals]
            reg += sum(a[i] * a[j] * a[k] for i, j, k in itertools.combinations(range(4), 3))
            if previous is not None:
                flips += int(previous[len(codes) - 1]) != code
    dist = 0.0
    if original is not None:
        for k, r in enumerate(range(0, rows, stride)):
            dist += sum(abs(float(view[r, c]) - float(original[k, c])) for c in range(cols))
    return codes, [ok, flips, reg, dist]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("stride", [1, 4])
def test_group_statistics_torch_path_matches_brute_force(dtype, scaled, stride):
    from proxsparse_hf.learning.telemetry import group_statistics, sample_rows

    view = _tricky(9, 24, dtype, seed=int(scaled) + 2 * stride)
    scale = torch.rand(24, generator=torch.Generator().manual_seed(1)) + 0.25 if scaled else None
    original = sample_rows((view.float() + 0.1).to(dtype), stride)
    first_codes, first = group_statistics(view, scale)
    want_codes, want = _reference(view, scale)
    assert first_codes.dtype == torch.uint8 and first_codes.tolist() == want_codes
    assert first.dtype == torch.float64 and first[[0, 1, 3]].tolist() == [want[0], 0.0, 0.0]
    assert math.isnan(first[2]) and math.isnan(want[2])  # NaN weights: NaN regulariser, as before

    previous = first_codes.clone()
    previous[::3] = (previous[::3] + 1) % 16  # a third of the groups "changed"
    codes, sums = group_statistics(view, scale, previous, original=original, original_row_stride=stride)
    want_codes, want = _reference(view, scale, previous, original, stride)
    assert codes.tolist() == want_codes
    assert sums[0] == want[0] and sums[1] == want[1] == len(range(0, len(codes), 3))
    assert math.isnan(sums[3]) and math.isnan(want[3])

    finite = torch.nan_to_num(view, nan=0.5)  # the regulariser and the distance on finite values
    original = sample_rows((finite.float() * 0.75 + 0.1).to(dtype), stride)
    _, sums = group_statistics(finite, scale, original=original, original_row_stride=stride)
    _, want = _reference(finite, scale, original=original, stride=stride)
    assert float(sums[2]) == pytest.approx(want[2], rel=1e-5) and want[2] > 0
    assert float(sums[3]) == pytest.approx(want[3], rel=1e-6) and want[3] > 0


def test_group_statistics_of_a_transposed_view_and_bad_strides():
    from proxsparse_hf.learning.telemetry import group_statistics

    storage = _tricky(16, 12, seed=3).nan_to_num(nan=0.5)  # a Conv1D-style [in, out] weight: groups along dim 0
    codes, sums = group_statistics(storage.t(), original=storage.t() * 2)
    want_codes, want = _reference(storage.t().contiguous(), original=storage.t().contiguous() * 2)
    assert codes.tolist() == want_codes and sums[0] == want[0]
    assert float(sums[3]) == pytest.approx(want[3], rel=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        group_statistics(storage, original_row_stride=3)


def test_sample_rows_takes_every_stride_th_row_and_row_zero_at_least():
    from proxsparse_hf.learning.telemetry import DISTANCE_ROW_STRIDE, distance_row_stride, sample_rows

    x = torch.arange(130 * 4.0).reshape(130, 4)
    assert torch.equal(sample_rows(x, 64), x[[0, 64, 128]])
    assert torch.equal(sample_rows(x[:40], 64), x[:1])  # fewer rows than the stride: row 0
    assert torch.equal(sample_rows(x, 1), x) and sample_rows(x.t(), 2).is_contiguous()
    assert distance_row_stride(x, x) == 1
    assert distance_row_stride(x, torch.empty(0, device="meta")) == DISTANCE_ROW_STRIDE == 64


def _moved_learner():
    from tiny_models import tiny_model

    from proxsparse_hf import ProxSparseConfig
    from proxsparse_hf.learning.learner import MaskLearner

    torch.manual_seed(0)
    learner = MaskLearner(tiny_model("llama"), ProxSparseConfig(lambda1=0.5))  # CPU model, CPU snapshot
    with torch.no_grad():
        for s in learner.shards.values():
            s.target.weight.add_(0.01 * torch.randn_like(s.target.weight))
    learner.prox_step(1, 10)
    return learner


def _exact_distance(learner) -> float:
    total = numel = 0.0
    for s in learner.shards.values():
        w = s.target.weight.detach()
        total += float((w.double() - learner.original[s.name].double()).abs().sum())
        numel += w.numel()
    return total / numel


def test_statistics_with_a_cpu_snapshot_of_a_cpu_model_are_exact():
    from proxsparse_hf.learning.regularizers import regularizer_2to4

    learner = _moved_learner()
    shards = list(learner.shards.values())
    with torch.no_grad():  # moves one row that no row sample (row 0, 64, ...) would see
        shards[0].target.weight[1].add_(10.0)
    stats = learner.statistics()
    assert stats["proxsparse/dist_to_original"] == pytest.approx(_exact_distance(learner), rel=1e-6)
    reg = sum(float(regularizer_2to4(s.grouped(s.target.weight.detach()).double())) for s in shards)
    assert stats["proxsparse/regularizer"] == pytest.approx(reg, rel=1e-5)
    assert learner._snapshot_rows is None  # nothing sampled, nothing cached
    assert math.isnan(stats["proxsparse/mask_flips"])  # no previous call: nothing to compare with
    assert learner.statistics()["proxsparse/mask_flips"] == 0.0


@pytest.mark.parametrize("stride", [1, 2, 64])
def test_statistics_estimate_the_distance_on_cached_rows(monkeypatch, stride):
    """The path of a snapshot held on another device (forced here on CPU): the distance over rows 0, k, 2k, ... of
    every weight, scaled to the weight's size; cached rows are taken once."""
    from proxsparse_hf.learning import telemetry

    learner = _moved_learner()
    exact = learner.statistics()
    monkeypatch.setattr(telemetry, "distance_row_stride", lambda snapshot, weight: stride)
    got = learner.statistics()
    total = numel = 0.0
    for s in learner.shards.values():
        w, w0 = s.target.weight.detach(), learner.original[s.name]
        sampled = (w[::stride].double() - w0[::stride].double()).abs().sum()
        total += float(sampled) * w.numel() / w[::stride].numel()
        numel += w.numel()
    assert got["proxsparse/dist_to_original"] == pytest.approx(total / numel, rel=1e-6)
    if stride == 1:
        assert got["proxsparse/dist_to_original"] == pytest.approx(exact["proxsparse/dist_to_original"], rel=1e-6)
    else:
        assert got["proxsparse/dist_to_original"] != pytest.approx(exact["proxsparse/dist_to_original"], rel=1e-9)
    for key in ("proxsparse/frac_2to4", "proxsparse/regularizer"):
        assert got[key] == exact[key]
    assert got["proxsparse/mask_flips"] == 0.0
    if stride == 1:  # the exact path: nothing cached
        assert learner._snapshot_rows is None
        return
    cached = {name: rows for name, (_, _, rows) in learner._snapshot_rows.items()}
    assert all(rows.shape[0] == -(-learner.original[name].shape[0] // stride) for name, rows in cached.items())
    learner.statistics()
    assert all(learner._snapshot_rows[name][2] is rows for name, rows in cached.items())  # not copied again
