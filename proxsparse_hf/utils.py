"""Small shared helpers: atomic file and folder writes, file fingerprints, library versions and hardware facts.

Every file the library writes goes through one of the atomic writers: the data is written to a temporary file in the
destination's folder and renamed into place, so a reader never sees a half-written file. :func:`staging_dir` does the
same for a whole folder (write into a temporary sibling, then swap).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ._version import __version__

__all__ = [
    "atomic_write_json",
    "atomic_write_text",
    "describe_hardware",
    "library_versions",
    "read_json",
    "regular_files",
    "save_safetensors_atomic",
    "sha256_file",
    "staging_dir",
]

_VERSIONED_LIBRARIES = ("transformers", "huggingface_hub", "safetensors", "accelerate", "peft", "datasets")


@contextlib.contextmanager
def _temporary_sibling(path: str) -> Iterator[str]:
    """A temporary file name next to ``path``; renamed onto ``path`` when the block succeeds, removed otherwise."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: give the file the mode an ordinary write gives
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = os.fspath(path)
    with _temporary_sibling(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> str:
    """Write ``data`` as JSON (``indent`` spaces, trailing newline; non-JSON values via ``str``) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON of ``path``.

    Raises:
        ValueError: the file cannot be read or is not JSON (names the file and ``what`` it should be).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Cannot read the {what} {path!r}: {exc}") from exc


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> str:
    """``safetensors.torch.save_file`` written atomically (``metadata`` values must be strings); returns the path."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    with _temporary_sibling(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
    return path


@contextlib.contextmanager
def staging_dir(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Build a folder in a temporary sibling of ``destination`` and swap it into place when the block succeeds.

    An existing ``destination`` is replaced as a whole (never written into) and removed only after the new folder is
    in place; when the block raises, the staging folder is deleted and ``destination`` is left as it was.

    Raises:
        ValueError: ``destination`` is a file or a symbolic link.
        FileExistsError: ``destination`` is a non-empty folder and ``overwrite`` is False.
    """
    destination = os.path.abspath(os.fspath(destination))
    if os.path.islink(destination):
        raise ValueError(f"`destination`={destination!r} is a symbolic link; allowed: a folder path.")
    if os.path.isfile(destination):
        raise ValueError(f"`destination`={destination!r} is a file; a directory is expected.")
    if os.path.isdir(destination) and os.listdir(destination) and not overwrite:
        raise FileExistsError(f"{destination!r} exists and is not empty; pass overwrite=True to replace it.")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.staging-", dir=parent)
    try:
        yield staging
        _apply_umask(staging)
        with _signals_deferred():  # Ctrl-C / SIGTERM (see proxsparse_hf.cli) wait until the swap is complete
            if os.path.isdir(destination):
                trash = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.old-", dir=parent)
                os.replace(destination, os.path.join(trash, "old"))
                os.replace(staging, destination)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, destination)
    except BaseException:  # also KeyboardInterrupt and the CLI's SIGTERM exception: no staging folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back for the duration of the block (main thread, Python-level handlers only) and deliver
    them afterwards, so a folder swap is never cut in half."""
    signals = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.getsignal(s) for s in signals}
    if threading.current_thread() is not threading.main_thread() or any(h is None for h in handlers.values()):
        yield
        return
    pending: list[int] = []
    for s in signals:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


def _apply_umask(folder: str) -> None:
    """Give ``folder`` and everything in it the modes the user's umask gives new files (``mkdtemp`` creates 0700 and
    safetensors / ``mkstemp`` write 0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python, proxsparse-hf, torch and the installed Hugging Face libraries (for results files)."""
    versions = {"python": platform.python_version(), "proxsparse_hf": __version__, "torch": torch.__version__}
    for name in _VERSIONED_LIBRARIES:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def describe_hardware() -> dict[str, Any]:
    """Platform, CPU count and GPU (name, count, CUDA version) for results files."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def regular_files(folder: str | os.PathLike) -> list[str]:
    """Relative paths of every file under ``folder``, refusing anything that is not a regular file or folder.

    Nothing is followed: a symbolic link anywhere inside ``folder`` (to a file or a folder, inside or outside it) is an
    error, and so is a device, socket or pipe. Used before an output folder is read for publishing, so that a link to
    a secret (``$HF_HOME/token``) can never end up in an export or on the Hub.

    Raises:
        ValueError: names the first link or special file found.
    """
    folder = os.fspath(folder)
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise ValueError(
                    f"{rel!r} in {folder!r} is a symbolic link (to {os.readlink(full)!r}); links are never followed "
                    "when publishing: replace it with a regular file."
                )
            if stat.S_ISREG(mode):
                found.append(rel)
            elif not stat.S_ISDIR(mode):
                raise ValueError(f"{rel!r} in {folder!r} is not a regular file; allowed: regular files and folders.")
    return sorted(found)
