"""Remote peers and their keys: a refused key is told at once (a node exits 2, a client raises
KeyRefused), the supervisor logs each refusal with the key's fingerprint, a key is bound to the
node name it was made for, SIGHUP reloads the authorized keys (a removed key is refused and its
node fenced), and every remote wait has a deadline. Real processes over 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.auth
from conftest import ROOT, cli, spawn_cli, wait_running, wait_until

from capsule_actors.transport import key_fingerprint

MODULE = '''
import capsule_actors as cpsl
app = cpsl.App("keyed", workers=1, process_workers=1, grace=2.0)

@app.task
async def add(x, y):
    return x + y
'''

# A long-lived remote client: one submit per line on stdin, prints the result or the error.
CLIENT = '''
import sys
import keyed_mod
for line in sys.stdin:
    try:
        print("ok", keyed_mod.add.submit(1, 2).result(timeout=20), flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, exc, flush=True)
'''


class Tail:
    """A process's stderr, read line by line on a thread (so its pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        wait_until(lambda: self.count(text), timeout, interval=0.05)
        return next(line for line in list(self.lines) if text in line)


class Keyed:
    """A supervisor with --bind on loopback, its keys (n1, n2 authorized), and a stranger's keys."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], root: Path, state_dir: Path) -> None:
        self.procs, self.root, self.state_dir = procs, root, state_dir
        (root / "keyed_mod.py").write_text(MODULE)
        (root / "client.py").write_text(CLIENT)
        self.keys, self.other = root / "keys", root / "other"
        for directory in (self.keys, self.other):
            assert cli("keys", str(directory), cwd=root).returncode == 0
            for name in ("n1", "n2"):
                assert cli("keys", str(directory), "--add", name, cwd=root).returncode == 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.supervisor = spawn_cli(procs, "run", "keyed_mod:app", "--bind", self.address, "--keys", str(self.keys),
                                    state_dir=state_dir, cwd=root)
        self.log = Tail(self.supervisor)
        wait_running(state_dir)

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.root), str(ROOT)]), **extra)

    def node(self, key: Path, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "capsule_actors", "worker", "keyed_mod:app", "--connect", self.address,
               "--key", str(key), "--workers", "1", "--process-workers", "0", *args]
        proc = subprocess.Popen(cmd, cwd=self.root, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def client(self, keys: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "client.py"], cwd=self.root, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.env(CAPSULE_CONNECT=self.address, CAPSULE_KEYS=str(keys)))
        self.procs.append(proc)
        return proc

    def stranger(self, name: str = "n1") -> Path:
        """A key pair the supervisor never authorized, with its real server.key beside it."""
        directory = self.root / "stranger"
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / f"{name}.key_secret").write_bytes((self.other / f"{name}.key_secret").read_bytes())
        (directory / "server.key").write_bytes((self.keys / "server.key").read_bytes())
        return directory / f"{name}.key_secret"

    def status_nodes(self) -> set[str]:
        r = cli("status", "--json", state_dir=self.state_dir, cwd=self.root)
        import json

        return {n["name"] for n in json.loads(r.stdout)["nodes"]}


@pytest.fixture
def keyed(procs, state_dir, tmp_path) -> Iterator[Keyed]:
    yield Keyed(procs, tmp_path, state_dir)


def _fingerprint(key_secret: Path) -> str:
    public, _ = zmq.auth.load_certificate(str(key_secret))
    return key_fingerprint(public)


def _exits(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> tuple[int, str, float]:
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - t0


def test_a_node_with_an_unauthorized_key_exits_2_and_the_supervisor_logs_its_fingerprint_once(keyed):
    stranger = keyed.stranger()
    fingerprint = _fingerprint(stranger)
    for _ in range(2):  # twice: the supervisor's line is not repeated within the minute
        code, err, took = _exits(keyed.node(stranger))
        assert code == 2 and took < 8, (code, err)
        assert "key not authorized by the supervisor" in err and keyed.address in err and fingerprint in err
    line = keyed.log.wait_for(f"its key {fingerprint} is not authorized")
    assert "refused a TCP peer" in line
    assert keyed.log.count(fingerprint) == 1
    assert keyed.status_nodes() == set()


def test_a_node_with_another_supervisors_server_key_exits_2_and_the_supervisor_says_so(keyed):
    wrong = keyed.root / "wrong"
    wrong.mkdir(mode=0o700)
    (wrong / "n1.key_secret").write_bytes((keyed.keys / "n1.key_secret").read_bytes())  # an authorized key ...
    (wrong / "server.key").write_bytes((keyed.other / "server.key").read_bytes())  # ... but not its server key
    code, err, took = _exits(keyed.node(wrong / "n1.key_secret"))
    assert code == 2 and took < 8, (code, err)
    assert "is not that supervisor's" in err and keyed.address in err
    keyed.log.wait_for("failed the CURVE handshake")


def test_a_key_is_bound_to_its_name_and_the_name_defaults_to_it(keyed):
    code, err, took = _exits(keyed.node(keyed.keys / "n1.key_secret", "--name", "n2"))
    assert code == 2 and took < 8, (code, err)
    assert "node 'n2' presented the key made for 'n1'" in err
    keyed.log.wait_for("refused worker node 'n2'")

    node = keyed.node(keyed.keys / "n1.key_secret")  # no --name: the key's
    wait_until(lambda: keyed.status_nodes() == {"n1"}, 30, interval=0.2)
    assert node.poll() is None


def test_missing_key_file_is_named(keyed):
    code, err, _ = _exits(keyed.node(keyed.keys / "n9.key_secret"))
    assert code == 1 and "n9.key_secret" in err and "no key file" in err


def test_sighup_lets_a_new_key_in_and_a_revoked_key_is_refused_and_its_node_fenced(keyed):
    assert cli("keys", str(keyed.keys), "--add", "n3", cwd=keyed.root).returncode == 0  # after the start
    code, err, _ = _exits(keyed.node(keyed.keys / "n3.key_secret"))
    assert code == 2 and "key not authorized" in err  # not read yet

    keyed.supervisor.send_signal(signal.SIGHUP)
    keyed.log.wait_for("added n3")
    assert keyed.supervisor.poll() is None  # a reload, not a stop
    node = keyed.node(keyed.keys / "n3.key_secret")
    wait_until(lambda: keyed.status_nodes() == {"n3"}, 30, interval=0.2)
    client = keyed.client(keyed.keys / "n2.key_secret")
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"go\n")
    client.stdin.flush()
    assert client.stdout.readline().split() == [b"ok", b"3"]  # a connected remote client

    (keyed.keys / "authorized" / "n3.key").unlink()
    (keyed.keys / "authorized" / "n2.key").unlink()
    revoked_at = time.monotonic()
    keyed.supervisor.send_signal(signal.SIGHUP)
    code, err, _ = _exits(node, 10)
    assert code == 2 and "the key of node 'n3' was revoked" in err
    assert time.monotonic() - revoked_at < 8
    keyed.log.wait_for("removed n2, n3")
    keyed.log.wait_for("the loss of node n3", 15)  # fenced like a lost node: after its lease
    assert keyed.status_nodes() == set()
    client.stdin.write(b"go\n")  # the same connection, made before the revocation
    client.stdin.flush()
    answer = client.stdout.readline().decode()
    assert answer.startswith("error KeyRefused") and "'n2' is no longer authorized" in answer, answer
    code, err, _ = _exits(keyed.node(keyed.keys / "n3.key_secret"))  # and on a new connection
    assert code == 2 and "key not authorized" in err


def test_a_remote_client_with_an_unauthorized_key_raises_key_refused_at_once(keyed):
    client = keyed.client(keyed.stranger("n2"))
    assert client.stdin is not None and client.stdout is not None
    t0 = time.monotonic()
    client.stdin.write(b"go\n")
    client.stdin.flush()
    answer = client.stdout.readline().decode()
    assert time.monotonic() - t0 < 5
    assert answer.startswith("error KeyRefused") and "key not authorized by the supervisor" in answer, answer
    assert keyed.address in answer

    env = keyed.env(CAPSULE_CONNECT=keyed.address, CAPSULE_KEYS=str(keyed.stranger("n2")))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "capsule_actors", "submit", "keyed_mod:app", "add", "[1, 2]", "--wait",
                        "--timeout", "3"], cwd=keyed.root, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t0 <= 5 and r.returncode == 1 and "KeyRefused" in r.stderr, r.stderr


def test_every_remote_wait_has_a_deadline(tmp_path):
    """Nobody listens on the endpoint: `submit --timeout 3` gives up within 5 s, and a plain
    submit() raises NotRunning naming the endpoint after $CAPSULE_REMOTE_TIMEOUT."""
    (tmp_path / "keyed_mod.py").write_text(MODULE)
    assert cli("keys", str(tmp_path / "keys"), cwd=tmp_path).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # closed again: nobody there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), CAPSULE_CONNECT=address,
               CAPSULE_KEYS=str(tmp_path / "keys"))
    for args in (["--wait", "--timeout", "3"], ["--timeout", "3"]):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "capsule_actors", "submit", "keyed_mod:app", "add", "[1, 2]", *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert time.monotonic() - t0 <= 5 and r.returncode == 1 and "--timeout 3 s passed" in r.stderr, r.stderr
    code = (
        "import keyed_mod\ntry:\n    keyed_mod.add.submit(1, 2)\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, CAPSULE_REMOTE_TIMEOUT="2"),
                       capture_output=True, text=True, timeout=30)
    assert 1.5 < time.monotonic() - t0 < 6
    assert r.stdout.startswith("NotRunning") and address in r.stdout and "CAPSULE_REMOTE_TIMEOUT" in r.stdout, r
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, CAPSULE_REMOTE_TIMEOUT="soon"),
                       capture_output=True, text=True, timeout=30)
    assert "CAPSULE_REMOTE_TIMEOUT='soon'" in r.stdout + r.stderr
