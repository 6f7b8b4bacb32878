"""A local, in-memory fake of the Hugging Face Hub HTTP API, for tests (stdlib only; never the network).

    with FakeHub(token="hf_test") as hub:          # serves on http://127.0.0.1:<free port>
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
        ... hf-ssl push / AutoModel.from_pretrained("user/name") / pipeline(...) in a subprocess with env ...
        hub.files("user/name")                      # {path: bytes} at the head of main

Enough of the API that `huggingface_hub` 2.x uses for publishing and loading a model (routes as in
`huggingface_hub/hf_api.py`, `_commit_api.py`, `file_download.py`):

* `GET  /api/whoami-v2`, `GET /api/agent-harnesses` (an empty registry)
* `POST /api/repos/create`                                  (409 when the repo exists)
* `POST /api/validate-yaml`                                 (parses the README front matter)
* `POST /api/models/{repo}/branch/{branch}`                 (create_branch)
* `GET  /api/models/{repo}/refs`
* `POST /api/models/{repo}/preupload/{rev}`                 (every file: uploadMode "regular", with its oid)
* `POST /api/models/{repo}/commit/{rev}`                    (NDJSON: header, file (base64), deletedFile,
                                                             deletedFolder; parentCommit checked; atomic)
* `GET  /api/models/{repo}[/revision/{rev}]`                (model_info / repo_info, siblings)
* `GET  /api/models/{repo}/tree/{rev}[/{path}]`             (list_repo_tree, ?recursive=)
* `POST /api/models/{repo}/paths-info/{rev}`                (get_paths_info)
* `HEAD|GET /{repo}/resolve/{rev}/{path}`                   (X-Repo-Commit, ETag = git blob id, Content-Length;
                                                             404 + X-Error-Code RepoNotFound / RevisionNotFound /
                                                             EntryNotFound like the Hub)

Writes need `Authorization: Bearer <token>` (401 otherwise); private repos need it for reads too. There is
no LFS/Xet: preupload answers "regular" for every file, so content travels base64 inside the commit.
`fail_next_commit` makes the next commit answer 500 (and change nothing); `requests` logs
(method, path) of every request and `unhandled` those no route matched. The token is compared in memory
only and never stored.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

USER = "user"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{_REPO}/refs", "refs"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    def __init__(self, token: str = "hf_fake_token"):
        self._token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.authorized_writes = 0
        self.fail_next_commit = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-hub").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test helpers
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self._resolve_rev(repo, revision)].files)

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of `branch`, newest first."""
        repo = self.repos[repo_id]
        oid, out = repo.branches.get(branch), []
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    def commit_directly(self, repo_id: str, files: dict[str, bytes], message: str = "edit on the Hub",
                        branch: str = "main") -> str:
        """A commit made outside the client under test (e.g. a card edited in the Hub's web editor)."""
        repo = self.repos[repo_id]
        with self._lock:
            return self._new_commit(repo, branch, {**self.files(repo_id, branch), **files}, message)

    # ------------------------------------------------------------------ internals
    def _new_commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_id}\0{parent}\0{message}\0{time.time_ns()}\0{sorted(files)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, message, files, parent)
        repo.branches[branch] = oid
        return oid

    @staticmethod
    def _resolve_rev(repo: Repo, rev: str) -> str:
        rev = urllib.parse.unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404 if authorized else 401, "Repository not found", "RepoNotFound")
        return repo


def _file_entry(path: str, data: bytes, commit: Commit) -> dict:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data),
            "lastCommit": {"id": commit.oid, "title": commit.message, "date": "2024-01-01T00:00:00.000Z"}}


def _tree(files: dict[str, bytes], commit: Commit, prefix: str, recursive: bool) -> list[dict]:
    prefix = prefix.strip("/")
    entries, folders = [], set()
    for path, data in sorted(files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if not recursive and depth > 1:
                break
            folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(_file_entry(path, data, commit))
    folder_entries = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                      for f in sorted(folders)]
    return folder_entries + entries


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.fake._token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        self.fake.authorized_writes += 1

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        content_type = "application/octet-stream" if raw is not None else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(parsed.query)
        self.fake.requests.append((method, parsed.path))
        body = self._body() if method == "POST" else b""
        try:
            for route_method, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, parsed.path)
                if route_method == method and match:
                    with self.fake._lock:
                        getattr(self, f"_{name}")(body=body, head=method == "HEAD",
                                                  **{k: v for k, v in match.groupdict().items()})
                    return
            self.fake.unhandled.append((method, parsed.path))
            raise HubError(404, f"no such route in the fake hub: {method} {parsed.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers=headers, head=method == "HEAD")

    # -- routes
    def _agent_harnesses(self, body, head):  # huggingface_hub's user-agent registry: an empty one
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, body, head):
        self._require_auth()
        self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})

    def _create_repo(self, body, head):
        self._require_auth()
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "the fake hub hosts model repos only")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"invalid repo name {repo_id!r}")
        url = f"{self.fake.url}/{repo_id}"
        if repo_id in self.fake.repos:
            self._send(409, {"error": "You already created this model repo", "url": url})
            return
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.fake.repos[repo_id] = repo
        # like the Hub: a new repo has one commit with a .gitattributes
        self.fake._new_commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                              "initial commit")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body, head):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.S)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append("metadata must be a mapping")
            except yaml.YAMLError as err:
                errors.append(f"invalid YAML: {err}")
        if errors:
            self._send(400, {"errors": [{"message": m} for m in errors], "warnings": []})
        else:
            self._send(200, {"errors": [], "warnings": []})

    def _create_branch(self, repo, branch, body, head):
        self._require_auth()
        repo = self.fake._repo(repo, True)
        branch = urllib.parse.unquote(branch)
        if branch in repo.branches:
            self._send(409, {"error": f"Reference already exists: refs/heads/{branch}"})
            return
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self.fake._resolve_rev(repo, start)
        self._send(200, {})

    def _refs(self, repo, body, head):
        repo = self.fake._repo(repo, self._authorized())
        self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                      for b, oid in repo.branches.items()], "tags": [], "converts": []})

    def _preupload(self, repo, rev, body, head):
        self._require_auth()
        repo = self.fake._repo(repo, True)
        files = repo.commits[self.fake._resolve_rev(repo, rev)].files
        entries = json.loads(body)["files"]
        self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None}
                                   for f in entries]})

    def _commit(self, repo, rev, body, head):
        self._require_auth()
        repo = self.fake._repo(repo, True)
        branch = urllib.parse.unquote(rev)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if self.fake.fail_next_commit:
            self.fake.fail_next_commit = False
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        parent = header.get("parentCommit")
        if parent and not repo.branches[branch].startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.branches[branch]].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"the fake hub does not support {key!r} operations")
        message = header["summary"] + ("\n\n" + header["description"] if header.get("description") else "")
        oid = self.fake._new_commit(repo, branch, files, message)
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.fake.url}/{repo.repo_id}/commit/{oid}",
                         "pullRequestUrl": None})

    def _model_info(self, repo, rev=None, body=b"", head=False):
        repo = self.fake._repo(repo, self._authorized())
        oid = self.fake._resolve_rev(repo, rev or "main")
        files = repo.commits[oid].files
        card = {}
        if "README.md" in files:
            match = re.match(r"^---\s*\n(.*?)\n---\s*\n", files["README.md"].decode(), flags=re.S)
            card = (yaml.safe_load(match.group(1)) or {}) if match else {}
        self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                         "sha": oid, "private": repo.private, "gated": False, "disabled": False,
                         "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
                         "downloads": 0, "likes": 0, "tags": card.get("tags", []),
                         "pipeline_tag": card.get("pipeline_tag"), "library_name": card.get("library_name"),
                         "cardData": card, "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, repo, rev, path=None, body=b"", head=False):
        repo = self.fake._repo(repo, self._authorized())
        commit = repo.commits[self.fake._resolve_rev(repo, rev)]
        path = urllib.parse.unquote(path or "")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if path and not any(p.startswith(path.strip("/") + "/") for p in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send(200, _tree(commit.files, commit, path, recursive))

    def _paths_info(self, repo, rev, body, head):
        repo = self.fake._repo(repo, self._authorized())
        commit = repo.commits[self.fake._resolve_rev(repo, rev)]
        form = urllib.parse.parse_qs(body.decode())
        paths = form.get("paths", [])
        if not paths and body.startswith(b"{"):
            paths = json.loads(body).get("paths", [])
        out = []
        for path in paths:
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path], commit))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
        self._send(200, out)

    def _resolve(self, repo, rev, path, body, head):
        repo = self.fake._repo(repo, self._authorized())
        oid = self.fake._resolve_rev(repo, rev)
        path = urllib.parse.unquote(path)
        files = repo.commits[oid].files
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = files[path]
        self._send(200, raw=data, head=head, headers={"X-Repo-Commit": oid, "ETag": f'"{git_blob_id(data)}"',
                                                      "Accept-Ranges": "bytes"})
