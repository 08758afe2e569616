"""The state directory on disk, the transport's access rules, header validation and durability."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sqlite3
import stat
import textwrap
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import spawn_cli, wait_running, wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.app import new_task_id
from capsule_actors.store import DB_FILE
from capsule_actors.transport import RUNTIME_FILE, read_runtime_file

app = cpsl.App("files-test", workers=1, process_workers=1)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def hold(release: str, cap: float = 60.0) -> str:
    """Runs until the file ``release`` exists (so a test decides when it ends, without sleeping)."""
    deadline = time.monotonic() + cap
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError("never released")
        await asyncio.sleep(0.02)
    return "released"


MODULE = textwrap.dedent('''
    import capsule_actors as cpsl

    app = cpsl.App("files-cli", workers=1, process_workers=1, grace=5.0)


    @app.task
    async def add(x, y):
        return x + y
''')


class WritesPidWhenUnpickled:
    """A payload that leaves the unpickling process's pid in a file (to see *who* unpickles)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"import os; open({self.path!r}, 'a').write(str(os.getpid()) + '\\n')"
        return (exec, (code,))




def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_only_db(state_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{state_dir / DB_FILE}?mode=ro", uri=True, timeout=5)


class RawDealer:
    """A bare ZeroMQ DEALER speaking the wire protocol by hand (always closed, linger 0)."""

    def __init__(self, address: str, server_public: str | None = None) -> None:
        self.others: list[messages.Reply] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        try:
            self.sock.linger = 0
            if server_public:
                public, secret = zmq.curve_keypair()
                self.sock.curve_serverkey = server_public.encode()
                self.sock.curve_publickey = public
                self.sock.curve_secretkey = secret
            self.sock.connect(address)
        except BaseException:
            self.__exit__()
            raise

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float) -> list[bytes] | None:
        if self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return self.sock.recv_multipart()
        return None

    def reply_to(self, req: int, timeout: float) -> tuple[messages.Reply, list[bytes]]:
        """The reply to request ``req``; other replies seen on the way are returned too."""
        deadline = time.monotonic() + timeout
        while True:
            frames = self.recv(max(0.0, deadline - time.monotonic()))
            if frames is None:
                pytest.fail(f"no reply to request {req} within {timeout} s")
            reply = messages.decode(frames[0])
            assert isinstance(reply, messages.Reply)
            self.others.append(reply)
            if reply.req == req:
                return reply, frames[1:]

    def __enter__(self) -> RawDealer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.mark.parametrize("existing_mode", [None, 0o755], ids=["created", "tightened-from-0755"])
def test_state_dir_is_private_and_holds_the_runtime_files(procs, tmp_path, state_dir, existing_mode):
    # Given a state directory that does not exist yet, or exists with mode 0755
    if existing_mode is not None:
        state_dir.mkdir()
        os.chmod(state_dir, existing_mode)
        assert mode(state_dir) == 0o755
    (tmp_path / "mod.py").write_text(MODULE)

    # When `capsule-actors run` starts on it
    run = spawn_cli(procs, "run", "mod:app", state_dir=state_dir, cwd=tmp_path)
    wait_running(state_dir)

    # Then the directory is 0700
    assert mode(state_dir) == 0o700

    # ... supervisor.json is 0600 and says how to reach the runtime
    runtime_file = state_dir / RUNTIME_FILE
    assert mode(runtime_file) == 0o600
    data = json.loads(runtime_file.read_text())
    assert data["pid"] == run.pid
    assert isinstance(data["started_at"], float) and time.time() - 120 < data["started_at"] <= time.time()
    assert data["client"] != data["actor"]
    for key in ("client", "actor"):
        address = data[key]
        assert address.startswith(f"ipc://{state_dir}/"), address
        sock_path = Path(address[len("ipc://"):])
        info = sock_path.stat()
        assert stat.S_ISSOCK(info.st_mode), sock_path
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, oct(info.st_mode)

    # ... and capsule.db is a SQLite database in WAL mode
    assert (state_dir / DB_FILE).is_file()
    db = read_only_db(state_dir)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] >= 1
    finally:
        db.close()


def test_long_state_dir_falls_back_to_loopback_tcp_with_curve(start, state_dir):
    # Given a state directory whose socket path would not fit in sun_path
    long_dir = state_dir.parent / ("long-" + "x" * 90) / "state"
    assert len(os.fsencode(str(long_dir / "client.sock"))) > 100

    # When a runtime starts there
    start(app, state_dir=long_dir)

    # Then it serves on loopback TCP with CURVE, announced in supervisor.json
    info = read_runtime_file(long_dir)
    assert info is not None
    assert info.client.startswith("tcp://127.0.0.1:"), info.client
    assert info.actor.startswith("tcp://127.0.0.1:"), info.actor
    assert info.server_public and len(info.server_public) == 40
    assert mode(long_dir) == 0o700 and mode(long_dir / RUNTIME_FILE) == 0o600

    # When a client without CURVE keys connects to that endpoint, then it gets no answer
    status = messages.Status(1).encode()
    with RawDealer(info.client) as plain:
        plain.send([status])
        assert plain.recv(timeout=1.0) is None

    # ... while the same request with the server's public key is answered (the request is valid)
    with RawDealer(info.client, info.server_public) as curve:
        curve.send([status])
        reply, _ = curve.reply_to(1, timeout=10)
        assert reply.ok and reply.body["supervisor"]["pid"] == info.pid

    # ... and a submit and its result go end to end (through the actors, also on tcp + CURVE)
    assert add.submit(2, 3).result(timeout=20) == 5
    assert add.map([(1, 1), (2, 2)])[1].result(timeout=20) == 4


def test_headers_are_validated_before_payloads(start, state_dir, tmp_path):
    rt = start(app)
    info = read_runtime_file(state_dir)
    assert info is not None and info.client.startswith("ipc://")
    marker = tmp_path / "unpickled-by"
    evil = pickle.dumps(WritesPidWhenUnpickled(marker), protocol=5)
    mismatched_id = new_task_id()
    submit_item = [mismatched_id, "add", None, None, None, None]
    submit_header = messages.Submit(2, [submit_item], [], False).encode()

    with RawDealer(info.client) as raw:
        # Given malformed messages sent straight to the client socket
        raw.send([b"\x00\xffnot msgpack at all\x93"])                      # garbage
        raw.send([b"\x00\xffnot msgpack at all\x93", evil])                # garbage header + payload
        raw.send([submit_header[: len(submit_header) // 2], evil])        # truncated msgpack header
        raw.send([msgpack.packb([99, 3]), evil])                          # unknown op code
        raw.send([msgpack.packb([1, "four", [submit_item]]), evil])      # Submit with a bad field type
        raw.send([messages.Reply(5, True, [1]).encode(), evil])          # not a client request
        raw.send([submit_header, evil, evil])                             # 1 item, 2 payload frames
        raw.send([submit_header])                                         # 1 item, no payload frame
        # When a valid request follows on the same socket, then it is answered: all of the above
        # were read and dropped, and the supervisor is still there
        raw.send([messages.Status(7).encode()])
        reply, _ = raw.reply_to(7, timeout=10)
        assert reply.ok and reply.body["supervisor"]["pid"] == rt.pid
        # ... nothing malformed was acknowledged
        assert not [r for r in raw.others if r.req != 7 and r.ok]

    # Then no payload of a rejected message was ever unpickled, and nothing was recorded
    assert not marker.exists()
    with pytest.raises(cpsl.UnknownTask):
        cpsl.TaskHandle(app, mismatched_id, "add").info()

    # ... and the runtime still serves a normal submit
    assert add.submit(20, 22).result(timeout=30) == 42


def test_a_request_from_another_version_gets_an_error_naming_the_versions(start, state_dir, tmp_path):
    start(app)
    info = read_runtime_file(state_dir)
    assert info is not None
    marker = tmp_path / "unpickled-by"
    evil = pickle.dumps(WritesPidWhenUnpickled(marker), protocol=5)
    task_id = new_task_id()
    # a Submit with a field this version does not know, and a Wait with one missing
    newer = msgpack.packb([messages.Submit.OP, 8, [[task_id, "add", None, None, None, None]], [], False, "extra"])
    older = msgpack.packb([messages.Wait.OP, 9])
    with RawDealer(info.client) as raw:
        raw.send([newer, evil])
        raw.send([older])
        for req in (8, 9):
            reply, _ = raw.reply_to(req, timeout=10)
            assert not reply.ok and reply.body[0] == "ProtocolError", reply
            assert "fields" in reply.body[1] and f"speaks protocol {messages.PROTOCOL}" in reply.body[1]
            assert f"capsule_actors {cpsl.__version__}" in reply.body[1]
    assert not marker.exists()  # refused on its header alone
    with pytest.raises(cpsl.UnknownTask):
        cpsl.TaskHandle(app, task_id, "add").info()
    assert add.submit(1, 2).result(timeout=30) == 3


def test_supervisor_never_unpickles_a_payload(start, state_dir, tmp_path):
    rt = start(app)
    info = read_runtime_file(state_dir)
    assert info is not None
    marker = tmp_path / "unpickled-by"
    garbage_id, evil_id = new_task_id(), new_task_id()

    # Given valid Submit headers whose payloads are garbage bytes, and a pickle with a side effect
    with RawDealer(info.client) as raw:
        raw.send([messages.Submit(1, [[garbage_id, "add", None, None, None, None]], [], False).encode(),
                  b"\x80\x05garbage, not a pickle\xff\x00"])
        raw.send([messages.Submit(2, [[evil_id, "add", None, None, None, None]], [], False).encode(),
                  pickle.dumps(WritesPidWhenUnpickled(marker), protocol=5)])
        # Then both are acknowledged (the supervisor treats payloads as opaque bytes)
        assert raw.reply_to(1, timeout=10)[0].ok
        assert raw.reply_to(2, timeout=10)[0].ok

    # ... each fails in the actor, and result() raises instead of hanging
    for task_id in (garbage_id, evil_id):
        handle = cpsl.TaskHandle(app, task_id, "add")
        with pytest.raises(Exception) as caught:
            handle.result(timeout=30)
        assert not isinstance(caught.value, TimeoutError), caught.value
        assert handle.info().state is cpsl.TaskState.FAILED

    # ... the payload was unpickled by the worker actor only, never by the supervisor
    status = rt.status()
    assert status["supervisor"]["pid"] == rt.pid
    worker_pids = {a["pid"] for a in status["actors"] if a["role"] == "worker"}
    unpicklers = {int(line) for line in marker.read_text().split()}
    assert rt.pid not in unpicklers
    assert unpicklers <= worker_pids, (unpicklers, worker_pids)

    # ... and the same supervisor keeps serving
    assert add.submit(1, 2).result(timeout=30) == 3
    assert rt.status()["supervisor"]["pid"] == rt.pid


def test_an_acknowledged_submit_is_already_in_the_database(start, state_dir, tmp_path):
    start(app)
    release = tmp_path / "release"
    db = read_only_db(state_dir)
    try:
        # When submit() returns, then the task's row is already committed
        h = hold.submit(str(release))
        row = db.execute("SELECT name, state FROM tasks WHERE id=?", (h.id,)).fetchone()
        assert row is not None and row[0] == "hold" and row[1] in ("QUEUED", "RUNNING")

        # ... and so is every task of a map() batch
        hs = add.map([(i, i) for i in range(25)])
        ids = [x.id for x in hs]
        found = {r[0] for r in db.execute(
            f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(ids))})", ids)}
        assert found == set(ids)

        assert [x.result(timeout=30) for x in hs] == [2 * i for i in range(25)]
        release.touch()
        assert h.result(timeout=30) == "released"
        wait_until(lambda: db.execute("SELECT state FROM tasks WHERE id=?", (h.id,)).fetchone()[0] == "SUCCEEDED",
                   timeout=10)
    finally:
        db.close()
