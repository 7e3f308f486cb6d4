"""A real ``nkat-server`` in a subprocess on a free loopback port, and a tiny stdlib HTTP client.

The process runs in a scratch folder (so no ./config.toml leaks in), with the real default model;
its log is kept and shown when it fails to start.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 600  # loading the model on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert "application/json" in self.headers.get("Content-Type", ""), self.headers.get("Content-Type")
        return json.loads(self.body)


class Server:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = workdir / "server.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nkat_server.cli", "--port", str(self.port), *args],
                                     cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nkat-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/health", timeout=5).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"nkat-server did not come up in {START_TIMEOUT} s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 600) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body (blank-line separated events)."""
    out = []
    for frame in body.decode("utf-8").split("\n\n"):
        for line in frame.split("\n"):
            if line.startswith("data: "):
                out.append(line[len("data: "):])
    return out
