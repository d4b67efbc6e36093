"""A tiny in-memory Hugging Face Hub on 127.0.0.1 for upload / download round trips in tests.

Implements what huggingface_hub 2.4's upload (``create_repo``, ``create_branch``, ``preupload``, NDJSON ``commit``,
README ``validate-yaml``) and download (``HEAD``/``GET`` ``resolve``, ``model_info``, ``tree``, ``paths-info``) paths
use. The preupload answer asks for every file as ``"regular"``, so the client sends contents inline (base64) in the
commit payload and neither LFS nor Xet transfers are involved. Every request is recorded in ``server.requests``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        initial = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        self.commits: dict[str, dict[str, bytes]] = {initial: {}}
        self.refs: dict[str, str] = {"main": initial}
        self.messages: dict[str, str] = {initial: "initial commit"}
        self.pr_count = 0

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None, head: bool = False):
        if body is None:
            body = json.dumps(payload if payload is not None else {}).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool = False):
        self._send(status, {"error": message}, headers={"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        return "/".join(parts[:2]), parts[2:]

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with self.server.lock:
            self.server.requests.append((method, self.path))
        try:
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if parts[:2] == ["api", "validate-yaml"]:
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = self._split_repo(parts[2:])
                return self._api(method, repo_id, rest, query)
            if len(parts) >= 4 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = "/".join(parts[:2])
                return self._resolve(method, repo_id, parts[3], "/".join(parts[4:]))
        except Exception as error:  # report server bugs to the client instead of hanging
            return self._error(500, "ServerError", repr(error))
        self._error(404, "NotImplemented", f"fake hub does not implement {method} {self.path}", head=method == "HEAD")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self):
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.endpoint}/{repo_id}"
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.server.repos[repo_id] = Repo(repo_id, payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, method: str, repo_id: str, rest: list[str], query):
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._body()
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=method == "HEAD")
        action = rest[0] if rest else ""
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if action == "preupload" and method == "POST":
            files = json.loads(self._body())["files"]
            sha = repo.resolve(revision)
            current = repo.commits.get(sha, {})
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(current[f["path"]]) if f["path"] in current else None,
                }
                for f in files
            ]
            return self._send(200, {"files": answer, "commitOid": sha})
        if action == "commit" and method == "POST":
            return self._commit(repo, revision, self._body(), "create_pr" in query)
        if action == "branch" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            if revision in repo.refs:
                return self._error(409, "BranchExists", f"branch {revision} exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.refs[revision] = start
            return self._send(200, {})
        if action in ("", "revision") and method == "GET":
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = repo.commits[sha]
            return self._send(200, {
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
                "tags": [], "downloads": 0, "likes": 0,
            })
        if action == "tree" and method == "GET":
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send(200, self._tree(repo.commits[sha], prefix, recursive))
        if action == "paths-info" and method == "POST":
            sha = repo.resolve(revision)
            body = self._body().decode()
            try:
                paths = json.loads(body).get("paths", [])
            except json.JSONDecodeError:
                paths = parse_qs(body).get("paths", [])
            files = repo.commits.get(sha, {})
            return self._send(200, [
                {"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha(files[p])} for p in paths if p in files
            ])
        self._body()
        return self._error(404, "NotImplemented", f"fake hub does not implement {method} {self.path}", head=method == "HEAD")

    @staticmethod
    def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
        entries, folders = [], set()
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        for path, content in sorted(files.items()):
            if not path.startswith(base):
                continue
            tail = path[len(base):]
            if "/" in tail and not recursive:
                folders.add(base + tail.split("/")[0])
                continue
            for i in range(1, tail.count("/") + 1):
                folders.add(base + "/".join(tail.split("/")[:i]))
            entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_sha(content)})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return entries

    def _commit(self, repo: Repo, revision: str, body: bytes, create_pr: bool):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = repo.resolve(revision)
        if parent is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[parent])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "BadRequest", "only base64 file contents are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                return self._error(400, "BadRequest", f"fake hub does not support {key!r} operations")
        sha = hashlib.sha1(json.dumps([parent, header, sorted(files)]).encode() + b"".join(files.values())).hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = header.get("summary", "")
        pr_url = None
        if create_pr:
            repo.pr_count += 1
            repo.refs[f"refs/pr/{repo.pr_count}"] = sha
            pr_url = f"{self.server.endpoint}/{repo.repo_id}/discussions/{repo.pr_count}"
        else:
            repo.refs[revision] = sha
        self._send(200, {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{sha}",
            "pullRequestUrl": pr_url,
        })

    def _resolve(self, method: str, repo_id: str, revision: str, path: str):
        head = method == "HEAD"
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        sha = repo.resolve(unquote(revision))
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", head=head)
        headers = {
            "ETag": f'"{git_blob_sha(content)}"',
            "X-Repo-Commit": sha,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        self._send(200, headers=headers, body=content, head=head)


__all__ = ["FakeHub", "git_blob_sha"]
