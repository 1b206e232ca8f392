"""A small stand-in for the Hugging Face Hub's file routes, on 127.0.0.1 only, for offline tests.

It serves what huggingface_hub (2.x) asks for when it downloads dataset files and lists folders:

    HEAD/GET /datasets/<owner>/<name>/resolve/<revision>/<path>      file metadata / bytes
        headers: X-Repo-Commit (40 hex), ETag ("<sha256>"), Content-Length, Accept-Ranges;
        GET honours `Range: bytes=N-` with 206 + Content-Range (the hub resumes a dropped download that way)
    GET /api/datasets/<owner>/<name>/tree/<revision>[/<folder, %2F-quoted>]   one page of a folder listing:
        [{"type": "file", "path", "size", "oid", "lfs"}, {"type": "directory", "path", "oid"}, ...]

Anything else gets a 404. Faults a test can switch on:
    deny_status = 401 / 403     every request is refused with that status
    truncate_next[path] = n     the next n downloads of `path` see a consistently truncated copy (HEAD and GET
                                agree on the short size: what a damaged upstream file looks like)
    cut_next[path] = n          the next n GETs of `path` announce the full length, send half and hang up
Every request is logged in `requests` as (method, url path). The server answers at most `max_requests`
requests (then 410 Gone, which huggingface_hub does not retry), so a client stuck in a loop cannot spin forever.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = hashlib.sha1(b"tritonrun test hub").hexdigest()  # the one commit every revision resolves to


class HubServer:
    """`with HubServer() as hub:` serves `hub.files` at `hub.url` until the block ends."""

    def __init__(self, max_requests: int = 2000) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, path in repo) -> content (dataset repos)
        self.requests: list[tuple[str, str]] = []
        self.deny_status: int | None = None
        self.truncate_next: dict[str, int] = {}
        self.cut_next: dict[str, int] = {}
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def add(self, repo_id: str, path: str, content: bytes) -> None:
        self.files[(repo_id, path)] = content

    def gets(self, name: str) -> int:
        """How many GETs asked for a file whose path ends with `name`."""
        with self.lock:
            return sum(1 for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + name))

    def _version(self, path: str, content: bytes) -> bytes:
        """The bytes the next download of `path` sees (a truncated copy while truncate_next is set)."""
        return content[: len(content) // 2] if self.truncate_next.get(path, 0) > 0 else content


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: simple and enough here

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _route(self, method: str) -> None:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((method, path))
                n_requests = len(hub.requests)
            if n_requests > hub.max_requests:
                return self._reply(410, b"request budget of the test server exhausted", method)
            if hub.deny_status is not None:
                return self._reply(hub.deny_status, b"access denied (test)", method,
                                   {"X-Error-Message": "Access denied (test server)"})
            parts = path.split("/")
            # /datasets/<owner>/<name>/resolve/<revision>/<path...>
            if len(parts) >= 7 and parts[1] == "datasets" and parts[4] == "resolve":
                return self._resolve(method, f"{parts[2]}/{parts[3]}", unquote("/".join(parts[6:])))
            # /api/datasets/<owner>/<name>/tree/<revision>[/<folder>]
            if method == "GET" and len(parts) >= 7 and parts[1:3] == ["api", "datasets"] and parts[5] == "tree":
                return self._tree(f"{parts[3]}/{parts[4]}", unquote("/".join(parts[7:])))
            self._reply(404, b"not found", method, {"X-Error-Code": "EntryNotFound"})

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def _reply(self, status: int, body: bytes, method: str, headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method == "GET":
                self.wfile.write(body)

        def _resolve(self, method: str, repo_id: str, path: str) -> None:
            content = hub.files.get((repo_id, path))
            if content is None:
                return self._reply(404, b"entry not found", method,
                                   {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            with hub.lock:
                content = hub._version(path, content)
                cut = method == "GET" and hub.cut_next.get(path, 0) > 0
                if method == "GET":
                    if hub.truncate_next.get(path, 0) > 0:
                        hub.truncate_next[path] -= 1
                    if cut:
                        hub.cut_next[path] -= 1
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            start = 0
            rng = self.headers.get("Range", "")
            if method == "GET" and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes="):-1])
            if start:
                self.send_response(206)
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            else:
                self.send_response(200)
            body = content[start:]
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method == "GET":
                if cut:  # announce everything, deliver half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        def _tree(self, repo_id: str, folder: str) -> None:
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            entries, dirs = [], set()
            for (repo, path), content in sorted(hub.files.items()):
                if repo != repo_id or not path.startswith(prefix):
                    continue
                rest = path[len(prefix):]
                if "/" in rest:
                    dirs.add(prefix + rest.split("/")[0])
                    continue
                sha256 = hashlib.sha256(content).hexdigest()
                entries.append({"type": "file", "path": path, "size": len(content),
                                "oid": hashlib.sha1(content).hexdigest(),
                                "lfs": {"oid": sha256, "size": len(content), "pointerSize": 134}})
            entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
                        for d in sorted(dirs)]
            if not entries:
                return self._reply(404, b"folder not found", "GET", {"X-Error-Code": "EntryNotFound"})
            self._reply(200, json.dumps(entries).encode(), "GET", {"Content-Type": "application/json"})

    return Handler
