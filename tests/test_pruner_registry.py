"""The pruner registry: specs and labels, option declaration and validation, a toy pruner registered from a test (through
prune() and the `proxsparse prune` parser), the learned and dense entries, and `prune --method ria/dense` end to end."""

from __future__ import annotations

import argparse
import contextlib
import os
import re

import pytest
import torch
from test_evaluation import CORPUS, byte_model, byte_tokenizer, write_jsonl
from tiny_models import random_windows, tiny_model

from proxsparse_hf.artefacts import load_output_dir
from proxsparse_hf.cli import build_parser
from proxsparse_hf.commands import prune as prune_cmd
from proxsparse_hf.constants import SUPPORTED_M
from proxsparse_hf.masks import load_masks
from proxsparse_hf.pruners import (
    PrunerOption,
    SequentialPruner,
    get_pruner,
    prune,
    pruner_names,
    register_pruner,
    unregister_pruner,
)
from proxsparse_hf.targets import find_targets

BUILT_IN = {
    "dense": "dense",
    "magnitude": "Magnitude",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "ria": "RIA",
    "proxsparse": "ProxSparse",
}


def test_built_in_methods_and_labels():
    assert set(BUILT_IN) <= set(pruner_names())
    for name, label in BUILT_IN.items():
        spec = get_pruner(name)
        assert (spec.name, spec.label) == (name, label)
        assert spec.description and callable(spec.fn)
    assert [n for n in pruner_names() if get_pruner(n).learned] == ["proxsparse"]
    assert {n for n in BUILT_IN if get_pruner(n).needs_calibration} == {"wanda", "sparsegpt", "ria", "proxsparse"}
    assert [n for n in BUILT_IN if get_pruner(n).updates_weights] == ["sparsegpt"]
    assert get_pruner("sparsegpt").defaults == {"update_weights": True, "damp_percent": 0.01, "block_size": 128}
    assert get_pruner("ria").defaults == {"alpha": 0.5}
    assert get_pruner("wanda").defaults == {} == get_pruner("magnitude").defaults


def test_method_names_are_not_constants():
    """Method names live in the registry only: no stale copy in constants (a new pruner needs no edit there)."""
    from proxsparse_hf import constants

    with pytest.raises(AttributeError, match="METHODS"):
        constants.METHODS  # noqa: B018


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=rf"`method`='obs' is invalid; allowed: {re.escape(str(pruner_names()))}"):
        get_pruner("obs")
    with pytest.raises(ValueError, match=r"`method`='obs' is invalid"):
        unregister_pruner("obs")


# ------------------------------------------------------------------------------------------------------------ toy
def keep_first_two_masks(targets, start: int) -> dict[str, torch.Tensor]:
    """Positions ``start`` and ``start + 1`` of every group of four along the input dimension."""
    masks = {}
    for target in targets.values():
        mask = torch.zeros_like(target.weight, dtype=torch.bool)
        grouped = target.grouped(mask).unflatten(-1, (-1, SUPPORTED_M))
        grouped[..., start : start + 2] = True
        masks[target.param_name] = mask
    return masks


@contextlib.contextmanager
def registered_toy():
    """Register ``toy`` (keeps positions ``start``, ``start + 1`` of every group; option ``start`` in 0..2) for a while."""

    @register_pruner(
        "toy",
        label="Keep first two",
        description="Keeps two fixed positions of every group of four.",
        needs_calibration=False,
        options={
            "start": PrunerOption(0, help="First kept position.", check=lambda v: 0 <= v <= 2, allowed="0, 1 or 2")
        },
    )
    def keep_first_two(model, targets, calibration, *, show_progress=False, start=0):
        masks = keep_first_two_masks(targets, start)
        for target in targets.values():
            target.weight.mul_(masks[target.param_name])
        return masks

    try:
        yield keep_first_two
    finally:
        unregister_pruner("toy")


@pytest.fixture
def toy():
    with registered_toy() as fn:
        yield fn


def test_toy_pruner_runs_through_prune(toy):
    assert pruner_names()[-1] == "toy" and get_pruner("toy").label == "Keep first two"
    model = tiny_model("llama", hidden=32)
    targets = find_targets(model)
    original = {t.param_name: t.weight.detach().clone() for t in targets.values()}
    masks = prune(model, "toy", show_progress=True)  # the runner options are accepted for every method
    expected = keep_first_two_masks(targets, 0)
    assert list(masks) == [t.param_name for t in targets.values()]
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name])
        assert bool(mask[:, :2].all()) and not bool(mask[:, 2:4].any())
        torch.testing.assert_close(model.get_parameter(name).detach(), original[name] * mask, rtol=0, atol=0)
    masks = prune(tiny_model("llama", hidden=32), "toy", start=2)
    assert all(torch.equal(mask, keep_first_two_masks(targets, 2)[name]) for name, mask in masks.items())
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['stop'\] for method 'toy'; allowed: "):
        prune(model, "toy", stop=3)
    with pytest.raises(ValueError, match=r"`start`=3 is invalid; allowed: 0, 1 or 2"):
        prune(model, "toy", start=3)


def test_toy_pruner_appears_in_the_prune_command(capsys):
    with registered_toy():
        assert "toy" in pruner_names()
        parser = build_parser()
        args = parser.parse_args(["prune", "M", "--method", "toy", "-o", "out", "--start", "1"])
        assert (args.method, args.start) == ("toy", 1)
        assert prune_cmd.method_options("toy", args) == {"batch_size": 1, "show_progress": True, "start": 1}
        wanda = parser.parse_args(["prune", "M", "--method", "wanda", "-o", "o", "--start", "1"])
        with pytest.raises(ValueError, match=r"--start only applies to --method toy, not 'wanda'"):
            prune_cmd.check_method_flags("wanda", wanda)
        with pytest.raises(SystemExit):
            parser.parse_args(["prune", "M", "--help"])
        help_text = capsys.readouterr().out
        assert re.search(r"toy\s+Keep first two: Keeps two fixed positions", help_text)
        assert re.search(r"--start START\s+First kept position\. \(toy: default 0\)", help_text)
    assert "toy" not in pruner_names()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "M", "--method", "toy", "-o", "out"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_calibration_pruner_is_one_class():
    """A SequentialPruner subclass gets block-by-block statistics; here the per-feature max |x| picks the kept pair."""

    class MaxAbs:
        def __init__(self, in_features):
            self.value, self.num_tokens = torch.zeros(in_features), 0

        def add(self, x):
            self.value = torch.maximum(self.value, x.reshape(-1, x.shape[-1]).abs().amax(0).cpu())
            self.num_tokens += x.reshape(-1, x.shape[-1]).shape[0]

    @register_pruner(
        "maxabs", label="MaxAbs", description="Keeps the two largest max |x| features.", needs_calibration=True
    )
    class MaxAbsPruner(SequentialPruner):
        def make_stats(self, target):
            return MaxAbs(target.grouped(target.weight).shape[-1])

        def prune_target(self, target, stats):
            from proxsparse_hf.masks import mask_2to4

            scores = stats.value.expand_as(target.grouped(target.weight)).contiguous()
            mask = mask_2to4(scores)
            mask = mask.t().contiguous() if target.transposed else mask
            target.weight.masked_fill_(~mask, 0)
            return mask

    try:
        model = tiny_model("gpt2", layers=2, hidden=32)
        masks = prune(model, "maxabs", random_windows(2, 8), batch_size=2)
        targets = find_targets(model)
        assert list(masks) == [t.param_name for t in targets.values()]
        for target in targets.values():
            grouped = target.grouped(masks[target.param_name])
            assert bool((grouped.reshape(-1, 4).sum(1) == 2).all())
            assert torch.equal(grouped, grouped[:1].expand_as(grouped))  # one pattern per input feature
        with pytest.raises(ValueError, match=r"`calibration_data` is None"):
            prune(model, "maxabs")
    finally:
        unregister_pruner("maxabs")


# ------------------------------------------------------------------------------------------------ registration errors
@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("Bad Name", {}, ValueError, r"`name`='Bad Name' is invalid"),
        ("wanda", {}, ValueError, r"A pruner named 'wanda' is already registered"),
        ("fresh", {"label": " "}, ValueError, r"`label`=' ' is invalid"),
        ("fresh", {"options": {"Bad": 1}}, ValueError, r"Option name 'Bad' of pruner 'fresh' is invalid"),
        (
            "fresh",
            {"options": {"k": PrunerOption(0, check=lambda v: v > 0, allowed="an integer > 0")}},
            ValueError,
            r"`k`=0 is invalid; allowed: an integer > 0",
        ),
    ],
)
def test_registration_errors(name, kwargs, error, match):
    args = {"label": "Fresh", "description": "d", "needs_calibration": False, **kwargs}
    with pytest.raises(error, match=match):
        register_pruner(name, **args)(lambda *a, **k: {})
    assert "fresh" not in pruner_names()


def test_registering_something_without_run_is_refused():
    with pytest.raises(TypeError, match=r"decorates a function or a class with a `run` classmethod"):
        register_pruner("fresh", label="Fresh", description="d", needs_calibration=False)(int)
    assert "fresh" not in pruner_names()


@pytest.mark.parametrize(
    ("default", "good", "bad", "allowed"),
    [
        (True, [False], [0, "yes", None], "True or False"),
        (3, [0, -2], [1.5, True, "3"], "an integer"),
        (0.5, [1, 2.5], [True, float("inf"), "0.5"], "a number"),
        ("x", ["y"], [1], "a string"),
    ],
)
def test_option_values_are_checked_against_the_default_type(default, good, bad, allowed):
    option = PrunerOption(default)
    assert [option.validate("opt", v) for v in good] == good
    for value in bad:
        with pytest.raises(ValueError, match=rf"`opt`={re.escape(repr(value))} is invalid; allowed: {allowed}\."):
            option.validate("opt", value)


# ------------------------------------------------------------------------------------------------ dense, proxsparse
def test_dense_prunes_nothing():
    model = tiny_model("llama", hidden=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert prune(model, "dense") == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_proxsparse_points_to_learning():
    with pytest.raises(ValueError, match=r"'proxsparse' \(ProxSparse\) learns its mask by training: use .*learn_mask"):
        prune(tiny_model("llama", hidden=32), "proxsparse", random_windows(2, 8))
    with pytest.raises(ValueError, match=r"use proxsparse_hf.learn_mask"):
        get_pruner("proxsparse").fn(None, {}, None)


# --------------------------------------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="proxsparse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    prune_cmd.register(subparsers).set_defaults(_run=prune_cmd.run)
    args = parser.parse_args(argv)
    return args._run(args)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-cli")
    model_dir = str(root / "tiny-llama")
    byte_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    return {"root": root, "model": model_dir, "corpus": write_jsonl(root / "corpus.jsonl", CORPUS * 6)}


def test_cli_prune_ria_writes_its_options(saved_model):
    out = str(saved_model["root"] / "ria")
    calib = ["--calibration", saved_model["corpus"], "--n-samples", "4", "--seq-len", "32", "--no-progress"]
    assert run_cli(["prune", saved_model["model"], "--method", "ria", "--alpha", "1", "-o", out, *calib]) == 0
    output = load_output_dir(out)
    assert output.method == "ria" and output.report.all_2to4
    assert output.run_info["method_config"] == {"batch_size": 1, "alpha": 1.0}
    assert output.run_info["calibration"]["n_samples"] == 4
    assert len(load_masks(os.path.join(out, "proxsparse_masks.safetensors"))) == 14


def test_cli_prune_dense_and_flags_that_do_not_apply(saved_model):
    out = str(saved_model["root"] / "dense")
    assert run_cli(["prune", saved_model["model"], "--method", "dense", "-o", out, "--no-progress"]) == 0
    output = load_output_dir(out)
    assert output.method == "dense" and not output.report.all_2to4 and output.run_info["calibration"] is None
    for flags, match in (
        (["--method", "magnitude", "--alpha", "0.5"], r"--alpha only applies to --method ria, not 'magnitude'"),
        (
            ["--method", "ria", "--damp-percent", "0.1"],
            r"--damp-percent only applies to --method sparsegpt, not 'ria'",
        ),
        (["--method", "sparsegpt", "--block-size", "6"], r"`block_size`=6 is invalid"),
    ):
        with pytest.raises(ValueError, match=match):
            run_cli(["prune", saved_model["model"], *flags, "-o", str(saved_model["root"] / "never")])
    assert not os.path.exists(saved_model["root"] / "never")


def test_cli_refuses_learned_methods():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "M", "--method", "proxsparse", "-o", "out"])
