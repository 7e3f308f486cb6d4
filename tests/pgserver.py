"""A throw-away PostgreSQL server: Debian's binaries (``/usr/lib/postgresql/*/bin``, which stock
Debian keeps off PATH, else PATH), a cluster in a fresh temp folder, listening on 127.0.0.1 at a
free port (password login) and on a unix socket in that folder.

PostgreSQL refuses to run as root: under root the cluster belongs to, and the server runs as, the
``postgres`` user (made by Debian's package) or else ``nobody``. The folder is made under the
system temp folder (pytest's own is private to root). The server is a child of the test process,
stopped (immediate shutdown) and its folder removed by :meth:`PostgresServer.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from serverproc import free_port

USER = "nkat"
START_TIMEOUT = 60


def find_binaries() -> Path | None:
    """The folder holding initdb and postgres: the newest under /usr/lib/postgresql, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("postgres") else None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists to run PostgreSQL as")


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _run_as()
        self.password = "pw-" + os.urandom(6).hex()
        self.base = Path(tempfile.mkdtemp(prefix="nkat-pg-"))
        self.data = self.base / "data"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        try:
            self._initdb()
            self._start()
        except BaseException:
            self.stop()
            raise

    def _popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "env": dict(os.environ, HOME=str(self.base), LC_ALL="C")}

    def _initdb(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        proc = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                               "--auth-local=trust", "--auth-host=scram-sha-256", "--no-locale", "-E", "UTF8",
                               "--no-sync"], capture_output=True, text=True, cwd=self.base, **self._popen_kwargs())
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")

    def _start(self) -> None:
        import psycopg

        for _ in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            log = open(self.base / "server.log", "ab")
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.base),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.base, **self._popen_kwargs())
            log.close()
            deadline = time.monotonic() + START_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                    return
                except psycopg.OperationalError:
                    time.sleep(0.1)
            if self.proc.poll() is None:
                break
        raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} password={self.password} dbname={database}"

    def url(self, database: str, driver: str = "") -> str:
        """A URL as a user types it: ``postgresql://user:password@host:port/database``."""
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return f"{scheme}://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: the cluster is thrown away
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)
