"""The supervisor's handle on the warm template process that forks every actor of this host
(the program itself: ``capsule_actors/actors/template.py``). A worker node uses the same class."""

from __future__ import annotations

import json
import logging
import os
import select
import struct
import subprocess
import sys
import time
from typing import Any

from .specs import ActorProcess, ChildSpec

log = logging.getLogger("capsule_actors.supervisor")


class ActorTemplate:
    """The supervisor's handle on the warm template process that forks every actor."""

    def __init__(self, registry: bytes, env_path: list[str], spawn_timeout: float = 30.0) -> None:
        out_r, out_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in env_path if p))
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "capsule_actors.actors.template",
            "--parent",
            str(os.getpid()),
            "--out-fd",
            str(out_w),
        ]
        try:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(out_w,), env=env)
        finally:
            os.close(out_w)
        self.fd = out_r
        os.set_blocking(out_r, False)
        self.spawn_timeout = spawn_timeout
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        self._write(struct.pack("!Q", len(registry)) + registry)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _write(self, data: bytes) -> bool:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(data)
            self.popen.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def lease(self, until: float) -> None:
        """A cluster member's lease: past ``until`` (monotonic) the template SIGKILLs every actor and
        exits, even while the supervisor is frozen."""
        self._write((json.dumps({"op": "lease", "until": until}) + "\n").encode())

    def spawn(
        self, spec: ChildSpec, gen: int, endpoint: str, server_key: str | None, state_dir: str, **extra: Any
    ) -> ActorProcess | None:
        """Fork an actor for ``spec``; None when the template is gone (it will be replaced).
        ``extra`` goes to the actor's ``ActorArgs`` (a worker node's keys and lease file)."""
        actor = {
            "slot": spec.slot,
            "gen": gen,
            "role": spec.role,
            "endpoint": endpoint,
            "server_key": server_key,
            "state_dir": state_dir,
            **extra,
        }
        if not self._write((json.dumps({"op": "spawn", "actor": actor}) + "\n").encode()):
            return None
        deadline = time.monotonic() + self.spawn_timeout
        while time.monotonic() < deadline:
            found = None
            for event in self._read(deadline - time.monotonic()):
                if event.get("op") == "spawned" and event["slot"] == spec.slot and event["gen"] == gen:
                    found = event
                else:
                    self._events.append(event)  # e.g. another actor's exit: the supervisor needs it
            if found is not None:
                now = time.monotonic()
                return ActorProcess(spec, gen, found["pid"], now, f"{spec.slot}.{gen}".encode(), last_seen=now)
            if not self.alive():
                return None
        log.error("the actor template did not fork %s within %.0f s", spec.slot, self.spawn_timeout)
        return None

    def pending(self) -> bool:
        """Events read while waiting for a spawn, not handed to the supervisor yet."""
        return bool(self._events)

    def events(self) -> list[dict[str, Any]]:
        """Everything the template reported since the last call (``exit`` events matter)."""
        events, self._events = self._events + self._read(0.0), []
        return events

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        if not select.select([self.fd], [], [], max(0.0, timeout))[0]:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        return [json.loads(line) for line in lines if line]

    def close(self, timeout: float = 5.0) -> None:
        """Close its stdin (it stops its children and exits); kill it if it does not."""
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        os.close(self.fd)
