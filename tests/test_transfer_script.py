"""benchmarks/recipe_transfer.py on CPU: the CLI-derived default recipe, both benchmarks end to end with a tiny Llama
(``--tiny``) on a tiny data folder, resuming, the deadline, the summary checks and the charts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import write_jsonl
from tiny_models import tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TRANSFER_CONFIG = BENCHMARKS / "configs" / "recipe_transfer_smollm2.json"
BUDGET_CONFIG = BENCHMARKS / "configs" / "quality_budget_smollm2.json"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("recipe_transfer", BENCHMARKS / "recipe_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _docs(n: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = ["sparse", "mask", "weight", "layer", "the", "of", "two", "four", "model", "token", "group", "learn"]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data folder with the layout of ../shared/assets/data: C4 (2,000 short documents: [0, 1000) calibration,
    [1000, 2000) evaluation), WikiText-2 test and an xz-compressed Wikipedia sample."""
    root = tmp_path / "data"
    for sub in ("c4-validation-2k", "wikitext-2-raw-v1", "enwiki-2015-sample"):
        (root / sub).mkdir(parents=True)
    write_jsonl(root / "c4-validation-2k" / "c4_validation_2k.jsonl", _docs(2000, 3, 0))
    write_jsonl(root / "wikitext-2-raw-v1" / "test.jsonl", _docs(20, 40, 1))
    write_jsonl(root / "enwiki-2015-sample" / "enwiki_sample.jsonl.xz", _docs(60, 40, 2), xz=True, title="t")
    monkeypatch.setenv("PROXSPARSE_DATA_DIR", str(root))
    return root


# --------------------------------------------------------------------------------------- the CLI's default recipe
class _Stop(Exception):
    pass


def test_learn_invocation_is_what_the_cli_passes_to_learn_mask(script, data_dir, tmp_path, monkeypatch):
    from proxsparse_hf.cli import build_parser
    from proxsparse_hf.commands import learn as learn_command
    from proxsparse_hf.learning import trainer

    folder = tmp_path / "model"
    tiny_model("llama", vocab=257, hidden=64).save_pretrained(folder)
    script.byte_tokenizer().save_pretrained(folder)
    seen = {}

    def fake_learn_mask(model, data, config, **kwargs):
        seen.update(config=config.to_dict(), kwargs=kwargs, windows=data.input_ids.clone())
        raise _Stop

    monkeypatch.setattr(trainer, "learn_mask", fake_learn_mask)
    for flags in (["--dataset", "c4"], ["--dataset", "enwiki", "--bf16", "--batch-size", "16", "--lr", "0.02"]):
        flags = [*flags, "--seq-len", "32", "--n-samples", "4"]
        seen.clear()
        args = build_parser().parse_args(["learn", str(folder), *flags, "--output-dir", str(tmp_path / "out")])
        with pytest.raises(_Stop):
            learn_command.run(args)
        inv = script.learn_invocation(str(folder), flags)
        expected = dict(seen["config"], base_model_name_or_path=None)  # the CLI names the base model; we do not
        assert inv.config.to_dict() == expected
        assert inv.learn_kwargs == seen["kwargs"]
        assert torch.equal(script.load_invocation_data(inv, script.byte_tokenizer()).input_ids, seen["windows"])
    assert inv.learning_rate == 0.02 and inv.windows_per_step == 16 and inv.steps(40) == 3
    assert inv.data_spec(8)["tokens"] == 8 * 32


def test_learn_invocation_permutes_as_the_cli_does(script, data_dir, tmp_path, monkeypatch):
    """The CLI's channel permutation (``--permute auto``, the default) reaches the learned runs: the CLI permutes
    before learn_mask with the config's importance, and so does the MethodRun the benchmark builds; ``--no-permute``
    and an architecture the permutation does not support (auto) leave the channels alone, in both."""
    from proxsparse_hf.cli import build_parser
    from proxsparse_hf.commands import learn as learn_command
    from proxsparse_hf.learning import trainer
    from proxsparse_hf.permutation import folding

    real_permute = folding.permute_channels
    seen = []

    def spy_permute(model, config, importance, calibration=None, **kwargs):
        seen.append((importance, kwargs.get("batch_size")))
        return real_permute(model, config, importance, calibration, **kwargs)

    def fake_learn_mask(model, data, config, **kwargs):
        raise _Stop

    monkeypatch.setattr("proxsparse_hf.permutation.permute_channels", spy_permute)
    monkeypatch.setattr(trainer, "learn_mask", fake_learn_mask)
    base = ["--dataset", "c4", "--seq-len", "32", "--n-samples", "4"]
    for arch, extra, expected in (
        ("llama", [], "activation"),
        ("llama", ["--no-permute"], None),
        ("llama", ["--permute", "--permute-importance", "magnitude"], "magnitude"),
        ("gpt2", [], None),
    ):
        folder = tmp_path / arch
        if not folder.exists():
            tiny_model(arch, vocab=257, hidden=64).save_pretrained(folder)
            script.byte_tokenizer().save_pretrained(folder)
        seen.clear()
        flags = [*base, *extra]
        args = build_parser().parse_args(["learn", str(folder), *flags, "--output-dir", str(tmp_path / "out")])
        with pytest.raises(_Stop):
            learn_command.run(args)
        assert seen == ([] if expected is None else [(expected, 2)])
        inv = script.learn_invocation(str(folder), flags)
        model, _, _ = script.load_model(
            {"model": str(folder)}, argparse.Namespace(model=None, tiny=False, device="cpu"), "float32"
        )
        inv.resolve_permutation(model)
        assert inv.permute == expected and inv.to_dict()["permute"] == expected
        learned = script.make_method_run({"name": "proxsparse", "method": "proxsparse"}, "x1/proxsparse", inv)
        assert learned.permute == (None if expected is None else {"importance": expected, "batch_size": 2})
        # a one-shot baseline is permuted only when its run asks for it
        assert script.make_method_run({"name": "sparsegpt", "method": "sparsegpt"}, "x1/s", inv).permute is None
        one_shot = {"name": "sparsegpt+perm", "method": "sparsegpt", "permute": {}}
        assert script.make_method_run(one_shot, "x1/sparsegpt+perm", inv).permute == {}


def test_the_default_invocation_has_no_tuning_flags(script):
    exp = json.loads(TRANSFER_CONFIG.read_text())
    assert exp["learn_flags"] == ["--dataset", "c4"]
    inv = script.learn_invocation("model", exp["learn_flags"])
    assert inv.learn_kwargs["learning_rate"] is None  # the recipe's own
    from proxsparse_hf.config import ProxSparseConfig

    assert inv.config.to_dict() == ProxSparseConfig.recommended().to_dict()
    with pytest.raises(ValueError, match="single-process"):
        script.learn_invocation("model", ["--dataset", "c4", "--fsdp"])


def test_learn_flags_are_appended_after_the_experiments_and_win(script):
    exp = json.loads(BUDGET_CONFIG.read_text())
    args = script.build_parser().parse_args(
        ["budget", str(BUDGET_CONFIG), "--output", "o.json", "--learn-flags", "--lambda2 1e-3 --batch-size 64"]
    )
    flags = script.experiment_flags(exp, args)
    assert flags == [*exp["learn_flags"], "--lambda2", "1e-3", "--batch-size", "64"]
    inv = script.learn_invocation("model", flags)
    assert inv.config.lambda2 == pytest.approx(1e-3) and inv.windows_per_step == 64  # the later --batch-size wins
    assert "--lambda2 1e-3" in inv.to_dict()["command"]  # recorded with the results
    plain = script.build_parser().parse_args(["budget", str(BUDGET_CONFIG), "--output", "o.json"])
    assert script.experiment_flags(exp, plain) == exp["learn_flags"]


# ------------------------------------------------------------------------------------------------ variants
def test_mix_factors_are_log_uniform_per_projection_and_seeded(script):
    model = tiny_model("llama")
    variant = {"name": "mix", "log_uniform": [0.2, 5.0], "seed": 3}
    factors = script.variant_factors(model, variant)
    assert sorted(factors) == sorted(script.input_side_modules(model))
    assert len(factors) == 2 * 5 and all(0.2 <= f <= 5.0 for f in factors.values())
    assert len(set(factors.values())) == len(factors)
    assert factors == script.variant_factors(model, variant)
    assert factors != script.variant_factors(model, dict(variant, seed=4))
    assert script.variant_factors(model, {"name": "x5", "factor": 5}) == 5.0


def test_apply_variant_preserves_the_function_and_records_the_factors(script):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = script.probe_logits(model, ids)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    info = script.apply_variant(model, {"name": "mix", "log_uniform": [0.2, 5.0], "seed": 0})
    assert torch.allclose(script.probe_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q)
    assert info["weights_rescaled"] == 14 and 0.2 <= info["factor_min"] < info["factor_max"]
    untouched = tiny_model("llama")
    assert script.apply_variant(untouched, {"name": "x1", "factor": 1.0}) == {"variant": "x1", "factor": 1.0}


@pytest.mark.parametrize(
    ("variants", "match"),
    [
        ([], "non-empty list"),
        ([{"name": "a", "factor": 2}, {"name": "a", "factor": 3}], "unique `name`"),
        ([{"name": "a/b", "factor": 2}], "unique `name`"),
        ([{"name": "a"}], "exactly one of"),
        ([{"name": "a", "factor": 2, "log_uniform": [1, 2]}], "exactly one of"),
        ([{"name": "a", "factor": 0}], "a number > 0"),
        ([{"name": "a", "log_uniform": [2, 1]}], r"\[lo, hi\]"),
    ],
)
def test_bad_variants_are_refused(script, variants, match):
    with pytest.raises(ValueError, match=match):
        script.check_variants(variants)


# --------------------------------------------------------------------------------------------- summaries
def _row(label, method, wiki, c4):
    from proxsparse_hf.evaluation import EvalResults

    entry = {"num_tokens": 10, "num_windows": 1, "seq_len": 8}
    return EvalResults(
        model="m",
        method=method,
        label=label,
        perplexity={"wikitext2": {"ppl": wiki, "nll": math.log(wiki), **entry}, "c4": {"ppl": c4, "nll": 1, **entry}},
    )


def test_invariance_summary_checks(script):
    exp = json.loads(TRANSFER_CONFIG.read_text())
    rows = [
        _row("x1/dense", "dense", 25.0, 30.0),
        _row("x5/dense", "dense", 25.0 * (1 + 1e-6), 30.0),
        _row("x1/sparsegpt", "sparsegpt", 100.0, 110.0),
        _row("x5/sparsegpt", "sparsegpt", 100.0, 110.0),
        _row("x1/proxsparse", "proxsparse", 70.0, 72.0),
        _row("x5/proxsparse", "proxsparse", 77.0, 109.0),
    ]
    s = script.invariance_summary(rows, exp)
    assert s["dense_max_rel_diff"] == pytest.approx(1e-6)
    assert s["spread"]["proxsparse"] == pytest.approx({"wikitext2": 0.1, "c4": 109 / 72 - 1})
    assert s["default_within_tolerance"] is False
    assert s["default_beats_baseline"] == {
        "x1": {"wikitext2": True, "c4": True},
        "x5": {"wikitext2": True, "c4": True},
    }
    assert s["default_beats_baseline_everywhere"] is True and s["reference_variant_no_worse"] is True
    rows[-1] = _row("x5/proxsparse", "proxsparse", 71.0, 111.0)
    s = script.invariance_summary(rows, exp)
    assert s["default_within_tolerance"] is False and s["default_beats_baseline_everywhere"] is False
    assert s["default_beats_baseline"]["x5"] == {"wikitext2": True, "c4": False}
    md = script.invariance_markdown(rows, exp, s, "/somewhere/SmolLM2.gguf")
    assert "| proxsparse | 70.00 | – | 71.00 | – |" in md and "on x5: wikitext2: yes, c4: NO" in md


@pytest.mark.parametrize(
    ("value", "tokens"), [("0.4M", 400_000), ("20M", 20_000_000), ("2k", 2000), (4096, 4096), ("1e3", 1000)]
)
def test_parse_budget(script, value, tokens):
    assert script.parse_budget(value) == tokens


def test_bad_budget_is_refused(script):
    for bad in ("lots", "0", "-3M"):
        with pytest.raises(ValueError, match="budget"):
            script.parse_budget(bad)


def test_budget_plan_rounds_to_whole_steps(script):
    plan = script.budget_plan([4_000_000, 400_000, 19_000_000], seq_len=1024, windows_per_step=16)
    assert plan == [("0.4M", 400_000, 24 * 16), ("4M", 4_000_000, 244 * 16), ("19M", 19_000_000, 1160 * 16)]
    assert script.budget_plan([10], seq_len=64, windows_per_step=4) == [("10", 10, 4)]


# ------------------------------------------------------------------------------------------- end to end (tiny)
def test_invariance_end_to_end_resume_and_deadline(script, data_dir, tmp_path):
    out = tmp_path / "transfer.json"
    base = ["invariance", str(TRANSFER_CONFIG), "--tiny", "--output", str(out), "--device", "cpu"]
    assert script.main([*base, "--runs", "dense,sparsegpt,proxsparse", "--variants", "x1,mix"]) == 0
    data = json.loads(out.read_text())
    labels = [r["label"] for r in data["results"]]
    assert labels == ["x1/dense", "x1/sparsegpt", "x1/proxsparse", "mix/dense", "mix/sparsegpt", "mix/proxsparse"]
    assert data["smoke_test"] is True and data["learn_invocation"]["learn_kwargs"]["max_steps"] == 2
    assert data["variants"]["mix"]["probe_logits_max_rel_diff"] < 1e-5
    assert data["invariance"]["dense_max_rel_diff"] < 1e-5
    learned = data["results"][2]["method_config"]
    assert learned["proxsparse_config"]["step_scaling"] == "weight_rms" and learned["learning_rate"] > 0
    assert learned["calibration"]["dataset"] == "c4" and learned["calibration"]["n_samples"] == 8
    assert data["results"][5]["method_config"]["rescale"]["weights_rescaled"] == 14
    for row in data["results"][1:3]:
        assert row["sparsity"]["all_2to4"] and row["perplexity"]["wikitext2"]["num_windows"] == 2
    assert "| dense |" in (tmp_path / "transfer.md").read_text()
    assert (tmp_path / "transfer.png").is_file()
    # resume: done rows are kept as they are, the optional lr run only on x1
    stamps = {r["label"]: r["created_at"] for r in data["results"]}
    more = ["--runs", "dense,proxsparse-lr2", "--variants", "x1,x5", "--skip-done"]
    assert script.main([*base, *more]) == 0
    data = json.loads(out.read_text())
    got = {r["label"]: r for r in data["results"]}
    assert set(got) == {*stamps, "x5/dense", "x1/proxsparse-lr2"}
    assert all(got[k]["created_at"] == v for k, v in stamps.items())
    lr = got["x1/proxsparse-lr2"]["method_config"]
    assert lr["training"]["learning_rate"] == pytest.approx(2 * learned["learning_rate"])
    # --deadline-s 0: the first run starts (nothing measured yet), every later one is estimated to overrun
    assert script.main([*base, "--runs", "wanda,sparsegpt", "--variants", "x0.2,x5", "--deadline-s", "0"]) == 0
    data = json.loads(out.read_text())
    assert "x0.2/sparsegpt" in {r["label"] for r in data["results"]}  # runs in experiment order, then variants
    assert data["skipped"] == ["x5/sparsegpt", "x0.2/wanda", "x5/wanda"]


def test_budget_end_to_end_and_plots(script, data_dir, tmp_path):
    out = tmp_path / "budget.json"
    argv = ["budget", str(BUDGET_CONFIG), "--tiny", "--budgets", "1k,4k", "--output", str(out), "--device", "cpu"]
    assert script.main(argv) == 0
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["dense", "1k", "4k"]
    assert data["data"]["windows"] == 64 and data["data"]["streaming"] is True  # 4 steps x 16 windows, streamed
    small, large = (r["method_config"] for r in data["results"][1:])
    assert small["budget"]["windows"] == 16 and large["budget"]["windows"] == 64
    for run in (small, large):  # --tiny sets --max-steps 2: the Trainer takes exactly 2 steps (2 epochs of 1k)
        assert run["budget"]["steps"] == 2 and run["budget"]["tokens"] == 2 * 16 * 64
    assert large["training"]["bf16"] is True and large["training"]["per_device_train_batch_size"] == 16
    assert large["calibration"]["dataset"] == "enwiki" and large["budget"]["tokens_per_s"] > 0
    assert "| 4k | 2,048 | 2 |" in (tmp_path / "budget.md").read_text()
    assert (
        str(tmp_path) not in (tmp_path / "budget.md").read_text()
    )  # commands as the JSON records them: no local path
    # invariance in two parts (as parallel processes would), merged
    inv = ["invariance", str(TRANSFER_CONFIG), "--tiny", "--device", "cpu"]
    parts = [str(tmp_path / "part1.json"), str(tmp_path / "part2.json")]
    assert script.main([*inv, "--output", parts[0], "--runs", "dense,sparsegpt", "--variants", "x1"]) == 0
    assert script.main([*inv, "--output", parts[1], "--runs", "dense", "--variants", "x5"]) == 0
    transfer = tmp_path / "transfer.json"
    assert script.main(["merge", *parts, "--output", str(transfer)]) == 0
    merged = json.loads(transfer.read_text())
    assert [r["label"] for r in merged["results"]] == ["x1/dense", "x1/sparsegpt", "x5/dense"]
    assert set(merged["variants"]) == {"x1", "x5"} and len(merged["commands"]) == 3
    assert merged["invariance"]["dense_max_rel_diff"] < 1e-5 and merged["smoke_test"] is True
    assert (tmp_path / "transfer.md").read_text().count("\n    python ") == 3  # the commands of both parts and merge
    assert str(tmp_path) not in (tmp_path / "part1.md").read_text() + (tmp_path / "transfer.md").read_text()
    for name in ("budget.png", "budget.md", "transfer.md", "transfer.png"):
        os.remove(tmp_path / name)
    assert script.main(["plot", "--budget", str(out), "--transfer", str(transfer)]) == 0
    for name in ("budget.png", "budget_telemetry.png", "budget.md", "transfer.md", "transfer.png"):
        assert (tmp_path / name).stat().st_size > 0
    # one table of the learned runs of several files, with the flags a file added beyond its experiment's
    flagged = tmp_path / "flagged.json"
    argv = [*argv[:4], "1k", "--output", str(flagged), "--device", "cpu", "--learn-flags", "--lr 0.02 --grad-accum 2"]
    assert script.main(argv) == 0
    sweep = tmp_path / "sweep.md"
    sweep_argv = ["sweep", str(out), str(flagged), str(transfer), "--output", str(sweep), "--note", "n"]
    assert script.main(sweep_argv) == 0
    rows = script.sweep_rows([str(out), str(flagged), str(transfer)])
    smoke = "--seq-len 64 --max-steps 2 --logging-steps 1 --device cpu"  # --tiny's flags, beyond the experiment's too
    assert [(r["file"], r["run"], r["flags"]) for r in rows] == [
        ("budget", "1k", smoke),
        ("budget", "4k", smoke),
        ("flagged", "1k", f"--lr 0.02 --grad-accum 2 {smoke}"),
    ]  # dense and one-shot rows are left out
    assert rows[2]["learning_rate"] == pytest.approx(0.02) and rows[0]["batch"] == 16 and rows[0]["steps"] == 2
    assert rows[2]["batch"] == 32  # windows per optimizer step: 16 x 2 accumulated
    table = sweep.read_text()
    assert table.rstrip().endswith("--note n") and "\nCommand:\n\n    python recipe_transfer.py sweep " in table
    assert (
        f"| flagged | 1k | `--lr 0.02 --grad-accum 2 {smoke}` | activation | 0.02 | 32 | 2 | 4,096 |" in table
        and table.startswith("# Recipe sweep\n\nn\n")
    )


def test_sweep_averages_runs_that_differ_only_by_their_seed(script):
    def row(file, seed, lr, wiki, settings_lr=None, batch=2):
        settings = json.dumps(["x1/proxsparse", settings_lr or lr, {"per_device_train_batch_size": batch}, {}])
        return {
            "file": file,
            "run": "x1/proxsparse",
            "flags": "",
            "learning_rate": lr,
            "batch": batch,
            "steps": None,
            "tokens": 100,
            "ppl": {"wikitext2": wiki, "c4": wiki + 1},
            "seed": seed,
            "settings": settings,
        }

    rows = [
        row("a", 0, 0.016, 70.0),
        row("b", 1, 0.016, 74.0),
        row("c", 0, 0.003, 60.0),  # other settings: a group of one seed, no mean
        row("d", 2, 0.016, 75.0, batch=4),  # same lr, another batch: not averaged with a, b
        row("e", 2, 0.016, 72.0),
    ]
    (mean,) = script.seed_means(rows)
    assert mean["files"] == ["a", "b", "e"] and mean["seeds"] == [0, 1, 2]
    assert mean["ppl"] == pytest.approx({"wikitext2": 72.0, "c4": 73.0})
    table = script.sweep_markdown(rows, "t")
    assert "| a, b, e | 0, 1, 2 | – | 0.016 | 2 | 72.00 | 73.00 |" in table
    assert "Means over seeds" not in script.sweep_markdown(rows[2:4], "t")


def test_sweep_rows_tell_permuted_runs_apart(script, tmp_path):
    """Two learned runs that differ by the channel permutation before learning (and their seed) are not averaged."""
    from proxsparse_hf.evaluation import EvalResults, save_comparison

    def result_file(name, seed, permutation):
        mc = {
            "proxsparse_config": {"lambda1": 0.03},
            "training": {"seed": seed, "per_device_train_batch_size": 2},
            "learning_rate": 0.016,
            **({"permutation": {"importance": permutation}} if permutation else {}),
        }
        ppl = {"wikitext2": {"ppl": 70.0 + seed, "nll": 4.0, "num_tokens": 10, "num_windows": 1, "seq_len": 8}}
        row = EvalResults(model="m", method="proxsparse", label="x1/proxsparse", method_config=mc, perplexity=ppl)
        path = tmp_path / f"{name}.json"
        save_comparison(path, [row], learn_invocation={"command": "proxsparse learn MODEL --output-dir OUT"})
        return str(path)

    rows = script.sweep_rows([result_file("a", 0, None), result_file("b", 1, "activation")])
    assert [r["permutation"] for r in rows] == [None, "activation"]
    assert script.seed_means(rows) == []
    rows = script.sweep_rows([result_file("c", 0, "activation"), result_file("d", 1, "activation")])
    (mean,) = script.seed_means(rows)
    assert mean["permutation"] == "activation" and mean["ppl"]["wikitext2"] == pytest.approx(70.5)
    assert "| c | x1/proxsparse | – | activation | 0.016 | 2 |" in script.sweep_markdown(rows, "t")
