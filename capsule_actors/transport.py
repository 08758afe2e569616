"""Where the runtime lives on disk and how its ZeroMQ sockets are made.

The state directory is private to the user (0700); its sockets are ``ipc://`` files inside it.
Where the socket path is too long for ``sun_path`` the endpoint falls back to loopback TCP, and
then CURVE encryption is switched on, with the server key kept in ``supervisor.json`` (0600), so
the same rule holds: only the user who can read the state directory can talk to the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.z85

from .errors import ConfigError, StateDirError

RUNTIME_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"
SOCKET_NAMES = ("client", "actor")  # the supervisor's sockets in the state directory
_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin


def ensure_state_dir(path: Path) -> Path:
    """Create the state directory 0700 (or tighten it), refusing one owned by another user."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise StateDirError(f"cannot create state directory {str(path)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state directory {str(path)!r} is not a directory")
    if info.st_uid != os.getuid():
        raise StateDirError(
            f"state directory {str(path)!r} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}); use a directory of your own"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(f"state directory {str(path)!r} is not writable")
    return path


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and sockets created inside are readable by the owner only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A bindable/connectable address; ``curve`` holds the server key pair for tcp endpoints."""

    address: str
    server_public: str | None = None
    server_secret: str | None = None


def ipc_fits(state_dir: Path, names: Iterable[str] = SOCKET_NAMES) -> bool:
    """Whether the sockets ``names`` of ``state_dir`` all fit in ``sun_path``: one answer for the
    whole directory, so its client and actor sockets never end up on different transports."""
    return all(len(os.fsencode(str(state_dir / f"{name}.sock"))) <= _MAX_IPC_PATH for name in names)


def local_endpoint(state_dir: Path, name: str) -> Endpoint:
    """``ipc://<state>/<name>.sock``, or loopback TCP with CURVE when any socket path of the
    state directory would be too long (then every one of them is on TCP, with the same rule)."""
    if ipc_fits(state_dir, (*SOCKET_NAMES, name)):
        return Endpoint(f"ipc://{state_dir / f'{name}.sock'}")
    public, secret = zmq.curve_keypair()
    return Endpoint("tcp://127.0.0.1:*", public.decode(), secret.decode())


def bind(sock: zmq.Socket, endpoint: Endpoint) -> str:  # type: ignore[type-arg]
    """Bind ``sock`` and return the concrete address (the real port for ``tcp://...:*``)."""
    if endpoint.server_secret:
        sock.curve_server = True
        sock.curve_secretkey = endpoint.server_secret.encode()
        sock.curve_publickey = (endpoint.server_public or "").encode()
    if endpoint.address.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.address[len("ipc://") :])  # stale socket; we hold the pid lock
        with private_umask():
            sock.bind(endpoint.address)
        return endpoint.address
    sock.bind(endpoint.address)
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def connect(
    sock: zmq.Socket,  # type: ignore[type-arg]
    address: str,
    server_public: str | None,
    client_keys: tuple[str, str] | None = None,
) -> None:
    """Connect ``sock``; as a CURVE client when the server needs one, with ``client_keys``
    (public, secret) when the server authorizes clients, else with a fresh key pair."""
    if server_public and not address.startswith("tcp://"):  # it would wait for a handshake for ever
        raise ConfigError(
            f"a CURVE server key was given for {address!r}: only tcp:// endpoints use CURVE "
            "(a state directory's ipc:// sockets do not)"
        )
    if server_public:
        public, secret = (k.encode() for k in client_keys) if client_keys else zmq.curve_keypair()
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(address)


SERVER_KEY = "server"
CLIENT_KEY = "client"
AUTHORIZED_DIR = "authorized"
NODE_PREFIX = b"node/"  # routing ids of worker nodes on the supervisor's TCP socket
NODE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"


def make_keys(directory: Path) -> Path:
    """``capsule-actors keys DIR``: a CURVE key pair for the supervisor's ``--bind tcp://`` and one
    for a client, whose public key is authorized (DIR/authorized/). Refuses to overwrite keys."""
    import zmq.auth

    directory = ensure_state_dir(directory)
    if (directory / f"{SERVER_KEY}.key_secret").exists():
        raise StateDirError(f"{str(directory)!r} already holds keys; use an empty directory")
    with private_umask():
        zmq.auth.create_certificates(str(directory), SERVER_KEY)
        zmq.auth.create_certificates(str(directory), CLIENT_KEY)
        authorized = directory / AUTHORIZED_DIR
        authorized.mkdir(mode=0o700, exist_ok=True)
        (authorized / f"{CLIENT_KEY}.key").write_bytes((directory / f"{CLIENT_KEY}.key").read_bytes())
    return directory


def add_client_key(directory: Path, name: str) -> Path:
    """``capsule-actors keys DIR --add NAME``: one more client key pair (say, for a worker node),
    authorized at once; returns its secret key file, the one the client needs with server.key."""
    import re

    import zmq.auth

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name) or name == SERVER_KEY:
        raise ConfigError(f"key name {name!r}: use letters, digits, '_', '.', '-' (not 'server')")
    if not (directory / f"{SERVER_KEY}.key_secret").exists():
        raise StateDirError(f"{str(directory)!r} holds no keys yet: run `capsule-actors keys {directory}` first")
    if (directory / f"{name}.key_secret").exists():
        raise StateDirError(f"{str(directory / name)!r}.key_secret already exists; pick another name")
    with private_umask():
        zmq.auth.create_certificates(str(directory), name)
        authorized = directory / AUTHORIZED_DIR
        authorized.mkdir(mode=0o700, exist_ok=True)
        (authorized / f"{name}.key").write_bytes((directory / f"{name}.key").read_bytes())
    return directory / f"{name}.key_secret"


def key_fingerprint(public: str | bytes) -> str:
    """A short, safe-to-log name of a CURVE public key (z85 text): the first 16 hex digits of the
    SHA-256 of its 32 bytes. ``keys --add`` prints it; the supervisor's refusals name it."""
    import hashlib

    text = public.encode() if isinstance(public, str) else public
    try:
        raw = zmq.utils.z85.decode(text)
    except (ValueError, KeyError):
        raw = text
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]


def authorized_keys(directory: Path) -> dict[bytes, str]:
    """The public keys in ``directory`` (``KEYS/authorized/NAME.key``), each bound to the NAME
    it was made for: z85 public key -> name. A file that is not a public key is skipped, with a
    warning naming it."""
    import logging

    import zmq.auth

    keys: dict[bytes, str] = {}
    for path in sorted(directory.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            logging.getLogger("capsule_actors.supervisor").warning("skipped %s: not a CURVE public key (%s)", path, exc)
            continue
        keys[public] = path.name[: -len(".key")]
    return keys


def load_keys(directory: Path, name: str) -> tuple[str, str]:
    """(public, secret) of the key pair ``name`` in ``directory``; StateDirError when missing."""
    import zmq.auth

    path = directory / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError):
        raise StateDirError(
            f"no CURVE key pair {str(path)!r}: create the keys with `capsule-actors keys {directory}`"
        ) from None
    if secret is None:
        raise StateDirError(f"{str(path)!r} holds no secret key")
    return public.decode(), secret.decode()


@dataclasses.dataclass(frozen=True)
class RemoteEndpoint:
    """A supervisor reached over TCP with CURVE (``CAPSULE_CONNECT`` + ``CAPSULE_KEYS``)."""

    address: str
    server_public: str
    client_public: str
    client_secret: str
    key_name: str = CLIENT_KEY  # the NAME of NAME.key_secret: the name the key was made for
    timeout: float = 30.0  # how long a submit waits for the supervisor's ack (CAPSULE_REMOTE_TIMEOUT)
    keys: str = ""  # where the keys were read from (named in errors)

    @classmethod
    def with_keys(cls, address: str, keys: Path) -> RemoteEndpoint:
        """``keys`` is a directory from ``capsule-actors keys`` (server.key + client.key_secret), or
        one client's ``NAME.key_secret`` file with the supervisor's ``server.key`` beside it."""
        if not address.startswith("tcp://"):
            raise ConfigError(f"{address!r}: expected tcp://HOST:PORT")
        if keys.is_dir():
            directory, client = keys, CLIENT_KEY
        elif keys.name.endswith(".key_secret"):
            directory, client = keys.parent, keys.name[: -len(".key_secret")]
            if not keys.is_file():
                raise StateDirError(
                    f"no key file {str(keys)!r}: copy this client's NAME.key_secret from `capsule-actors keys DIR "
                    "--add NAME` (with the supervisor's server.key beside it)"
                )
        else:
            raise StateDirError(f"{str(keys)!r}: expected a keys directory or a NAME.key_secret file")
        server_public, _ = _public_only(directory / f"{SERVER_KEY}.key")
        client_public, client_secret = load_keys(directory, client)
        return cls(address, server_public, client_public, client_secret, client, remote_timeout(), str(keys))

    def runtime_file(self) -> RuntimeFile:
        """What a local client would read from supervisor.json, for this remote supervisor."""
        return RuntimeFile(
            pid=0, client=self.address, actor="", server_public=self.server_public, started_at=0.0, state_dir=""
        )


# What a TCP peer's socket monitor reports of its CURVE handshake.
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


def handshake_refusal(event: int, endpoint: RemoteEndpoint) -> str:
    """Why the supervisor at ``endpoint`` refused a handshake (a failure event of HANDSHAKE_EVENTS)."""
    keys = endpoint.keys
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"key not authorized by the supervisor at {endpoint.address}: key {endpoint.key_name!r} "
            f"({key_fingerprint(endpoint.client_public)}, from {keys}) is not in its KEYS/authorized/; "
            "add it there (`capsule-actors keys DIR --add NAME` makes and authorizes one), then SIGHUP the supervisor"
        )
    return (
        f"the CURVE handshake with the supervisor at {endpoint.address} failed: the server key given "
        f"(server.key beside {keys}) is not that supervisor's; copy its KEYS/server.key"
    )


class Handshakes:
    """A TCP peer's verdict on its CURVE handshakes (from its socket monitor): refused for good
    when the supervisor's ZAP handler said no (the key is not authorized), or when every
    handshake so far was closed by the server (3 in a row, none ever accepted: the server key is
    not that supervisor's). A peer that was accepted before keeps retrying such failures: a proxy
    or a restarting supervisor closes connections too, and the server key did not change."""

    CLOSED_IN_A_ROW = 3

    def __init__(self) -> None:
        self.accepted = False
        self.closed = 0

    def refused(self, event: int) -> bool:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.accepted, self.closed = True, 0
            return False
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return True
        self.closed += 1
        return not self.accepted and self.closed >= self.CLOSED_IN_A_ROW


REMOTE_TIMEOUT_ENV = "CAPSULE_REMOTE_TIMEOUT"


def remote_timeout() -> float:
    """Seconds a submit over TCP waits for the supervisor's ack: $CAPSULE_REMOTE_TIMEOUT, else 30."""
    text = os.environ.get(REMOTE_TIMEOUT_ENV)
    if not text:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise ConfigError(f"{REMOTE_TIMEOUT_ENV}={text!r}: expected seconds, a number above 0 (e.g. 30)")
    return value


def _public_only(path: Path) -> tuple[str, None]:
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError):
        raise StateDirError(f"no CURVE public key {str(path)!r}: copy it from `capsule-actors keys DIR`") from None
    return public.decode(), None


@dataclasses.dataclass(frozen=True)
class RuntimeFile:
    """The contents of ``supervisor.json``: how clients and actors find a running supervisor."""

    pid: int
    client: str
    actor: str
    server_public: str | None
    started_at: float
    state_dir: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def write_runtime_file(state_dir: Path, info: RuntimeFile) -> None:
    """Atomically replace supervisor.json (mode 0600)."""
    tmp = state_dir / f".{RUNTIME_FILE}.{os.getpid()}"
    try:
        with private_umask():
            tmp.write_text(info.to_json())
        os.replace(tmp, state_dir / RUNTIME_FILE)
    except OSError as exc:  # read-only or full: say so, leave nothing half-written
        tmp.unlink(missing_ok=True)
        raise StateDirError(f"cannot write {str(state_dir / RUNTIME_FILE)!r}: {exc.strerror}") from None


def read_runtime_file(state_dir: Path) -> RuntimeFile | None:
    """The running supervisor's file, or None when absent, unreadable, or left by a supervisor
    that is gone: its pid is dead, or no process holds ``supervisor.lock`` (the pid was reused,
    say after a reboot)."""
    info = _parse_runtime_file(state_dir)
    if info is None or not pid_alive(info.pid) or not supervisor_lock_held(state_dir):
        return None
    return info


def stale_runtime_file(state_dir: Path) -> RuntimeFile | None:
    """A ``supervisor.json`` that names no running supervisor (it did not stop cleanly), for
    messages that say so; None when there is none or its supervisor runs."""
    info = _parse_runtime_file(state_dir)
    if info is None or (pid_alive(info.pid) and supervisor_lock_held(state_dir)):
        return None
    return info


def _parse_runtime_file(state_dir: Path) -> RuntimeFile | None:
    """supervisor.json as written, whoever wrote it; None when absent or not ours to read."""
    try:
        data: dict[str, Any] = json.loads((state_dir / RUNTIME_FILE).read_text())
        return RuntimeFile(**data)
    except (OSError, ValueError, TypeError):
        return None


def supervisor_lock_held(state_dir: Path) -> bool:
    """Whether a supervisor holds ``supervisor.lock`` (its ``flock(LOCK_EX)`` lasts its whole life,
    which a reused pid cannot fake): a shared lock we can take, released at once, says none does."""
    # Three system calls, no wait (callers: reconnects, the board's feed; never per task). A
    # supervisor taking its lock in the microseconds we hold ours would find it busy: callers
    # ask only once supervisor.json names a live pid, which before a start means a reused one.
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # never made: no supervisor ever ran here
    except OSError:
        return True  # cannot tell (say, no permission): trust the pid, as before
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # a file system without flock: trust the pid
    finally:
        os.close(fd)
    return False


def remove_runtime_file(state_dir: Path, pid: int) -> None:
    """Remove supervisor.json if it is still ours."""
    path = state_dir / RUNTIME_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def wait_for(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
