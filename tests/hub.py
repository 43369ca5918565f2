"""A small Hugging Face Hub look-alike on 127.0.0.1, enough for huggingface_hub's snapshot_download: repo info,
the file tree, and file downloads (HEAD and GET, with ranges). Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        """repos: {"org/name": folder served as that repo's main revision}."""
        self.repos = {
            name: {f.name: f for f in sorted(folder.iterdir()) if f.is_file()} for name, folder in repos.items()
        }
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                hub._serve(self, body=False)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """Files fetched with GET so far."""
        return [
            unquote(p.split("/resolve/", 1)[1].split("/", 1)[1])
            for m, p in self.requests
            if m == "GET" and "/resolve/" in p
        ]

    # ---- routes -----------------------------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        parts = [unquote(p) for p in urlparse(h.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if repo not in self.repos:
                return self._not_found(h)
            if kind == "revision":
                return self._json(h, self._info(repo))
            if kind == "tree":
                return self._json(h, self._tree(repo))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._not_found(h)
            if name not in self.repos[repo]:
                return self._not_found(h, "EntryNotFound")
            return self._file(h, self.repos[repo][name], body)
        return self._not_found(h)

    def _info(self, repo: str) -> dict:
        files = self.repos[repo]
        return {
            "_id": "0" * 24,
            "id": repo,
            "modelId": repo,
            "sha": COMMIT,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": n} for n in files],
            "lastModified": "2026-11-30T00:00:00.000Z",
            "createdAt": "2026-11-30T00:00:00.000Z",
        }

    def _tree(self, repo: str) -> list[dict]:
        out = []
        for name, f in self.repos[repo].items():
            data = f.read_bytes()
            entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
            if name.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def _file(self, h: BaseHTTPRequestHandler, f: Path, body: bool) -> None:
        data = f.read_bytes()
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if body:
            h.wfile.write(data[start:])

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, obj) -> None:
        raw = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    @staticmethod
    def _not_found(h: BaseHTTPRequestHandler, code: str = "RepoNotFound") -> None:
        raw = json.dumps({"error": "Repository not found"}).encode()
        h.send_response(401 if code == "RepoNotFound" else 404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", "Repository not found")
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)
