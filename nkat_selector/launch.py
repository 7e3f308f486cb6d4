"""Start the chosen server with the user's host, port, context, key and model; report
"ready" once it answers ``/api/v1/model``; stop it cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TextIO

from .probe import Probe
from .rules import Decision


class LaunchError(Exception):
    """The server could not start; the message holds its last output lines."""


@dataclass
class LaunchOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 5001
    ctx: int = 4096
    password: str = ""
    threads: int = 0
    ready_timeout: float = 600.0


def command(decision: Decision, probe: Probe, o: LaunchOptions) -> list[str]:
    """The exact command line of the chosen server."""
    if decision.backend == "nkat":
        cmd = [sys.executable, "-m", "nkat_server.cli", "--model", o.model, "--host", o.host, "--port", str(o.port),
               "--contextsize", str(o.ctx), "--device", decision.device]
    else:
        cmd = [*probe.kobold.command, "--model", o.model, "--host", o.host, "--port", str(o.port),
               "--contextsize", str(o.ctx)]
        if decision.device == "cuda":
            cmd += ["--usecublas", "--gpulayers", str(decision.gpu_layers if decision.gpu_layers >= 0 else 999)]
    if o.threads:
        cmd += ["--threads", str(o.threads)]
    if o.password:
        cmd += ["--password", o.password]
    return cmd


def shown(cmd: list[str]) -> str:
    """The command for printing, with the key masked."""
    out = list(cmd)
    for i, arg in enumerate(out[:-1]):
        if arg == "--password":
            out[i + 1] = "***"
    return " ".join(out)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ready(host: str, port: int) -> bool:
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with urllib.request.urlopen(f"http://{probe_host}:{port}/api/v1/model", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run(cmd: list[str], o: LaunchOptions, out: TextIO = sys.stderr) -> int:
    """Launch, wait until ready, relay the server's output, stop it on SIGINT/SIGTERM."""
    if not port_free(o.host, o.port):
        raise LaunchError(f"port {o.port} on {o.host} is in use: stop what holds it or pick --port")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                errors="replace")
    except OSError as exc:
        raise LaunchError(f"cannot start {cmd[0]}: {exc}") from None
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            out.write(line)
            out.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stopping = threading.Event()

    def stop(signum, frame) -> None:  # noqa: ARG001
        stopping.set()
        if proc.poll() is None:
            proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + o.ready_timeout
        while not _ready(o.host, o.port):
            if proc.poll() is not None or stopping.is_set():
                break
            if time.monotonic() > deadline:
                proc.terminate()
                break
            time.sleep(0.3)
        else:
            out.write(f"backend_selector: ready: http://{o.host}:{o.port} (Kobold API /api, OpenAI API /v1)\n")
            out.flush()
            while proc.poll() is None:
                time.sleep(0.2)
            reader.join(timeout=2)
            return 0 if stopping.is_set() else int(proc.returncode or 0)
        _finish(proc)
        reader.join(timeout=2)
        if stopping.is_set():
            return 0
        why = ("did not answer /api/v1/model within %.0f s" % o.ready_timeout if proc.returncode in (None, -15)
               else f"exited with status {proc.returncode} before it was ready")
        last = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        raise LaunchError(f"{shown(cmd)}\n{why}; its last output:\n{last}")
    finally:
        if proc.poll() is None:
            _finish(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
