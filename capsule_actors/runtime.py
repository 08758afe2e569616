"""Embedded mode: ``with app.start():`` runs a supervisor as a child process for this scope."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import errors
from .bootstrap import ClientConfig, check_store, resolve_state_dir, store_url
from .client import Client
from .transport import ensure_state_dir

if TYPE_CHECKING:
    from .app import App

START_TIMEOUT = 60.0


class Runtime:
    """A supervisor child process owned by this process; stop() (or leaving ``with``) ends it."""

    def __init__(
        self,
        app: App,
        state_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        process_workers: int | None = None,
        grace: float | None = None,
        start_timeout: float = START_TIMEOUT,
        store: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.state_dir: Path = resolve_state_dir(state_dir if state_dir is not None else app.state_dir)
        self.store = store_url(check_store(store), app.store)  # resolved here, where the supervisor starts
        self.workers = workers
        self.process_workers = process_workers
        self.grace = app.grace if grace is None else grace
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> Runtime:
        """Spawn the supervisor and wait until its actors are up; raise what stopped it."""
        ensure_state_dir(self.state_dir)
        try:
            registry = cloudpickle.dumps(self.app, protocol=5)
        except Exception as exc:
            raise errors.SerializationError(f"the app's tasks cannot be pickled: {exc!r}") from exc
        ready_r, ready_w = os.pipe()
        # -P: no current directory first on sys.path, so the child imports the same package as us
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "capsule_actors.supervisor",
            "--state-dir",
            str(self.state_dir),
            "--ready-fd",
            str(ready_w),
            "--parent",
            str(os.getpid()),
            "--grace",
            str(self.grace),
        ]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        if self.process_workers:
            cmd += ["--process-workers", str(self.process_workers)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, pass_fds=(ready_w,), env=env, start_new_session=True
            )
        finally:
            os.close(ready_w)
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"store": self.store}).encode() + b"\n" + registry)
            self.process.stdin.close()
            line = self._read_ready(ready_r)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_r)
        if line != "ready":
            self.stop()
            name, _, message = line.partition(": ")
            cls = getattr(errors, name.removeprefix("error "), errors.CapsuleError)
            raise cls(message or f"the supervisor exited before it was ready (code {self.process.returncode})")
        self.app.bind(ClientConfig(self.state_dir))
        return self

    def _read_ready(self, fd: int) -> str:
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.CapsuleError(f"the supervisor was not ready within {self.start_timeout} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace").strip()

    def stop(self, timeout: float | None = None) -> int | None:
        """Graceful stop (SIGTERM, running tasks get ``grace`` seconds), SIGKILL as a last resort."""
        proc = self.process
        if proc is None:
            return None
        Client.close_all(self.state_dir)
        if self.app._config == ClientConfig(self.state_dir):
            self.app.bind(None)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout if timeout is not None else self.grace + 10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def status(self) -> dict[str, Any]:
        """The supervisor's and every actor's status (the data of ``capsule-actors status``)."""
        from . import messages

        body, _ = self.app.client().call(lambda req: messages.Status(req))
        return messages.StatusSnapshot.from_wire(body).to_wire()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Runtime:
        return await asyncio.get_running_loop().run_in_executor(None, self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)
