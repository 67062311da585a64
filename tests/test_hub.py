"""``hf://`` weights against a real local HTTP server speaking the hub's ``resolve`` protocol.

The server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1, port 0) answers ``HEAD``/``GET
/{org}/{repo}/resolve/{revision}/{file}`` with the headers ``huggingface_hub.hf_hub_download`` needs:
``X-Repo-Commit`` (one fixed 40-hex sha per revision), ``ETag`` (quoted sha256 of the content) and
``Content-Length``; unknown repos / revisions / files get a 404 with ``X-Error-Code``
``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (and ``X-Error-Message``), which is what
huggingface_hub turns into its typed errors. Every test uses its own ``cache_dir`` under
``tmp_path`` and ``token=False`` (no stored credentials are read or sent).
"""
from __future__ import annotations

import hashlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

import learned_optim
from learned_optim.weights import WeightsError

REPO = "org/repo"


def commit_for(repo_id: str, revision: str) -> str:
    """A fixed, distinct 40-hex commit sha per (repo, revision): the cache keys snapshots by it."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class FakeHub:
    """Files served by the local server: ``{(repo_id, revision, filename): bytes}``."""

    def __init__(self):
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo_id: str, revision: str, filename: str, data: bytes) -> str:
        self.files[(repo_id, revision, filename)] = data
        return commit_for(repo_id, revision)

    # -------------------------------------------------------------- protocol
    def lookup(self, path: str):
        """-> (status, headers, body) for a request path."""
        parts = [urllib.parse.unquote(p) for p in path.split("?", 1)[0].split("/")]
        # ['', org, repo, 'resolve', revision, *file]
        if len(parts) < 6 or parts[3] != "resolve":
            return 404, {"X-Error-Message": "Not a resolve url"}, b""
        repo_id, revision, filename = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
        revisions = {rev for (repo, rev, _) in self.files if repo == repo_id}
        if not revisions:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        by_commit = {commit_for(repo_id, rev): rev for rev in revisions}
        revision = by_commit.get(revision, revision)  # a commit sha selects its revision
        if revision not in revisions:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        commit = commit_for(repo_id, revision)
        data = self.files.get((repo_id, revision, filename))
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                         "X-Repo-Commit": commit}, b""
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                     "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}, data

    # -------------------------------------------------------------- server
    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                status, headers, body = hub.lookup(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if status != 200:
                    self.send_header("Content-Length", "0")
                self.end_headers()
                if with_body and status == 200:
                    self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802
                self._answer(with_body=False)

            def do_GET(self):  # noqa: N802
                self._answer(with_body=True)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.requests if m == method)


# ------------------------------------------------------------------------------------ fixtures & helpers
def weight_bytes(tmp_path, rule: str, seed: int, name: str | None = None) -> bytes:
    torch.manual_seed(seed)
    path = tmp_path / (name or f"{rule}-{seed}.safetensors")
    learned_optim.save_weights(learned_optim.build_rule(rule), path, recipe={"seed": seed})
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path):
    server = FakeHub()
    server.add(REPO, "main", "weights.safetensors", weight_bytes(tmp_path, "dm", seed=1))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Start every test online whatever the environment says (HF_HUB_OFFLINE is read at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def step_once(opt, net) -> None:
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(8, 4, generator=torch.Generator().manual_seed(2))).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), before))


def rule_weights(opt) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in opt.rule.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ download + cache
def test_first_download_through_optimizer_and_step(hub, cache, tmp_path):
    net = model()
    opt = learned_optim.L2ODM(net.parameters(), weights="hf://org/repo", endpoint=hub.url, cache_dir=cache,
                              token=False)
    step_once(opt, net)
    assert hub.count("GET") == 1 and hub.count("HEAD") >= 1
    # the file landed in the standard cache layout, under the revision's commit
    commit = commit_for(REPO, "main")
    snap = cache / "models--org--repo" / "snapshots" / commit / "weights.safetensors"
    assert snap.is_file()
    assert (cache / "models--org--repo" / "refs" / "main").read_text() == commit
    expected = learned_optim.load_rule(tmp_path / "dm-1.safetensors").state_dict()
    assert same_weights(rule_weights(opt), expected)
    assert learned_optim.resolve_weights("hf://org/repo", endpoint=hub.url, cache_dir=cache, token=False) == snap


def test_second_load_reuses_cache_without_get(hub, cache):
    kwargs = dict(endpoint=hub.url, cache_dir=cache, token=False)
    first = learned_optim.resolve_weights("hf://org/repo", **kwargs)
    second = learned_optim.resolve_weights("hf://org/repo", **kwargs)
    assert first == second
    assert hub.count("GET") == 1  # the second call only asked HEAD whether main moved


def test_cached_copy_with_local_files_only_and_server_gone(hub, cache):
    kwargs = dict(endpoint=hub.url, cache_dir=cache, token=False)
    online_rule = rule_weights(learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", **kwargs))
    hub.stop()
    seen = len(hub.requests)
    # 1. explicitly offline
    opt = learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", local_files_only=True, **kwargs)
    assert same_weights(rule_weights(opt), online_rule)
    # 2. the server is simply gone (connection refused): huggingface_hub falls back to refs/main -> snapshot,
    #    no need to pin the revision
    net = model()
    opt = learned_optim.L2ODM(net.parameters(), weights="hf://org/repo", **kwargs)
    assert same_weights(rule_weights(opt), online_rule)
    step_once(opt, net)
    assert len(hub.requests) == seen


def test_pinned_commit_is_served_from_cache_without_any_request(hub, cache):
    commit = commit_for(REPO, "main")
    kwargs = dict(endpoint=hub.url, cache_dir=cache, token=False)
    path = learned_optim.resolve_weights(f"hf://org/repo@{commit}", **kwargs)
    seen = len(hub.requests)
    assert learned_optim.resolve_weights(f"hf://org/repo@{commit}", **kwargs) == path
    assert len(hub.requests) == seen  # a cached commit sha short-circuits the HEAD call
    hub.stop()
    assert learned_optim.resolve_weights(f"hf://org/repo@{commit}", **kwargs) == path


def test_revision_in_spec_and_kwarg_are_honoured(hub, cache, tmp_path):
    hub.add(REPO, "v1", "weights.safetensors", weight_bytes(tmp_path, "dm", seed=2))
    kwargs = dict(endpoint=hub.url, cache_dir=cache, token=False)
    main = rule_weights(learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", **kwargs))
    v1 = rule_weights(learned_optim.L2ODM(model().parameters(), weights="hf://org/repo@v1", **kwargs))
    v1_kwarg = rule_weights(learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", revision="v1",
                                                **kwargs))
    assert not same_weights(main, v1)
    assert same_weights(v1, v1_kwarg)
    assert same_weights(v1, learned_optim.load_rule(tmp_path / "dm-2.safetensors").state_dict())
    assert same_weights(main, learned_optim.load_rule(tmp_path / "dm-1.safetensors").state_dict())
    # the spec's @revision wins over the keyword
    spec_wins = learned_optim.resolve_weights("hf://org/repo@v1", revision="main", **kwargs)
    assert commit_for(REPO, "v1") in str(spec_wins)
    # both revisions are cached side by side and both resolve offline
    hub.stop()
    for spec, expected in (("hf://org/repo", main), ("hf://org/repo@v1", v1)):
        opt = learned_optim.L2ODM(model().parameters(), weights=spec, local_files_only=True, **kwargs)
        assert same_weights(rule_weights(opt), expected)


def test_file_in_subfolder(hub, cache, tmp_path):
    hub.add(REPO, "main", "sub/dir/rnnprop.safetensors", weight_bytes(tmp_path, "rnnprop", seed=3))
    net = model()
    opt = learned_optim.RNNprop(net.parameters(), weights="hf://org/repo/sub/dir/rnnprop.safetensors",
                                endpoint=hub.url, cache_dir=cache, token=False)
    step_once(opt, net)
    assert ("GET", "/org/repo/resolve/main/sub/dir/rnnprop.safetensors") in hub.requests


# ------------------------------------------------------------------------------------ errors
def test_missing_repo(hub, cache):
    with pytest.raises(WeightsError, match="repository 'org/nope' does not exist") as info:
        learned_optim.L2ODM(model().parameters(), weights="hf://org/nope", endpoint=hub.url, cache_dir=cache,
                            token=False)
    assert "token" in str(info.value)  # hints that private repos need a token


def test_missing_file(hub, cache):
    with pytest.raises(WeightsError, match="has no file 'other.safetensors'") as info:
        learned_optim.L2ODM(model().parameters(), weights="hf://org/repo/other.safetensors", endpoint=hub.url,
                            cache_dir=cache, token=False)
    assert "org/repo" in str(info.value)


def test_missing_revision(hub, cache):
    with pytest.raises(WeightsError, match="Revision 'v9' does not exist in hub repository 'org/repo'"):
        learned_optim.resolve_weights("hf://org/repo@v9", endpoint=hub.url, cache_dir=cache, token=False)


def test_wrong_rule_from_hub(hub, cache):
    with pytest.raises(WeightsError, match="'dm'.*'rnnprop'"):
        learned_optim.RNNprop(model().parameters(), weights="hf://org/repo", endpoint=hub.url, cache_dir=cache,
                              token=False)


def test_hub_file_that_is_not_a_weight_file(hub, cache):
    hub.add(REPO, "main", "README.md", b"# just a card\n")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        learned_optim.L2ODM(model().parameters(), weights="hf://org/repo/README.md", endpoint=hub.url,
                            cache_dir=cache, token=False)


def test_local_files_only_with_empty_cache(hub, cache):
    with pytest.raises(WeightsError) as info:
        learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", local_files_only=True, endpoint=hub.url,
                            cache_dir=cache, token=False)
    message = str(info.value)
    assert "no copy is in the cache" in message and "Connect once" in message and "local path" in message
    assert "has no file" not in message  # not mistaken for a missing remote file
    assert hub.requests == []


# ------------------------------------------------------------------------------------ HF_HUB_OFFLINE
def test_hf_hub_offline_uses_cached_copy(hub, cache, monkeypatch):
    kwargs = dict(endpoint=hub.url, cache_dir=cache, token=False)
    online_rule = rule_weights(learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", **kwargs))
    seen = len(hub.requests)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    net = model()
    opt = learned_optim.L2ODM(net.parameters(), weights="hf://org/repo", **kwargs)
    assert same_weights(rule_weights(opt), online_rule)
    step_once(opt, net)
    assert len(hub.requests) == seen  # offline mode sent nothing to the server


def test_hf_hub_offline_without_cached_copy(hub, cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as info:
        learned_optim.L2ODM(model().parameters(), weights="hf://org/repo", endpoint=hub.url, cache_dir=cache,
                            token=False)
    message = str(info.value)
    assert "offline mode" in message and "HF_HUB_OFFLINE" in message and "no copy is in the cache" in message
    assert "has no file" not in message
    assert hub.requests == []


# ------------------------------------------------------------------------------------ publish (mocked HfApi)
def test_publish_uploads_weights_and_card_then_loads_back(tmp_path, hub, cache):
    weight_bytes(tmp_path, "scale", seed=4, name="w.safetensors")
    path = tmp_path / "w.safetensors"
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        ref = learned_optim.publish(path, "org/published", token="tok", endpoint=hub.url)
    assert ref == "hf://org/published/weights.safetensors"
    api_cls.assert_called_once_with(endpoint=hub.url, token="tok")
    api = api_cls.return_value
    api.create_repo.assert_called_once_with("org/published", exist_ok=True)
    calls = [c.kwargs for c in api.upload_file.call_args_list]
    assert [c["path_in_repo"] for c in calls] == ["weights.safetensors", "README.md"]
    assert all(c["repo_id"] == "org/published" and c["revision"] is None for c in calls)
    assert calls[0]["path_or_fileobj"] == str(path)
    card = calls[1]["path_or_fileobj"]
    assert isinstance(card, bytes) and card.startswith(b"---\n")
    assert b"library_name: learned-optim" in card and b"- learned-optimizer" in card and b"- scale" in card
    # what was uploaded loads back through the returned reference
    hub.add("org/published", "main", "weights.safetensors", path.read_bytes())
    hub.add("org/published", "main", "README.md", card)
    net = model()
    opt = learned_optim.L2OScale(net.parameters(), weights=ref, endpoint=hub.url, cache_dir=cache, token=False)
    step_once(opt, net)
    assert same_weights(rule_weights(opt), learned_optim.load_rule(path).state_dict())


def test_publish_options(tmp_path):
    weight_bytes(tmp_path, "dm", seed=0, name="w.safetensors")
    path = tmp_path / "w.safetensors"
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        ref = learned_optim.publish(path, "org/x", filename="dm/w.safetensors", card="---\nlicense: mit\n---\nhi",
                                    revision="v2", create_repo=False)
    assert ref == "hf://org/x/dm/w.safetensors@v2"
    api = api_cls.return_value
    api.create_repo.assert_not_called()
    calls = [c.kwargs for c in api.upload_file.call_args_list]
    assert [c["path_in_repo"] for c in calls] == ["dm/w.safetensors", "README.md"]
    assert all(c["revision"] == "v2" for c in calls)
    assert calls[1]["path_or_fileobj"] == b"---\nlicense: mit\n---\nhi"


def test_publish_refuses_non_weight_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 64)
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        with pytest.raises(WeightsError):
            learned_optim.publish(path, "org/x")
    api_cls.assert_not_called()


# ------------------------------------------------------------------------------------ no network at all
OFFLINE_ENDPOINT = "http://learned-optim-no-network.invalid"  # .invalid never resolves (RFC 2606)


def test_unreachable_hub_without_cache_fails_at_once_with_a_clear_message(cache, monkeypatch):
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(WeightsError) as info:
        learned_optim.resolve_weights("hf://org/repo", endpoint=OFFLINE_ENDPOINT, cache_dir=cache, token=False)
    message = str(info.value)
    assert "unreachable" in message and "learned-optim-no-network.invalid" in message and "no copy" in message
    # the probe failed, so the download went straight to the cache instead of retrying with back-off
    assert calls and calls[0]["local_files_only"] is True


def test_unreachable_hub_serves_the_cached_copy(hub, cache):
    online = learned_optim.resolve_weights("hf://org/repo", endpoint=hub.url, cache_dir=cache, token=False)
    hub.stop()
    offline = learned_optim.resolve_weights("hf://org/repo", endpoint=OFFLINE_ENDPOINT, cache_dir=cache, token=False)
    assert offline == online
