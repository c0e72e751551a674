"""push_pruned_to_hub against the real local Hub server (minihub): every artefact, privacy, updates, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import uuid

import pytest
import torch
from conftest import HUB_OTHER_TOKEN, HUB_TOKEN, start_minihub
from huggingface_hub import HfApi, hf_hub_download
from test_export import assert_state_equal
from tiny_models import tiny_model

from proxsparse_hf.artefacts import load_pruned, save_pruned_output
from proxsparse_hf.config import ProxSparseConfig
from proxsparse_hf.constants import CARD_NAME, EVAL_RESULTS_NAME
from proxsparse_hf.evaluation.results import EvalResults
from proxsparse_hf.hub.checks import check_model_card
from proxsparse_hf.hub.push import PushError, is_transient_error, push_pruned_to_hub
from proxsparse_hf.hub.results import CHART_NAME
from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks

pytestmark = pytest.mark.usefixtures("hub_url")  # skipped where the local Hub server is not available


def _name(prefix: str) -> str:
    return f"alice/{prefix}-{uuid.uuid4().hex[:8]}"


def _output(tmp_path, family, *, base=None, revision=None, eval_results=None, **model_kwargs):
    model = tiny_model(family, **model_kwargs)
    config = ProxSparseConfig(base_model_name_or_path=base or f"tiny-org/{family}", revision=revision)
    masks = extract_2to4_masks(model, config)
    apply_2to4_masks(model, masks)
    out = save_pruned_output(
        tmp_path / f"out-{family}",
        model,
        None,
        config=config,
        masks=masks,
        method="magnitude",
        run_info={"command": f"proxsparse prune tiny-org/{family} --method magnitude"},
    )
    if eval_results is not None:
        with open(os.path.join(out.path, EVAL_RESULTS_NAME), "w") as fh:
            json.dump(eval_results, fh)
    return out, model


@pytest.fixture(scope="module")
def base_repo():
    """An unpruned tiny Llama on the local Hub: the base model of the mask adapter."""
    repo = _name("tiny-base")
    model = tiny_model("llama")
    model.push_to_hub(repo)
    return repo, HfApi().model_info(repo).sha


@pytest.fixture(scope="module")
def llama_output(tmp_path_factory, base_repo):
    repo, sha = base_repo
    wikitext2 = {"ppl": 321.5, "nll": 5.77, "num_tokens": 2048, "num_windows": 4, "seq_len": 512}
    results = EvalResults(
        model=repo, method="magnitude", perplexity={"wikitext2": wikitext2}, zeroshot={"piqa": {"acc": 0.52}}
    ).to_dict()
    return _output(tmp_path_factory.mktemp("llama"), "llama", base=repo, revision=sha, eval_results=results)


@pytest.mark.parametrize("artefact", ["dense", "compact", "mask"])
def test_push_each_artefact_round_trip(llama_output, artefact):
    out, model = llama_output
    repo = _name(f"tiny-{artefact}")
    url = push_pruned_to_hub(out.path, repo, artefact=artefact)
    assert repo in url and "/commit/" in url
    files = set(HfApi().list_repo_files(repo))
    assert {CARD_NAME, CHART_NAME, "proxsparse_config.json", "sparsity_report.json", EVAL_RESULTS_NAME} <= files
    loaded = load_pruned(repo)  # the mask adapter downloads its base model at the recorded revision
    assert_state_equal(model, loaded)
    card = open(hf_hub_download(repo, CARD_NAME)).read()
    meta = check_model_card(card)
    assert meta["tags"][:4] == ["sparsity", "2:4", "semi-structured", "proxsparse"]
    assert meta["base_model_relation"] == ("adapter" if artefact == "mask" else "quantized")
    assert meta["library_name"] == ("transformers" if artefact == "dense" else "proxsparse-hf")
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 321.5
    if artefact == "dense":
        from transformers import AutoModelForCausalLM

        assert_state_equal(model, AutoModelForCausalLM.from_pretrained(repo))


def test_push_in_memory_gpt2_compact_bf16(tmp_path):
    model = tiny_model("gpt2")
    apply_2to4_masks(model, extract_2to4_masks(model))
    repo = _name("tiny-gpt2")
    push_pruned_to_hub(
        model,
        repo,
        artefact="compact",
        dtype="bfloat16",
        config=ProxSparseConfig(base_model_name_or_path="openai-community/gpt2"),
    )
    assert_state_equal(model, load_pruned(repo), torch.bfloat16)
    meta = check_model_card(open(hf_hub_download(repo, CARD_NAME)).read())
    assert meta["base_model"] == "openai-community/gpt2" and "model-index" not in meta
    assert CHART_NAME not in HfApi().list_repo_files(repo)  # no results, no chart


def test_private_repo_needs_the_owner_token(llama_output):
    out, _ = llama_output
    repo = _name("tiny-private")
    push_pruned_to_hub(out.path, repo, artefact="mask", private=True)
    assert HfApi().model_info(repo).private
    for token in (HUB_OTHER_TOKEN, False):
        with pytest.raises(Exception) as info:
            HfApi(token=token).model_info(repo)
        assert getattr(getattr(info.value, "response", None), "status_code", None) in (401, 403, 404)
    assert load_pruned(repo, token=HUB_TOKEN) is not None


def test_second_push_is_a_new_commit(tmp_path, llama_output):
    out, _ = llama_output
    repo = _name("tiny-update")
    api = HfApi()
    first = push_pruned_to_hub(out.path, repo, artefact="compact")
    n_commits = len(api.list_repo_commits(repo))
    second = push_pruned_to_hub(out.path, repo, artefact="dense", commit_message="dense too")
    commits = api.list_repo_commits(repo)
    assert len(commits) == n_commits + 1 and first != second
    assert commits[0].title == "dense too"
    assert "model.safetensors" in api.list_repo_files(repo)
    branch = push_pruned_to_hub(out.path, repo, artefact="mask", revision="mask-only")
    assert "mask-only" in [b.name for b in api.list_repo_refs(repo).branches] and branch
    assert len(api.list_repo_commits(repo)) == n_commits + 1  # main untouched
    pr = push_pruned_to_hub(out.path, repo, artefact="mask", create_pr=True)
    assert len(api.list_repo_commits(repo)) == n_commits + 1  # a pull request, not a commit on main
    pulls = api.list_repo_refs(repo, include_pull_requests=True).pull_requests
    assert len(pulls) == 1 and pulls[0].ref.startswith("refs/pr/")
    assert pr not in (first, second, branch) and pulls[0].target_commit in pr  # the URL of the PR's own commit
    with pytest.raises(ValueError, match="Cannot create or access 'bob/"):
        push_pruned_to_hub(out.path, "bob/not-alices", artefact="mask")


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch, llama_output):
    out, _ = llama_output
    missing = str(tmp_path / "does-not-exist")  # never read: validation comes first
    with pytest.raises(ValueError, match="`artefact`='gguf' is invalid"):
        push_pruned_to_hub(missing, "alice/x", artefact="gguf")
    for bad in ("alice/bad repo", "a/b/c", "", "alice/..x", 5):
        with pytest.raises(ValueError, match="`repo_id`=.* is invalid"):
            push_pruned_to_hub(missing, bad)
    with pytest.raises(ValueError, match="`max_retries`=-1 is invalid"):
        push_pruned_to_hub(missing, "alice/x", max_retries=-1)
    with pytest.raises(ValueError, match="`token` is invalid"):
        push_pruned_to_hub(missing, "alice/x", token="  ")
    with pytest.raises(ValueError, match="rejected the token"):
        push_pruned_to_hub(missing, "alice/x", token="hf_wrong")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ValueError, match="needs a write token"):
        push_pruned_to_hub(missing, "alice/x")
    assert not HfApi(token=HUB_TOKEN).repo_exists("alice/x")


def test_not_2to4_is_refused_before_creating_the_repo():
    repo = _name("tiny-dense")
    with pytest.raises(ValueError, match="claims 2:4 sparsity"):
        push_pruned_to_hub(tiny_model("llama"), repo)
    assert not HfApi().repo_exists(repo)


class _KillingProxy:
    """A TCP relay in front of a minihub process that kills the server mid-way: once ``limit`` request bytes have
    passed (inside the LFS upload of a large file), or when the request bytes contain ``marker``."""

    def __init__(
        self, upstream_port: int, server: subprocess.Popen, *, limit: int | None = None, marker: bytes | None = None
    ):
        self.upstream_port, self.server, self.limit, self.marker = upstream_port, server, limit, marker
        self.sent, self.tripped, self.lock = 0, threading.Event(), threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.tripped.is_set():
                    client.close()
                    upstream.close()
                    continue
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, count):
        try:
            while data := src.recv(65536):
                if count:
                    with self.lock:
                        self.sent += len(data)
                        hit = (self.limit is not None and self.sent > self.limit) or (
                            self.marker is not None and self.marker in data
                        )
                        if hit and not self.tripped.is_set():
                            self._trip()
                    if self.tripped.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass

    def _trip(self):  # called with the lock held
        self.tripped.set()
        self.server.kill()  # the server dies in the middle of the upload
        self.server.wait()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _start_minihub(data_dir) -> tuple[subprocess.Popen, int]:
    proc, url = start_minihub(data_dir)
    return proc, int(url.rsplit(":", 1)[1])


def _snapshot(path):
    return {
        name: (os.path.getsize(os.path.join(path, name)), os.path.getmtime(os.path.join(path, name)))
        for name in sorted(os.listdir(path))
    }


@pytest.mark.parametrize("kill_at", ["lfs-upload", "commit"])
def test_interrupted_upload_leaves_no_partial_commit(tmp_path, kill_at):
    data_dir = tmp_path / "hub-data"
    server, port = _start_minihub(data_dir)
    try:
        small, _ = _output(tmp_path / "small", "llama")
        endpoint = f"http://127.0.0.1:{port}"
        repo = "alice/interrupted"
        push_pruned_to_hub(small.path, repo, artefact="mask", endpoint=endpoint)
        before = HfApi(endpoint=endpoint, token=HUB_TOKEN)
        commits_before = [c.commit_id for c in before.list_repo_commits(repo)]
        files_before = sorted(before.list_repo_files(repo))

        if kill_at == "lfs-upload":  # huggingface_hub retries an LFS part itself (~23 s of backoff): no retry of ours
            big, _ = _output(tmp_path / "big", "llama", hidden=256, layers=4)  # ~10 MB of fp32 weights
            proxy, retries = _KillingProxy(port, server, limit=2_000_000), 0
        else:  # the server dies while receiving the commit request; our retry then finds it gone
            big, _ = _output(tmp_path / "big", "gpt2")
            proxy, retries = _KillingProxy(port, server, marker=f"/api/models/{repo}/commit/".encode()), 1
        local_before = _snapshot(big.path)
        with pytest.raises(PushError, match="left unchanged; no local file was modified") as info:
            push_pruned_to_hub(
                big.path,
                repo,
                artefact="dense",
                endpoint=f"http://127.0.0.1:{proxy.port}",
                max_retries=retries,
                retry_backoff=0.01,
            )
        assert proxy.tripped.is_set() and is_transient_error(info.value.__cause__)
        assert _snapshot(big.path) == local_before
    finally:
        server.kill()
        server.wait()
    server, port = _start_minihub(data_dir)  # same data: what did the Hub keep?
    try:
        after = HfApi(endpoint=f"http://127.0.0.1:{port}", token=HUB_TOKEN)
        assert [c.commit_id for c in after.list_repo_commits(repo)] == commits_before
        assert sorted(after.list_repo_files(repo)) == files_before
    finally:
        server.kill()
        server.wait()


def test_transient_error_classification():
    from huggingface_hub.errors import HfHubHTTPError

    class _Response:
        def __init__(self, status):
            self.status_code = status
            self.headers, self.request, self.text = {}, None, ""

    assert is_transient_error(ConnectionResetError("reset"))
    assert is_transient_error(TimeoutError("slow"))
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = ConnectionRefusedError("refused")
    assert is_transient_error(wrapped)
    assert not is_transient_error(ValueError("bad"))
    for status, expected in ((503, True), (429, True), (404, False), (401, False)):
        exc = HfHubHTTPError("http", response=_Response(status))
        assert is_transient_error(exc) is expected


def test_cli_push_prints_the_commit_url(llama_output, capsys):
    from proxsparse_hf.cli import main

    out, model = llama_output
    repo = _name("tiny-cli")
    assert main(["push", out.path, repo, "--artefact", "compact", "--commit-message", "from the CLI"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("http") and repo in printed and "/commit/" in printed
    assert HfApi().list_repo_commits(repo)[0].title == "from the CLI"
    assert_state_equal(model, load_pruned(repo))
    with pytest.raises(SystemExit) as info:
        main(["push", out.path, "bad repo id"])
    assert info.value.code == 2
    assert "is invalid" in capsys.readouterr().err
