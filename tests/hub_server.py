"""A minimal stand-in for the Hugging Face Hub HTTP API, enough for ``push_to_hub`` to upload.

Start it, point ``HF_ENDPOINT`` at it *before* huggingface_hub is imported (so: in a subprocess),
push, then read what arrived in ``server.uploads`` (path -> bytes) and ``server.requests``.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Paths of bitsandbytes' import-time kernel lookup (see :meth:`HubStandIn.hub_requests`).
KERNEL_LOOKUP = ("/api/organizations/kernels-community/", "/api/models/kernels-community/", "/api/kernels/")


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args) -> None:  # keep test output quiet
        return

    def _reply(self, code: int, payload: dict | None = None) -> None:
        body = json.dumps(payload or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path, dict(self.headers)))
        self._reply(404)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, dict(self.headers)))
        if self.path.startswith("/api/whoami"):
            self._reply(200, {"name": "etu-user", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self._body()
        self.server.requests.append(("POST", self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo = (
                f"{data.get('organization') or 'etu-user'}/{data['name']}" if "/" not in data["name"] else data["name"]
            )
            self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        elif path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        elif "/commit/" in path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    self.server.uploads[value["path"]] = base64.b64decode(value["content"])
            repo = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            oid = "0" * 40
            self._reply(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        else:
            self._reply(404, {"error": f"unexpected POST {path}"})


class HubStandIn(ThreadingHTTPServer):
    """Serve on 127.0.0.1 in a background thread; ``url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.uploads: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def hub_requests(self) -> list[tuple[str, str, dict]]:
        """The requests but bitsandbytes' kernel lookup.

        On CPUs with AVX512-BF16, ``import bitsandbytes`` (which ``import peft`` does when bitsandbytes is
        installed) asks the Hub for its ``kernels-community/...`` CPU kernel through the ``kernels`` package
        (a dependency of transformers since 5.25): a GET of ``/api/organizations/kernels-community/...``
        that no etu-hf code makes and that fails with a warning when there is no network."""
        return [r for r in self.requests if not r[1].startswith(KERNEL_LOOKUP)]

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
