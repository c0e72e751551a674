"""proxsparse_hf.utils: atomic writes, staging folders, link refusal, fingerprints, versions and hardware."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from proxsparse_hf.utils import (
    atomic_write_json,
    atomic_write_text,
    describe_hardware,
    library_versions,
    read_json,
    regular_files,
    save_safetensors_atomic,
    sha256_file,
    staging_dir,
)


def test_atomic_writers_round_trip_and_leave_no_temporary_file(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1, "t": torch.float16})
    assert json.loads(open(path).read()) == {"x": 1, "t": "torch.float16"} and open(path).read().endswith("}\n")
    assert read_json(path) == {"x": 1, "t": "torch.float16"}
    atomic_write_text(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    save_safetensors_atomic({"w": torch.arange(4.0)}, tmp_path / "c.safetensors", {"format": "pt"})
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == ["b.txt", "c.safetensors", "sub"]
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(ValueError, match="Circular reference"):
        loop: dict = {}
        loop["self"] = loop
        atomic_write_json(path, loop)
    assert read_json(path) == {"v": 1} and os.listdir(tmp_path) == ["a.json"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Cannot read the run info .*bad.json"):
        read_json(tmp_path / "bad.json", "run info")


def test_staging_dir_replaces_as_a_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "out"
    with staging_dir(dest) as staging:
        open(os.path.join(staging, "new"), "w").write("1")
        assert not dest.exists()  # nothing visible until the block succeeds
    assert sorted(os.listdir(dest)) == ["new"]
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        with staging_dir(dest):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(dest, overwrite=True) as staging:
            open(os.path.join(staging, "half"), "w").write("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(dest)) == ["new"]  # the old folder is untouched
    with staging_dir(dest, overwrite=True) as staging:
        open(os.path.join(staging, "newer"), "w").write("2")
    assert sorted(os.listdir(dest)) == ["newer"]  # replaced, not written into
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or trash folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        with staging_dir(tmp_path / "file"):
            pass
    os.symlink(dest, tmp_path / "link")
    with pytest.raises(ValueError, match="is a symbolic link"):
        with staging_dir(tmp_path / "link", overwrite=True):
            pass


def test_regular_files_never_follows_a_link(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.txt").write_text("b")
    assert regular_files(folder) == ["a.json", os.path.join("sub", "b.txt")]
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    os.symlink(secret, folder / "chat_template.jinja")
    with pytest.raises(ValueError, match=r"'chat_template.jinja' in .* is a symbolic link \(to '.*token'\)"):
        regular_files(folder)
    os.remove(folder / "chat_template.jinja")
    os.symlink(tmp_path, folder / "sub" / "up")  # a link to a folder, one level down
    with pytest.raises(ValueError, match=r"'sub/up' .* is a symbolic link"):
        regular_files(folder)
    os.remove(folder / "sub" / "up")
    os.mkfifo(folder / "pipe")
    with pytest.raises(ValueError, match="'pipe' .* is not a regular file"):
        regular_files(folder)


def test_fingerprint_versions_and_hardware(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()
    versions = library_versions()
    assert versions["torch"] == torch.__version__ and {"python", "proxsparse_hf", "transformers"} <= set(versions)
    hardware = describe_hardware()
    assert hardware["cpu_count"] == os.cpu_count() and "platform" in hardware
    assert (hardware["gpu"] is None) == (not torch.cuda.is_available())
