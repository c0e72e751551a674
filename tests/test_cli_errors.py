"""`proxsparse` user errors: one stderr line, exit code 2, found before any model is loaded or anything is written;
Ctrl-C exits 130 and SIGTERM 143 with one line, leaving no staging folder."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny_models import tiny_corpus, tiny_model, tiny_tokenizer

from proxsparse_hf import cli, loading
from proxsparse_hf.constants import CONFIG_NAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny saved llama, a calibration corpus, an empty / a folder without data files, and a truncated GGUF."""
    root = tmp_path_factory.mktemp("cli-errors")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in tiny_corpus(40)))
    (root / "empty.jsonl").write_text("")
    (root / "no-data").mkdir()
    (root / "no-data" / "notes.md").write_text("not a data file")
    (root / "no-config").mkdir()
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine")
    (root / "a-file").write_text("x")
    (root / "output").mkdir()
    (root / "output" / CONFIG_NAME).write_text("{}")
    return root


@pytest.fixture
def truncated_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # the tensor data is cut short
    return str(path)


@pytest.fixture
def loads(monkeypatch):
    """Record every attempt to load model weights (through the library's loader or transformers directly)."""
    calls: list[str] = []

    def refuse(what):
        def load(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} called before the user error was reported")

        return load

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(loading, "load_model", refuse("load_model"))
    monkeypatch.setattr(loading, "load_model_and_tokenizer", refuse("load_model_and_tokenizer"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    return calls


def _substitute(argv: list[str], ws, tmp_path) -> list[str]:
    names = {
        "MODEL": ws / "model",
        "CALIB": ws / "calib.jsonl",
        "OUT": tmp_path / "out",
        "TAKEN": ws / "taken",
        "FILE": ws / "a-file",
        "FILE/sub": ws / "a-file" / "sub",
        "NOCONFIG": ws / "no-config",
        "EMPTY": ws / "empty.jsonl",
        "NODATA": ws / "no-data",
        "OUTPUT": ws / "output",
    }
    return [str(names[a]) if a in names else a for a in argv]


def _assert_one_line_error(capsys, command: str, pattern: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"proxsparse {command}: error: "), err
    assert re.search(pattern, err), err
    return err


LEARN = ["learn", "MODEL", "--dataset", "CALIB", "--seq-len", "32", "--n-samples", "4", "-o", "OUT"]
PRUNE = ["prune", "MODEL", "--method", "wanda", "--calibration", "CALIB", "--seq-len", "32", "--n-samples", "4"]
PRUNE += ["-o", "OUT"]
COMPARE = ["compare", "MODEL", "--methods", "dense,wanda", "--dataset", "CALIB", "--seq-len", "32", "-o", "OUT"]


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        # the model
        (["learn", "/no/such/model", *LEARN[2:]], r"Model '/no/such/model' does not exist"),
        (["learn", "NOCONFIG", *LEARN[2:]], r"Cannot load model '.*no-config': .*config\.json"),
        (["prune", "/no/such/model", *PRUNE[2:]], r"Model '/no/such/model' does not exist"),
        (["eval", "/no/such.gguf"], r"Model '/no/such.gguf' does not exist"),
        ([*LEARN, "--gguf-file", "missing.gguf"], r"`--gguf-file`='missing.gguf' does not exist in"),
        # the output folder
        (["learn", *LEARN[1:-1], "TAKEN"], r"`--output-dir`='.*taken' exists and is not empty; pass --overwrite"),
        (["prune", *PRUNE[1:-1], "TAKEN"], r"`--output-dir`='.*taken' exists and is not empty; pass --overwrite"),
        (["prune", *PRUNE[1:-1], "FILE"], r"`--output-dir`='.*a-file' is a file; allowed: a folder"),
        (
            ["learn", *LEARN[1:-1], "FILE/sub"],
            r"`--output-dir`='.*a-file/sub' cannot be created: '.*a-file' is a file",
        ),
        (["compare", *COMPARE[1:-1], "FILE"], r"`--output`='.*a-file' is a file; allowed: a folder"),
        # the data
        (
            ["learn", "MODEL", "--dataset", "/no/such.jsonl", "-o", "OUT"],
            r"`--dataset`='/no/such.jsonl' does not exist",
        ),
        (["learn", "MODEL", "--dataset", "EMPTY", "-o", "OUT"], r"`--dataset`='.*empty.jsonl' is an empty file"),
        (["learn", "MODEL", "--dataset", "NODATA", "-o", "OUT"], r"`--dataset`='.*no-data': Directory .* holds no"),
        ([*LEARN, "--n-samples", "500"], r"yields only"),
        ([*PRUNE, "--n-samples", "500"], r"`n_samples`=500 windows of 32 tokens requested"),
        (
            ["prune", "MODEL", "--method", "wanda", "--calibration", "./nope.jsonl", "-o", "OUT"],
            r"'./nope.jsonl' does not",
        ),
        ([*COMPARE, "--dataset", "./nope.jsonl"], r"`--dataset`='./nope.jsonl' does not exist"),
        (["eval", "MODEL", "--datasets", "./nope.jsonl"], r"`--datasets`='./nope.jsonl' does not exist"),
        (["eval", "MODEL", "--datasets", "EMPTY"], r"`--datasets`='.*empty.jsonl' is an empty file"),
        ([*LEARN, "--seq-len", "1024"], r"`--seq-len`=1024 exceeds the model's max_position_embeddings=256"),
        ([*PRUNE, "--seq-len", "2048"], r"`--seq-len`=2048 exceeds the model's max_position_embeddings=256"),
        # the targets, checked on the meta-device model
        ([*LEARN, "--target-modules", "nope_proj"], r"matched no nn.Linear/Conv1D module of LlamaForCausalLM"),
        ([*PRUNE, "--target-modules", "nope_proj"], r"matched no nn.Linear/Conv1D module of LlamaForCausalLM"),
        ([*COMPARE, "--exclude-modules", r".*"], r"matched no nn.Linear/Conv1D module"),
        ([*LEARN, "--target-modules", "q_proj", "x.*"], r"one regex on its own"),
        # numeric flags
        ([*LEARN, "--lr", "nan"], r"`--lr`=nan is invalid; allowed: a finite number > 0"),
        ([*LEARN, "--lr", "-1"], r"`--lr`=-1.0 is invalid"),
        ([*LEARN, "--warmup-ratio", "1"], r"`--warmup-ratio`=1.0 is invalid; allowed: a number in \[0, 1\)"),
        ([*LEARN, "--max-steps", "0"], r"`--max-steps`=0 is invalid"),
        ([*LEARN, "--lambda1", "inf"], r"`lambda1`=inf is invalid"),
        ([*PRUNE, "--n-samples", "0"], r"`--n-samples`=0 is invalid; allowed: an integer >= 1"),
        ([*COMPARE, "--batch-size", "0"], r"`--batch-size`=0 is invalid"),
        (["eval", "MODEL", "--max-windows", "0"], r"`--max-windows`=0 is invalid"),
        (["eval", "MODEL", "--bos", "yes"], r"`bos`=True but the tokenizer has no `bos_token_id`"),
        ([*COMPARE, "--methods", "dense", "--bos", "yes"], r"`bos`=True but the tokenizer has no `bos_token_id`"),
        ([*PRUNE, "--bos", "yes"], r"`bos`=True but the tokenizer has no `bos_token_id`"),
        # argparse's own errors are one line too
        ([*LEARN, "--lr", "fast"], r"argument --lr: invalid float value: 'fast' \(see `proxsparse learn --help`\)"),
        (["prune", "MODEL", "-o", "OUT"], r"the following arguments are required: --method"),
        # export / push
        (["export", "MODEL", "OUT"], r"`output_dir`='.*model' is not a proxsparse output folder"),
        (["export", "OUTPUT", "OUT", "-o", "OUT"], r"Give the destination once: as SAVE_DIR or as -o/--output"),
        (["export", "OUTPUT", "TAKEN"], r"`SAVE_DIR`='.*taken' exists and is not empty; pass --overwrite"),
    ],
)
def test_user_errors_are_one_line_exit_2_before_any_model_load(argv, pattern, ws, tmp_path, loads, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_substitute(argv, ws, tmp_path))
    assert exc.value.code == 2
    _assert_one_line_error(capsys, argv[0], pattern)
    assert loads == []
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []  # nothing written, no staging folder
    assert os.listdir(ws / "taken") == ["keep.txt"]


@pytest.mark.parametrize("command", ["learn", "prune"])
def test_a_truncated_gguf_is_one_line_naming_the_file(command, truncated_gguf, ws, tmp_path, loads, capsys):
    argv = {"learn": LEARN[2:], "prune": ["--method", "magnitude", "-o", "OUT"]}[command]
    with pytest.raises(SystemExit) as exc:
        cli.main([command, truncated_gguf, *_substitute(argv, ws, tmp_path)])
    assert exc.value.code == 2
    err = _assert_one_line_error(capsys, command, r"Cannot read GGUF file '.*tiny\.gguf' \(the file is truncated or")
    assert "cannot reshape array" in err
    assert loads == [] and not (tmp_path / "out").exists()


def test_eval_of_a_truncated_gguf_is_one_line_naming_the_file(truncated_gguf, tmp_path, loads, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", truncated_gguf, "-o", str(tmp_path / "out")])
    assert exc.value.code == 2
    _assert_one_line_error(
        capsys, "eval", r"Cannot read GGUF file '.*tiny\.gguf' \(the file is truncated or corrupt\)"
    )
    assert loads == [] and not (tmp_path / "out").exists()  # refused from the metadata, before any weight is read


def test_eval_refuses_windows_longer_than_the_model_before_loading(ws, tmp_path, loads, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", str(ws / "model"), "--eval-seq-len", "100000", "-o", str(tmp_path / "out")])
    assert exc.value.code == 2
    _assert_one_line_error(capsys, "eval", r"`--eval-seq-len`=100000 exceeds the model's max_position_embeddings=")
    assert loads == [] and not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_is_refused_before_loading(ws, tmp_path, loads, capsys, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # running as root: permissions do not apply, so report the folder as read-only
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(parent) else real_access(p, mode))
        for argv in (LEARN[:-1], PRUNE[:-1], ["eval", "MODEL", "--datasets", "CALIB", "-o"], COMPARE[:-1]):
            with pytest.raises(SystemExit) as exc:
                cli.main([*_substitute(argv, ws, tmp_path), str(parent / "out")])
            assert exc.value.code == 2
            _assert_one_line_error(capsys, argv[0], rf"cannot be written: no write permission in '{parent}'")
    finally:
        parent.chmod(0o755)
    assert loads == [] and os.listdir(parent) == []


def test_ctrl_c_is_one_line_and_exit_130(ws, tmp_path, capsys, monkeypatch):
    from proxsparse_hf.commands import prune

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune, "run", interrupted)
    assert cli.main(_substitute(PRUNE, ws, tmp_path)) == 130
    assert capsys.readouterr().err == "proxsparse prune: interrupted\n"


DRIVER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import proxsparse_hf.hub.push as push
from proxsparse_hf import cli

def slow_build(source, folder, **kwargs):
    with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
        fh.write(b"x" * 4096)
    print("STAGING", folder, flush=True)
    time.sleep(120)
    return ["model.safetensors"]

push.build_repo_folder = slow_build
sys.exit(cli.main(["export", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize(
    ("signum", "code", "line"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_while_saving_removes_the_staging_folder(signum, code, line, ws, tmp_path):
    dest = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(ws / "output"), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["STAGING"], (ready, proc.stderr.read() if proc.poll() is not None else "")
        staging = ready[1]
        assert os.path.isdir(staging) and os.path.dirname(staging) == str(tmp_path)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == f"proxsparse export: {line}" and "Traceback" not in err, err
    assert not os.path.exists(staging) and os.listdir(tmp_path) == []  # no staging folder, no destination


def test_signals_wait_for_the_folder_swap(tmp_path):
    from proxsparse_hf.utils import _signals_deferred

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler in this process")
    with pytest.raises(cli.Terminated):
        with cli._sigterm_raises():
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                (tmp_path / "after-the-signal").write_text("still running")  # not interrupted
    assert (tmp_path / "after-the-signal").read_text() == "still running"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_default_logging_is_quiet_and_verbose_shows_third_party_info():
    try:
        cli.configure_logging(0)
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("datasets").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("proxsparse_hf.commands.learn").getEffectiveLevel() == logging.INFO
        cli.configure_logging(1)
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("gguf").getEffectiveLevel() == logging.INFO
        cli.configure_logging(0, "ERROR")
        assert logging.getLogger("proxsparse_hf").getEffectiveLevel() == logging.ERROR
    finally:
        cli.configure_logging(0)


def test_verbosity_flags_are_accepted_before_and_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "eval", "M"]).verbose == 1
    assert parser.parse_args(["eval", "M", "-vv"]).verbose == 2
    assert parser.parse_args(["eval", "M", "--log-level", "DEBUG"]).log_level == "DEBUG"


@pytest.mark.parametrize("command", ["learn", "prune", "eval", "compare"])
def test_one_flag_convention(command):
    """-o/--output/--output-dir, --dataset/--calibration, --doc-*/--calibration-*, --bos/--no-bos and the float32
    default mean the same on every command that has them."""
    parser = cli.build_parser()
    base = {"learn": ["--dataset", "d.jsonl"], "prune": ["--method", "magnitude"], "eval": [], "compare": []}[command]
    for flag in ("-o", "--output", "--output-dir"):
        assert parser.parse_args([command, "M", *base, flag, "x"]).output_dir == "x"
    args = parser.parse_args([command, "M", *base, "-o", "x"])
    assert args.dtype == "float32" and args.bos is None and args.no_bos is False
    assert parser.parse_args([command, "M", *base, "-o", "x", "--no-bos"]).bos is False
    assert parser.parse_args([command, "M", *base, "-o", "x", "--bos", "yes"]).bos is True
    if command in ("eval", "compare"):
        assert parser.parse_args([command, "M", "-o", "x", "--eval-bos", "no"]).bos is False
    if command != "eval":
        for old, new in (("--calibration", "--dataset"), ("--calibration-start", "--doc-start")):
            value = "7" if "start" in old else "c4"
            a, b = (parser.parse_args([command, "M", *base, "-o", "x", f, value]) for f in (old, new))
            assert vars(a) == vars(b)
        for spelling in (["q_proj", "v_proj"], ["q_proj,v_proj"]):
            from proxsparse_hf.commands.common import parse_target_modules

            args = parser.parse_args([command, "M", *base, "-o", "x", "--target-modules", *spelling])
            assert parse_target_modules(args.target_modules) == ["q_proj", "v_proj"]


def test_export_and_push_default_to_the_same_artefact():
    parser = cli.build_parser()
    assert parser.parse_args(["export", "a", "b"]).artefact == parser.parse_args(["push", "a", "o/r"]).artefact
    push = parser._subparsers._group_actions[0].choices["push"]
    assert "A new repo is PUBLIC unless --private is given" in push.description
