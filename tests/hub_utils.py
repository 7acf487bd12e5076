"""Test helpers for hub code paths without a network: a hand-made HF cache and a loopback fake Hub."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def lay_out_hf_cache(saved_dir: Path, hf_home: Path, repo_id: str) -> Path:
    """Copy a `save_pretrained` folder into `<hf_home>/hub/models--org--name/snapshots/<sha>/` with `refs/main`."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(saved_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


class FakeHub:
    """Loopback stand-in for the Hub's create-repo / preupload / commit endpoints; records committed files."""

    def __init__(self):
        self.commits: list[dict[str, bytes]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, payload: dict, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._reply({"error": "not found"}, 404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                if length > 64 * 2**20:
                    return self._reply({"error": "too large"}, 413)
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(body)
                    return self._reply({"url": f"{hub.endpoint}/{name.get('organization') or 'user'}/{name['name']}"})
                if path == "/api/validate-yaml":
                    return self._reply({})
                if path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if path.endswith("/commit/main"):
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append(files)
                    repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                    return self._reply({"commitUrl": f"{hub.endpoint}/{repo}/commit/1", "commitOid": "1" * 40})
                return self._reply({"error": f"unexpected {path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self):
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
