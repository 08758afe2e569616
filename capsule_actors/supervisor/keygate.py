"""Who may use the supervisor's TCP socket (``--bind``), and as whom.

The authorized keys are the files ``KEYS/authorized/NAME.key``; each key is bound to the NAME it
was made for (``capsule-actors keys DIR --add NAME``). ZeroMQ asks ``KeyGate`` (its ZAP handler,
on a thread of its own) at every CURVE handshake; an accepted peer's messages then carry the
User-Id ``NAME/FINGERPRINT``, so the supervisor knows which key sent each one: a worker node may
join only under its key's name, and after a reload (SIGHUP) a removed key's messages are
dropped even on a connection made before. Every refusal is logged with the key's fingerprint,
once a minute per key, so an operator sees who knocks without a flood.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..transport import authorized_keys, key_fingerprint

log = logging.getLogger("capsule_actors.supervisor")

REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about the same refused key
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def user_id(name: str, public: bytes) -> str:
    """What an accepted peer's messages carry as their User-Id."""
    return f"{name}/{key_fingerprint(public)}"


def key_name(user: str) -> str:
    """The key's NAME in a User-Id made by ``user_id``."""
    return user.split("/", 1)[0]


class KeyGate(ThreadAuthenticator):
    """The ZAP handler of the TCP socket: the authorized keys, their names, the refusal log."""

    def __init__(self, ctx: zmq.Context[Any], authorized: Path) -> None:
        super().__init__(ctx, log=logging.getLogger("capsule_actors.zap"))
        self.authorized = authorized
        self._names = authorized_keys(authorized)  # z85 public key -> NAME; replaced whole by reload()
        self._users = {user_id(name, key) for key, name in self._names.items()}
        self._said: dict[str, float] = {}  # what was logged (a fingerprint, "handshake") -> when
        self._said_lock = threading.Lock()
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain="*", credentials_provider=self)

    # ---- the ZAP thread ----------------------------------------------------------------------
    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials hook: is this z85 public key authorized?"""
        if key in self._names:
            return True
        fingerprint = key_fingerprint(key)
        self.say_once(
            fingerprint,
            f"refused a TCP peer: its key {fingerprint} is not authorized (no matching public key in "
            f"{self.authorized}/; add one with `capsule-actors keys DIR --add NAME`, then SIGHUP the supervisor)",
        )
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        return user_id(self._names.get(key, ""), key)

    # ---- the supervisor's loop ---------------------------------------------------------------
    def allows(self, user: str) -> bool:
        """Is the key behind this User-Id still authorized (it may have been removed since)?"""
        return user in self._users

    def reload(self) -> tuple[list[str], list[str]]:
        """Read the authorized keys again: (names added, names removed); a name whose key changed
        is in both."""
        names = authorized_keys(self.authorized)
        old, new = self._users, {user_id(name, key) for key, name in names.items()}
        self._names, self._users = names, new
        return sorted(key_name(u) for u in new - old), sorted(key_name(u) for u in old - new)

    def say_once(self, what: str, line: str) -> None:
        """Log ``line`` unless the same ``what`` was logged less than a minute ago."""
        now = time.monotonic()
        with self._said_lock:
            if now - self._said.get(what, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
                return
            self._said[what] = now
            if len(self._said) > 10_000:  # a scan of random keys must not grow this for ever
                self._said = {k: t for k, t in self._said.items() if now - t < REFUSAL_LOG_INTERVAL}
        log.warning("%s", line)

    # ---- handshakes that fail before a key can be checked ------------------------------------
    def watch(self, sock: zmq.Socket[Any], address: str) -> None:
        """Log the CURVE handshakes on ``sock`` that fail before ZAP sees a key: the peer holds
        another supervisor's server key (or does not speak CURVE)."""
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self._watching.set()

        def run() -> None:
            try:
                while self._watching.is_set():
                    if not monitor.poll(200):
                        continue
                    recv_monitor_message(monitor)
                    self.say_once(
                        "handshake",
                        f"a TCP peer of {address} failed the CURVE handshake: it most likely holds another "
                        "supervisor's server.key (or does not use CURVE)",
                    )
            finally:
                monitor.close(0)

        self._watcher = threading.Thread(target=run, name="capsule-keygate-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join(2)
        super().stop()
