"""A small Hub-compatible HTTP server on 127.0.0.1 for driving the real `huggingface_hub` client in tests.

It speaks the subset of the Hub protocol that `HfApi.create_repo`, `create_branch`, `create_commit`,
`list_repo_files`, `repo_info` and `hf_hub_download` use (the same in huggingface_hub 1.33 and 2.4, read from
their sources):

    POST /api/repos/create                              {"name", "organization", "visibility" | "private"}
    POST /api/validate-yaml                             {"content", "repoType"} -> {"errors", "warnings"}
    POST /api/models/{ns}/{name}/branch/{branch}        {"startingPoint"?}; 409 when it exists
    POST /api/models/{ns}/{name}/preupload/{rev}        {"files": [{path, sample, size}]} [?create_pr=1]
         -> {"files": [{path, uploadMode: "regular", shouldIgnore: false, oid?}]}
    POST /api/models/{ns}/{name}/commit/{rev}           NDJSON: header, file (base64), deletedFile, deletedFolder
         [?create_pr=1] -> {"commitOid", "commitUrl", "pullRequestUrl"}
    GET  /api/models/{ns}/{name}[/revision/{rev}]       {"id", "sha", "private", "siblings"}
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]    [{"type", "path", "oid", "size"}] (one page)
    HEAD|GET /{ns}/{name}/resolve/{rev}/{path}          X-Repo-Commit, ETag (git blob sha1), Content-Length
    GET  /api/agent-harnesses                           404 (huggingface_hub 2.x fetches it, best effort, for its
                                                        user-agent; a 404 means "no agent registry")

Every file is answered "regular" by preupload, so content travels inline (base64) in the commit: the client never
needs the LFS or Xet protocols, whatever a file's size or type. An "oid" (git blob sha1) is returned for files
that already exist at the revision, which is how the real client drops unchanged files from a commit.

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound) so the client
raises its usual exceptions. The server records every request (method, path, query, bearer token) and every
commit, writes each branch's files under `root/<ns>/<name>/<quoted ref>/`, can be told to fail a named call
(`fail("commit", 500)`), only listens on loopback, caps request bodies and stops itself after `lifetime` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The id git (and the Hub) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit as received: the new tree's changes and how the client asked for them."""

    repo_id: str
    revision: str  # the revision named in the URL (unquoted)
    create_pr: bool
    summary: str
    description: str
    files: dict[str, bytes]  # added or replaced files, by path
    deleted: list[str]
    oid: str
    pr_num: int | None
    token: str | None


@dataclass
class Repo:
    private: bool
    owner: str
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    prs: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """`with FakeHub(tmp_path) as hub: HfApi(endpoint=hub.url, token=hub.token)...`"""

    def __init__(self, root: Path, *, tokens: dict[str, str] | None = None, lifetime: float = 300.0,
                 max_body: int = 256 * 2**20):
        self.root = Path(root)
        self.tokens = tokens if tokens is not None else {"hf_fake_write_token": "user"}
        self.token = next(iter(self.tokens))
        self.max_body = max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.commits: list[Commit] = []
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)  # never outlives a hung test
        self._timer.daemon = True

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls and views ---------------------------------------------------------------------------

    def fail(self, endpoint: str, status: int = 500, message: str = "Internal Error", times: int = 1) -> None:
        """Answer the next `times` calls to `endpoint` (create_repo, validate_yaml, branch, preupload, commit,
        model_info, tree, resolve) with `status` and `message`."""
        with self._lock:
            self._failures.setdefault(endpoint, []).extend([(status, message)] * times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repository's files at `revision` (a branch, refs/pr/N or a commit oid)."""
        repo = self.repos[repo_id]
        return dict(repo.trees[repo.refs.get(revision, revision)])

    def snapshot(self, repo_id: str, revision: str = "main") -> Path:
        """The folder where the files of branch `revision` are written after each commit."""
        return self.root / repo_id / quote(revision, safe="")

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].refs[revision]

    # -- protocol ------------------------------------------------------------------------------------------

    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\n".join((str(self._counter), *parts)).encode()).hexdigest()

    def _user(self, token: str | None, *, required: bool) -> str | None:
        if token is None:
            if required:
                raise HubError(401, "Invalid credentials in Authorization header")
            return None
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> str:
        oid = repo.refs.get(revision, revision if revision in repo.trees else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _write_snapshot(self, repo_id: str, ref: str, tree: dict[str, bytes]) -> None:
        folder = self.snapshot(repo_id, ref)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for path, content in tree.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)

    def create_repo(self, body: dict, user: str) -> dict:
        namespace = body.get("organization") or user
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if body.get("type") not in (None, "model"):
            raise HubError(400, "This fake Hub only hosts model repositories")
        repo_id = f"{namespace}/{body['name']}"
        if repo_id in self.repos:
            # the client reads "url" from this answer when exist_ok=True
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        private = body.get("visibility") == "private" or body.get("private") is True
        repo = self.repos[repo_id] = Repo(private=private, owner=user)
        oid = self._new_oid(repo_id, "initial commit")
        repo.trees[oid] = {".gitattributes": GITATTRIBUTES}
        repo.refs["main"] = oid
        self._write_snapshot(repo_id, "main", repo.trees[oid])
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, body: dict) -> dict:
        content = body.get("content", "")
        if not content.startswith("---\n"):
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content[4:].split("\n---", 1)[0])
        except yaml.YAMLError as err:
            raise HubError(400, f"Invalid YAML: {err}") from err
        if not isinstance(metadata, dict):
            raise HubError(400, "The metadata must be a mapping")
        return {"errors": [], "warnings": []}

    def create_branch(self, repo_id: str, branch: str, body: dict, user: str) -> dict:
        repo = self._repo(repo_id, user, write=True)
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.refs[branch] = self._commit_of(repo, body.get("startingPoint") or "main")
        self._write_snapshot(repo_id, branch, repo.trees[repo.refs[branch]])
        return {}

    def preupload(self, repo_id: str, revision: str, body: dict, user: str) -> dict:
        repo = self._repo(repo_id, user, write=True)
        tree = repo.trees[self._commit_of(repo, revision)]
        answers = []
        for entry in body["files"]:
            answer = {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False}
            if entry["path"] in tree:
                answer["oid"] = git_blob_sha1(tree[entry["path"]])
            answers.append(answer)
        return {"files": answers, "commitOid": repo.refs.get(revision, revision)}

    def commit(self, repo_id: str, revision: str, create_pr: bool, payload: bytes, token: str, user: str) -> dict:
        repo = self._repo(repo_id, user, write=True)
        parent = self._commit_of(repo, revision)
        lines = [json.loads(line) for line in payload.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree, added, deleted = dict(repo.trees[parent]), {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if path.startswith("/") or ".." in path.split("/") or path.startswith(".git/"):
                raise HubError(400, f"Invalid path: {path}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}")
                added[path] = tree[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
                deleted.append(path)
            elif key == "deletedFolder":
                gone = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                for p in gone:
                    del tree[p]
                deleted.extend(gone)
            else:  # lfsFile: never requested, since preupload always answers "regular"
                raise HubError(400, f"Unsupported commit operation {key!r} for {path}")
        oid = self._new_oid(repo_id, parent, header.get("summary", ""))
        repo.trees[oid] = tree
        pr_num = None
        if create_pr:
            repo.prs += 1
            pr_num = repo.prs
            ref = f"refs/pr/{pr_num}"
        else:
            ref = revision if revision in repo.refs else None
        if ref is not None:
            repo.refs[ref] = oid
            self._write_snapshot(repo_id, ref, tree)
        self.commits.append(Commit(repo_id, revision, create_pr, header.get("summary", ""),
                                   header.get("description", ""), added, deleted, oid, pr_num, token))
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pr_num}" if pr_num else None,
            "hookOutput": "",
        }

    def model_info(self, repo_id: str, revision: str, user: str | None) -> dict:
        repo = self._repo(repo_id, user)
        oid = self._commit_of(repo, revision)
        return {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(repo.trees[oid])]}

    def tree(self, repo_id: str, revision: str, prefix: str, recursive: bool, user: str | None) -> list[dict]:
        repo = self._repo(repo_id, user)
        files = repo.trees[self._commit_of(repo, revision)]
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            parts = rest.split("/")[:-1]
            folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "path": path, "oid": git_blob_sha1(files[path]), "size": len(files[path])})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                    for f in sorted(folders)]
        return entries

    def resolve(self, repo_id: str, revision: str, path: str, user: str | None) -> tuple[bytes, dict[str, str]]:
        repo = self._repo(repo_id, user)
        oid = self._commit_of(repo, revision)
        if path not in repo.trees[oid]:
            raise HubError(404, "Entry not found", "EntryNotFound")
        content = repo.trees[oid][path]
        return content, {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(content)}"'}


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._handle("GET")

        def do_HEAD(self) -> None:
            self._handle("HEAD")

        def do_POST(self) -> None:
            self._handle("POST")

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            length = int(self.headers.get("Content-Length") or 0)
            if length > hub.max_body:
                self.close_connection = True
                return self._send(413, b'{"error": "Payload too large"}', {"Content-Type": "application/json"})
            body = self.rfile.read(length) if length else b""
            segments = [unquote(s) for s in url.path.split("/")[1:]]
            endpoint = _endpoint_name(method, segments)
            with hub._lock:
                hub.requests.append({"method": method, "path": unquote(url.path), "query": query, "token": token,
                                     "endpoint": endpoint})
                try:
                    if self.client_address[0] != "127.0.0.1":
                        raise HubError(403, "loopback only")
                    failures = hub._failures.get(endpoint)
                    if failures:
                        status, message = failures.pop(0)
                        raise HubError(status, message)
                    result, headers = _dispatch(hub, method, endpoint, segments, query, body, token)
                except HubError as err:
                    headers = {"Content-Type": "application/json"}
                    if err.code:
                        headers["X-Error-Code"] = err.code
                    headers["X-Error-Message"] = err.message
                    return self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)
            if isinstance(result, bytes):
                return self._send(200, result, headers)
            return self._send(200, json.dumps(result).encode(), {"Content-Type": "application/json", **headers})

    return Handler


def _endpoint_name(method: str, segments: list[str]) -> str:
    if segments[:3] == ["api", "repos", "create"]:
        return "create_repo"
    if segments[:2] == ["api", "validate-yaml"]:
        return "validate_yaml"
    if segments[:2] == ["api", "agent-harnesses"]:
        return "agent_harnesses"
    if segments[:2] == ["api", "models"] and len(segments) >= 4:
        action = segments[4] if len(segments) > 4 else None
        return {None: "model_info", "revision": "model_info", "tree": "tree", "preupload": "preupload",
                "commit": "commit", "branch": "branch"}.get(action, "unknown")
    if len(segments) >= 5 and segments[2] == "resolve":
        return "resolve"
    return "unknown"


def _dispatch(hub: FakeHub, method: str, endpoint: str, segments: list[str], query: dict, body: bytes,
              token: str | None) -> tuple[dict | list | bytes, dict[str, str]]:
    """Route one request; `segments` are the unquoted path segments (a quoted revision stays one segment)."""
    write = method == "POST" and endpoint != "validate_yaml"
    user = hub._user(token, required=write)
    create_pr = query.get("create_pr") == "1"
    if endpoint == "create_repo":
        return hub.create_repo(json.loads(body), user), {}
    if endpoint == "validate_yaml":
        return hub.validate_yaml(json.loads(body)), {}
    if endpoint in ("model_info", "tree", "preupload", "commit", "branch"):
        repo_id = f"{segments[2]}/{segments[3]}"
        revision = segments[5] if len(segments) > 5 else "main"
        if endpoint == "model_info" and method == "GET":
            return hub.model_info(repo_id, revision, user), {}
        if endpoint == "tree" and method == "GET":
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            return hub.tree(repo_id, revision, "/".join(segments[6:]), recursive, user), {}
        if endpoint == "branch" and method == "POST":
            return hub.create_branch(repo_id, revision, json.loads(body or b"{}"), user), {}
        if endpoint == "preupload" and method == "POST":
            return hub.preupload(repo_id, revision, json.loads(body), user), {}
        if endpoint == "commit" and method == "POST":
            return hub.commit(repo_id, revision, create_pr, body, token, user), {}
    if endpoint == "resolve" and method in ("GET", "HEAD"):
        content, headers = hub.resolve(f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]), user)
        return content, headers
    raise HubError(404, f"{method} {'/'.join(segments)} is not part of this fake Hub")
