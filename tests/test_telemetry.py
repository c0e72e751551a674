import pytest

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
