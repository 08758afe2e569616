"""A real PostgreSQL server for a test session (or a benchmark run): ``initdb`` + ``pg_ctl`` in a
temporary directory, listening on a private Unix socket only, stopped by pid.

Debian's ``postgresql`` package provides the binaries (``.ci/run`` installs it). ``initdb``
refuses to run as root, so as root the server runs as the ``postgres`` user (made by the
package); the directory is that user's, mode 0700.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

USER = "capsule"  # the superuser initdb makes; trust authentication on the private socket only
PORT = 5433  # a port number names the socket file; nothing listens on TCP (listen_addresses='')


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian puts it under /usr/lib/postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``with PostgresServer() as pg: pg.url(db)``; the server and its files are gone afterwards."""

    def __init__(self, *, fsync: bool = True, listen: str = "") -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (as .ci/run does)")
        self.bin = bindir
        self.fsync = fsync
        self.listen = listen  # an address to listen on over TCP too (trust from anywhere: tests only)
        self.dir = Path(tempfile.mkdtemp(prefix="cpsl-pg-"))
        self.data = self.dir / "data"
        self.pid: int | None = None
        self._user: str | None = None
        if os.getuid() == 0:  # initdb refuses root: run the server as the package's postgres user
            self._user = "postgres"
            owner = pwd.getpwnam(self._user)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            cwd=self.dir,
        )

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions")
        if self.listen:
            with open(self.data / "pg_hba.conf", "a") as hba:  # root may write it; so may its owner
                hba.write("host all all 0.0.0.0/0 trust\n")
        self.resume()
        return self

    def _options(self) -> str:
        fsync = "on" if self.fsync else "off"
        options = f"-k {self.dir} -c listen_addresses='{self.listen}' -p {PORT} -c fsync={fsync}"
        return options + " -c max_connections=200 -c shared_buffers=64MB"

    def resume(self) -> None:
        """Start the server (again) on its data directory; its output goes to a log file, so the
        postmaster holds none of our pipes."""
        try:
            self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-o", self._options(),
                      "-l", str(self.dir / "log"))
        except subprocess.CalledProcessError as exc:
            log = (self.dir / "log").read_text(errors="replace") if (self.dir / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{log[-2000:]}") from None
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def halt(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed), keeping its data to ``resume``."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60", timeout=90)

    def restart(self) -> None:
        """Every connection is cut; the server is back when this returns."""
        self.halt("fast")
        self.resume()

    @property
    def host(self) -> str:
        return str(self.dir)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL to ``database`` over the private socket (no password: trust on the socket)."""
        return f"postgresql://{USER}@/{database}?host={self.dir}&port={PORT}"

    def tcp_url(self, database: str = "postgres") -> str:
        """The same over TCP, to the ``listen`` address."""
        return f"postgresql://{USER}@{self.listen}:{PORT}/{database}"

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", self.host, "-p", str(PORT), "-U", USER, name)
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown; SIGKILL the postmaster by pid if it does not go; remove its files."""
        if self.pid is not None:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "20", timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.1)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()
