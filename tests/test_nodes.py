"""Worker nodes: `capsule-actors worker` processes that join a supervisor over TCP + CURVE.

Every node here is a real process tree (node, template, actors) on a loopback port. Links are cut
with a TCP relay in this process (a stalled relay is a partition: no bytes either way, no RST), and,
where the test may create them, with network namespaces whose veth link is set down.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import netns
import psutil
import pytest
import zmq
from conftest import ROOT, cli, kill_tree, skip_or_fail, spawn_cli, wait_running, wait_until

import capsule_actors as cpsl
from capsule_actors import messages
from capsule_actors.transport import NODE_PREFIX, RemoteEndpoint, connect

MODULE = '''
import asyncio, os, time, uuid
import capsule_actors as cpsl

app = cpsl.App("nodes", workers=1, process_workers=1, grace=5.0)

@app.task
async def where(delay=0.0):
    await asyncio.sleep(delay)
    return os.environ.get("CAPSULE_NODE")

@app.task(process=True)
def where_isolated(delay=0.0):
    time.sleep(delay)
    return os.environ.get("CAPSULE_NODE")

@app.task(lock="key:{key}", on_conflict="queue", retries=3)
def hold(key, seconds, log):
    """Writes a line every 20 ms while it runs: two runs of one key at once would interleave."""
    run, end = uuid.uuid4().hex, time.time() + seconds
    with open(log, "a") as fh:
        while True:
            fh.write(f"{key} {run} {os.environ.get('CAPSULE_NODE')} {time.time()}\\n")
            fh.flush()
            if time.time() >= end:
                return os.environ.get("CAPSULE_NODE")
            time.sleep(0.02)
'''

MODULE += '''
@app.task
def count(session):
    time.sleep(0.2)
    value = session.db.increment("n")
    session.db["last"] = os.environ.get("CAPSULE_NODE") or "local"
    assert session.db["last"] in ("local", "n1", "n2") and "n" in session.db and len(session.db) == 2
    return value, os.environ.get("CAPSULE_NODE")
'''

MODULE += '''
@app.task
def fan_out(n):
    time.sleep(0.2)
    hs = where.map([0.0] * n)  # a task on a node submits through the node's key, like any client
    return os.environ.get("CAPSULE_NODE"), cpsl.wait_all(hs, timeout=30)
'''

MODULE += '''
@app.task
async def shout(word):
    import logging
    await asyncio.sleep(0.3)
    logging.getLogger("nodes.app").warning("%s from %s", word, os.environ.get("CAPSULE_NODE") or "local")
    return os.environ.get("CAPSULE_NODE")
'''

OTHER_VERSION = MODULE + '''
@app.task
def added_later():
    return 1
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A supervisor bound on loopback TCP, and the worker nodes a test starts."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], root: Path, state_dir: Path, mod: Any) -> None:
        self.procs, self.root, self.state_dir, self.mod = procs, root, state_dir, mod
        self.keys = root / "keys"
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def start_supervisor(self) -> subprocess.Popen[bytes]:
        self.supervisor = spawn_cli(self.procs, "run", "nodes_mod:app", "--bind", self.address, "--keys",
                                    str(self.keys), state_dir=self.state_dir, cwd=self.root)
        wait_running(self.state_dir)
        return self.supervisor

    def start_node(self, name: str, *, workers: int = 1, process_workers: int = 0, connect: str | None = None,
                   key: str | None = None, module: str = "nodes_mod", prefix: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.root), str(ROOT)]))
        cmd = [*prefix, sys.executable, "-m", "capsule_actors", "worker", f"{module}:app", "--connect",
               connect or self.address, "--key", str(self.keys / f"{key or name}.key_secret"), "--name", name,
               "--workers", str(workers), "--process-workers", str(process_workers), "--grace", "5", *extra]
        proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        self.nodes[name] = proc
        return proc

    def status(self) -> dict[str, Any]:
        body, _ = self.mod.app.client().call(lambda req: messages.Status(req), timeout=10)
        return dict(body)

    def wait_nodes(self, *names: str, timeout: float = 60.0) -> dict[str, Any]:
        """Until exactly these nodes are connected and all their actors are ready."""
        def joined() -> dict[str, Any] | None:
            status = self.status()
            connected = {n["name"] for n in status["nodes"] if n["state"] == "connected"}
            ready = all(a["state"] == "ready" for a in status["actors"] if a["node"] in names)
            return status if connected == set(names) and ready else None
        return wait_until(joined, timeout, interval=0.1)  # type: ignore[no-any-return]


@pytest.fixture
def cluster(procs, state_dir, tmp_path, monkeypatch) -> Iterator[Cluster]:
    (tmp_path / "nodes_mod.py").write_text(MODULE)
    (tmp_path / "other_mod.py").write_text(OTHER_VERSION)
    assert cli("keys", str(tmp_path / "keys"), cwd=tmp_path).returncode == 0
    for name in ("n1", "n2", "n3"):
        r = cli("keys", str(tmp_path / "keys"), "--add", name, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    monkeypatch.setenv("CAPSULE_STATE_DIR", str(state_dir))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nodes_mod", None)
    mod = importlib.import_module("nodes_mod")
    try:
        yield Cluster(procs, tmp_path, state_dir, mod)
    finally:
        sys.modules.pop("nodes_mod", None)


def _runs(log: Path) -> dict[str, list[tuple[float, float, str]]]:
    """key -> [(first line time, last line time, node)] per run, from a `hold` log."""
    spans: dict[tuple[str, str], list[Any]] = {}
    for line in log.read_text().splitlines():
        key, run, node, t = line.split()
        span = spans.setdefault((key, run), [float(t), float(t), node])
        span[1] = float(t)
    runs: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for (key, _run), (first, last, node) in spans.items():
        runs[key].append((first, last, node))
    return {key: sorted(spans) for key, spans in runs.items()}


def _assert_never_twice_at_once(log: Path) -> dict[str, list[tuple[float, float, str]]]:
    runs = _runs(log)
    for key, spans in runs.items():
        for (_f1, last, node1), (first, _l2, node2) in itertools.pairwise(spans):
            assert first > last, f"{key}: a run on {node2} started at {first} while one on {node1} ran until {last}"
    return runs


def _gone(pids: list[int]) -> bool:
    def alive(pid: int) -> bool:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return False
    return not any(alive(pid) for pid in pids)


def _node_actor_pids(status: dict[str, Any], node: str) -> list[int]:
    return [a["pid"] for a in status["actors"] if a["node"] == node and a["pid"]]


def _descendants(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


# ---- joining, running, status -----------------------------------------------------------------
def test_nodes_join_run_both_kinds_of_tasks_and_show_in_status(cluster):
    cluster.start_supervisor()
    cluster.start_node("n1", workers=1, process_workers=1)
    cluster.start_node("n2", workers=1, process_workers=1)
    status = cluster.wait_nodes("n1", "n2")

    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["n1"]["slots"] == ["n1:w0", "n1:p0"] and nodes["n2"]["slots"] == ["n2:w0", "n2:p0"]
    node_pids = {n: cluster.nodes[n].pid for n in ("n1", "n2")}
    assert {nodes[n]["pid"] for n in nodes} == set(node_pids.values())
    remote = {a["slot"]: a for a in status["actors"] if a["node"]}
    assert set(remote) == {"n1:w0", "n1:p0", "n2:w0", "n2:p0"}
    for slot, actor in remote.items():  # a node's actors are its own descendants
        assert actor["pid"] in _descendants(node_pids[actor["node"]]), slot
    wait_until(lambda: all(a["rss"] for a in cluster.status()["actors"] if a["node"]), 10)  # reported by the node

    # work spreads over this host's actors and both nodes', for both pools
    where, isolated = cluster.mod.where, cluster.mod.where_isolated
    handles = [where.submit(0.3) for _ in range(30)] + [isolated.submit(0.3) for _ in range(9)]
    results = [h.result(timeout=60) for h in handles]
    assert set(results[:30]) == {None, "n1", "n2"}
    assert set(results[30:]) == {None, "n1", "n2"}
    slots = {h.info().slot for h in handles}
    assert {"w0", "p0", "n1:w0", "n1:p0", "n2:w0", "n2:p0"} <= slots

    # locked tasks are admitted by, and run on, the key's owner, which may be a node's actor
    locked = [cluster.mod.hold.submit(f"s{i}", 0.05, str(cluster.root / "hold.log")) for i in range(24)]
    assert {h.result(timeout=60) for h in locked} == {None, "n1", "n2"}
    tasks = json.loads(cli("tasks", "--json", "--limit", "24", state_dir=cluster.state_dir, cwd=cluster.root).stdout)
    assert all(t["owner"] == t["slot"] for t in tasks) and {t["owner"] for t in tasks} == {"w0", "n1:w0", "n2:w0"}
    # session.db on a node goes through the supervisor; concurrent increments from this host's
    # actors and both nodes' lose nothing, and each task sees the value its increment made
    counted = [cluster.mod.count.submit(session=cpsl.Session("s1")) for _ in range(30)]
    values = [h.result(timeout=60) for h in counted]
    assert sorted(v for v, _ in values) == list(range(1, 31))
    assert {node for _, node in values} == {None, "n1", "n2"}
    fanned = [h.result(timeout=60) for h in [cluster.mod.fan_out.submit(5) for _ in range(12)]]
    assert {node for node, _ in fanned} == {None, "n1", "n2"} and all(len(r) == 5 for _, r in fanned)
    db = cluster.mod.app.session("s1").db
    assert db["n"] == 30 and db["last"] in ("local", "n1", "n2")
    out = cli("status", state_dir=cluster.state_dir, cwd=cluster.root)
    assert out.returncode == 0, out.stderr
    assert "NODE" in out.stdout and "n1:w0 n1:p0" in out.stdout and "connected" in out.stdout


def test_a_killed_node_loses_its_attempts_with_worker_crashed_and_they_run_elsewhere(cluster, tmp_path):
    cluster.start_supervisor()
    node = cluster.start_node("n1", workers=1)
    cluster.wait_nodes("n1")
    actors = _descendants(node.pid)
    log = tmp_path / "hold.log"
    # keys whose owner is the node's actor run there; find some by submitting a few
    handles = [cluster.mod.hold.submit(f"k{i}", 2.0, str(log)) for i in range(12)]
    on_node = wait_until(lambda: [h for h in handles if (h.info().slot or "").startswith("n1:")], 20)
    killed_at = time.time()
    os.kill(node.pid, signal.SIGKILL)
    for h in handles:
        assert h.result(timeout=90) is None  # every run finished on this host's worker
    for h in on_node:
        info = h.info()
        assert info.attempts >= 2 and info.slot == "w0"
        errors = [e.data["error"] for e in h.events() if e.kind == "state" and "error" in e.data]
        assert errors[0].startswith("WorkerCrashed") and "the loss of node n1" in errors[0]
    runs = _assert_never_twice_at_once(log)
    for h in on_node:  # the retry started only once the node's lease had run out
        key = h.info().lock_key.split(":", 1)[1]
        retry = [s for s in runs[key] if s[2] == "None"]
        assert retry and retry[0][0] > killed_at + 3.0  # past the lease
    wait_until(lambda: _gone(actors), 10)
    status = cluster.status()
    assert status["nodes"] == [] and not any(a["node"] for a in status["actors"])


def test_a_node_actor_that_dies_is_replaced_on_its_node_and_hard_cancel_goes_through_the_node(cluster):
    cluster.start_supervisor()
    node = cluster.start_node("n1", workers=1, process_workers=1)
    status = cluster.wait_nodes("n1")
    first = {a["slot"]: a["pid"] for a in status["actors"] if a["node"] == "n1"}

    # an actor of the node killed under its tasks: WorkerCrashed, and a new one forked on the node
    handles = [cluster.mod.where.submit(2.0) for _ in range(6)]
    on_node = wait_until(lambda: [h for h in handles if h.info().slot == "n1:w0"], 20)
    os.kill(first["n1:w0"], signal.SIGKILL)
    for h in on_node:
        with pytest.raises(cpsl.WorkerCrashed, match="n1:w0"):
            h.result(timeout=30)

    def replaced() -> dict[str, Any] | None:
        actor = next(a for a in cluster.status()["actors"] if a["slot"] == "n1:w0")
        return actor if actor["state"] == "ready" and actor["pid"] != first["n1:w0"] else None
    actor = wait_until(replaced, 30)
    assert actor["restarts"] == 1 and "SIGKILL" in actor["last_exit"]
    assert actor["pid"] in _descendants(node.pid)

    # cancelling a process=True task on the node kills its actor there (SIGTERM via the node)
    slow = [cluster.mod.where_isolated.submit(30.0) for _ in range(2)]
    running = wait_until(lambda: [h for h in slow if h.info().slot == "n1:p0" and h.status().name == "RUNNING"], 20)
    assert running[0].cancel()
    with pytest.raises(cpsl.TaskCancelled):
        running[0].result(timeout=30)
    wait_until(lambda: _gone([first["n1:p0"]]), 15)
    wait_until(lambda: next(a for a in cluster.status()["actors"] if a["slot"] == "n1:p0")["state"] == "ready", 30)
    for h in slow:
        h.cancel()


def test_a_node_whose_template_dies_forks_its_actors_again(cluster):
    cluster.start_supervisor()
    node = cluster.start_node("n1", workers=1, process_workers=1)
    before = {a["slot"]: a["pid"] for a in cluster.wait_nodes("n1")["actors"] if a["node"]}
    template = next(p for p in psutil.Process(node.pid).children() if p.pid not in before.values())
    template.kill()  # its actors die with it (parent-death signal)
    wait_until(lambda: _gone(list(before.values())), 15)

    def back() -> dict[str, Any] | None:
        status = cluster.status()
        now = {a["slot"]: a for a in status["actors"] if a["node"] == "n1"}
        fresh = all(a["state"] == "ready" and a["pid"] not in before.values() for a in now.values())
        return status if len(now) == 2 and fresh else None
    wait_until(back, 30)
    assert node.poll() is None
    assert "n1" in {h.result(timeout=30) for h in [cluster.mod.where.submit(0.3) for _ in range(8)]}


def test_losing_this_hosts_template_and_actors_leaves_the_nodes_actors_alone(cluster):
    sup = cluster.start_supervisor()
    cluster.start_node("n1", workers=1)
    cluster.wait_nodes("n1")
    (template,) = psutil.Process(sup.pid).children()  # forks every local actor
    handles = [cluster.mod.where.submit(1.0) for _ in range(8)]
    on_node = wait_until(lambda: [h for h in handles if h.info().slot == "n1:w0"], 20)
    template.kill()
    for h in on_node:  # not crashed: they ran to the end, once
        assert h.result(timeout=30) == "n1" and h.info().attempts == 1
    wait_until(lambda: all(a["state"] == "ready" for a in cluster.status()["actors"]), 30)


# ---- a cut link --------------------------------------------------------------------------------
class Relay:
    """A TCP relay in a thread; ``cut()`` stalls every connection (a partition: nothing flows, no
    FIN, no RST) and refuses new ones until ``mend()``, which closes the stalled ones."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.stalled = False
        self.running = True
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            with self.lock:
                watched = [self.listener] + ([] if self.stalled else list(self.pairs))
            ready, _, _ = select.select(watched, [], [], 0.05)
            for sock in ready:
                with self.lock:
                    if sock is self.listener:
                        conn, _ = sock.accept()
                        if self.stalled:
                            conn.close()
                            continue
                        upstream = socket.create_connection(self.target)
                        self.pairs[conn], self.pairs[upstream] = upstream, conn
                        continue
                    if self.stalled or sock not in self.pairs:
                        continue
                    try:
                        data = sock.recv(65536)
                        if data:
                            self.pairs[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        other = self.pairs.pop(sock, None)
        if other is not None:
            self.pairs.pop(other, None)
            other.close()
        sock.close()

    def cut(self) -> None:
        with self.lock:
            self.stalled = True

    def mend(self) -> None:
        with self.lock:
            for sock in list(self.pairs):
                if sock in self.pairs:
                    self._drop(sock)
            self.stalled = False

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        with self.lock:
            for sock in list(self.pairs):
                if sock in self.pairs:
                    self._drop(sock)
        self.listener.close()


def test_a_cut_link_fences_the_node_and_no_key_ever_runs_twice_at_once(cluster, tmp_path):
    cluster.start_supervisor()
    relay = Relay(cluster.port)
    try:
        node = cluster.start_node("n1", workers=1, connect=relay.address)
        actor_pids = _node_actor_pids(cluster.wait_nodes("n1"), "n1")
        log = tmp_path / "hold.log"
        hold = cluster.mod.hold
        handles = [hold.submit(f"c{i}", 3.0, str(log)) for i in range(10)]
        on_node = wait_until(lambda: [h for h in handles if (h.info().slot or "").startswith("n1:")], 20)
        relay.cut()
        cut_at = time.time()
        # the node's actors die (the lease ran out) while the node process lives on
        wait_until(lambda: _gone(actor_pids), 15)
        assert time.time() - cut_at < 5.0 and node.poll() is None
        # a duplicate submitted during the partition queues behind the holder: never a second run
        dup = hold.submit(on_node[0].info().lock_key.split(":", 1)[1], 0.1, str(log))
        for h in handles:
            assert h.result(timeout=90) is None
        assert dup.result(timeout=60) is None
        runs = _assert_never_twice_at_once(log)
        for h in on_node:
            key = h.info().lock_key.split(":", 1)[1]
            node_runs = [s for s in runs[key] if s[2] == "n1"]
            assert node_runs and node_runs[0][1] < cut_at + 3.5  # fenced within the lease
            assert h.info().attempts >= 2
        # mended: the node joins again as a new incarnation, and takes work
        relay.mend()
        cluster.wait_nodes("n1", timeout=60)
        assert "n1" in {h.result(timeout=30) for h in [cluster.mod.where.submit(0.3) for _ in range(12)]}
    finally:
        relay.close()


# ---- leaving, refusing --------------------------------------------------------------------------
def test_sigterm_on_a_node_lets_its_tasks_finish_and_it_leaves(cluster):
    cluster.start_supervisor()
    node = cluster.start_node("n1", workers=1, process_workers=1)
    cluster.wait_nodes("n1")
    handles = [cluster.mod.where_isolated.submit(1.5) for _ in range(4)]
    running = wait_until(lambda: [h for h in handles if h.info().slot == "n1:p0" and h.status().name == "RUNNING"], 20)
    node.send_signal(signal.SIGTERM)
    assert node.wait(30) == 0
    assert running[0].result(timeout=30) == "n1" and running[0].info().attempts == 1  # not a crash
    assert [h.result(timeout=60) for h in handles].count("n1") >= 1
    status = cluster.wait_nodes()
    assert not any(a["node"] for a in status["actors"])


def test_a_node_with_other_code_a_taken_name_or_an_unknown_key_is_refused(cluster, tmp_path):
    cluster.start_supervisor()
    other = cluster.start_node("n2", module="other_mod")
    assert other.wait(60) == 2
    assert b"added_later" in other.stderr.read()  # says which tasks differ

    cluster.start_node("n1")
    cluster.wait_nodes("n1")
    twin = cluster.start_node("n1")  # a second process with n1's key, calling itself n1
    assert twin.wait(60) == 2
    assert b"already connected" in twin.stderr.read()

    stranger_keys = tmp_path / "stranger"
    assert cli("keys", str(stranger_keys), cwd=tmp_path).returncode == 0
    (cluster.keys / "x.key_secret").write_bytes((stranger_keys / "client.key_secret").read_bytes())
    stranger = cluster.start_node("x", key="x")  # a key the supervisor never authorized: refused, exits
    assert stranger.wait(30) == 2
    assert b"key not authorized by the supervisor" in stranger.stderr.read()
    assert {n["name"] for n in cluster.status()["nodes"]} == {"n1"}

    bad = cli("worker", "nodes_mod:app", "--connect", cluster.address, "--key", str(cluster.keys / "n1.key_secret"),
              "--name", "no spaces", cwd=cluster.root)
    assert bad.returncode == 1 and "node name 'no spaces'" in bad.stderr
    assert cluster.supervisor.poll() is None and cluster.mod.where.submit().result(timeout=30) in (None, "n1")


def test_a_node_of_another_protocol_version_is_refused_at_its_hello_and_told_why(cluster):
    cluster.start_supervisor()
    keys = RemoteEndpoint.with_keys(cluster.address, cluster.keys / "n1.key_secret")
    ctx = zmq.Context()

    def hello(fields: list[Any]) -> messages.Message:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = NODE_PREFIX + f"n1/{os.getpid()}{len(fields)}".encode()
        connect(sock, keys.address, keys.server_public, (keys.client_public, keys.client_secret))
        try:
            sock.send(msgpack.packb([messages.NodeHello.OP, *fields]))
            assert sock.poll(20_000), "no answer to the hello"
            return messages.decode(sock.recv_multipart()[0])
        finally:
            sock.close(0)

    try:
        fields = ["n1", cluster.mod.app.name, sorted(cluster.mod.app.tasks), 1, 0, "elsewhere", 4242]
        before = hello(fields)  # a node from before the protocol field: its hello has one field less
        older = hello([*fields, messages.PROTOCOL - 1])
    finally:
        ctx.term()
    for refused, theirs in ((before, "another version"), (older, f"protocol {messages.PROTOCOL - 1}")):
        assert isinstance(refused, messages.NodeRefused) and refused.fatal, refused
        assert theirs in refused.reason and f"speaks protocol {messages.PROTOCOL}" in refused.reason
        assert "install the same capsule_actors version" in refused.reason
    assert cluster.status()["nodes"] == []  # neither joined
    cluster.start_node("n1")  # this version's node joins, and the supervisor serves
    cluster.wait_nodes("n1")
    assert cluster.mod.where.submit().result(timeout=30) in (None, "n1")


# ---- key ownership moving -----------------------------------------------------------------------
def test_key_ownership_moves_as_nodes_join_and_leave_without_overlap(cluster, tmp_path):
    cluster.start_supervisor()
    log = tmp_path / "hold.log"
    hold = cluster.mod.hold
    handles = [hold.submit(f"m{i % 12}", 0.25, str(log)) for i in range(36)]  # 3 queued per key
    n1 = cluster.start_node("n1", workers=1)
    cluster.wait_nodes("n1")
    handles += [hold.submit(f"m{i % 12}", 0.25, str(log)) for i in range(24)]
    cluster.start_node("n2", workers=1)
    cluster.wait_nodes("n1", "n2")
    handles += [hold.submit(f"m{i % 12}", 0.25, str(log)) for i in range(24)]
    n1.send_signal(signal.SIGTERM)  # leaves gracefully: its keys move to the rest
    handles += [hold.submit(f"m{i % 12}", 0.25, str(log)) for i in range(24)]
    assert n1.wait(60) == 0
    handles += [hold.submit(f"m{i % 12}", 0.25, str(log)) for i in range(12)]
    results = [h.result(timeout=120) for h in handles]
    assert len(results) == 120 and {"n1", "n2"} & set(results)
    runs = _assert_never_twice_at_once(log)
    assert sum(len(spans) for spans in runs.values()) >= 120
    owners = {a["slot"] for a in cluster.status()["actors"]}
    assert not any(s.startswith("n1:") for s in owners)


# ---- the supervisor restarting under its nodes -------------------------------------------------
def test_nodes_rejoin_a_restarted_supervisor_and_its_running_tasks_rerun_after_the_lease(cluster, tmp_path):
    sup = cluster.start_supervisor()
    cluster.start_node("n1", workers=1)
    cluster.wait_nodes("n1")
    log = tmp_path / "hold.log"
    handles = [cluster.mod.hold.submit(f"r{i}", 2.0, str(log)) for i in range(8)]
    on_node = wait_until(lambda: [h for h in handles if (h.info().slot or "").startswith("n1:")], 20)
    ids = [h.id for h in on_node]
    kill_tree(sup.pid)  # the supervisor and its local actors, not the node
    sup.wait(10)
    killed_at = time.time()
    cluster.start_supervisor()
    cluster.wait_nodes("n1", timeout=60)
    for h in handles:
        assert h.result(timeout=90) in (None, "n1")
    runs = _assert_never_twice_at_once(log)
    for task_id in ids:
        info = next(h for h in handles if h.id == task_id).info()
        key = info.lock_key.split(":", 1)[1]
        assert len(runs[key]) == 2 and runs[key][1][0] > killed_at + 3.0  # re-run after the lease


# ---- a real partition: network namespaces --------------------------------------------------------
def test_a_node_in_its_own_network_namespace_is_fenced_when_its_link_goes_down(cluster, tmp_path):
    if not netns.available():
        skip_or_fail("a network namespace needs root and `ip netns` (CI runs as root)")
    with netns.namespace(f"a{os.getpid() % 10}") as (ns, host_if, host_ip):
        cluster.address = f"tcp://{host_ip}:{cluster.port}"
        cluster.start_supervisor()
        node = cluster.start_node("n1", workers=1, prefix=("ip", "netns", "exec", ns))
        cluster.wait_nodes("n1")
        log = tmp_path / "hold.log"
        handles = [cluster.mod.hold.submit(f"ns{i}", 3.0, str(log)) for i in range(10)]
        on_node = wait_until(lambda: [h for h in handles if (h.info().slot or "").startswith("n1:")], 20)
        subprocess.run(["ip", "link", "set", host_if, "down"], check=True, timeout=10)
        cut_at = time.time()
        for h in handles:
            assert h.result(timeout=90) is None
        runs = _assert_never_twice_at_once(log)
        for h in on_node:
            key = h.info().lock_key.split(":", 1)[1]
            assert next(s for s in runs[key] if s[2] == "n1")[1] < cut_at + 3.5
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True, timeout=10)
        cluster.wait_nodes("n1", timeout=60)
        assert node.poll() is None


def test_a_node_with_log_format_json_logs_json_lines_with_the_task(cluster):
    """`worker --log-format json`: the node and its actors write one JSON object per line, and a
    task's own log line carries its id, name and attempt."""
    cluster.start_supervisor()
    node = cluster.start_node("n1", workers=1, extra=("--log-format", "json"))
    cluster.wait_nodes("n1")
    handles = [cluster.mod.shout.submit(f"hello {i}") for i in range(8)]
    on_node = {h.id for h, where in zip(handles, [h.result(timeout=60) for h in handles]) if where == "n1"}
    assert on_node
    node.send_signal(signal.SIGTERM)
    _, err = node.communicate(timeout=60)
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    said = [line for line in lines if line["logger"] == "nodes.app"]
    assert {line["task_id"] for line in said} == on_node
    assert all(line["task_name"] == "shout" and line["attempt"] == 1 and line["actor"] == "n1:w0" for line in said)
