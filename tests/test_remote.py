"""`run --bind tcp://` with CURVE: keys from `capsule-actors keys`, and nobody else gets in."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import zmq
import zmq.auth
from conftest import ROOT, cli, spawn_cli, wait_running

from capsule_actors import messages

MODULE = '''
import capsule_actors as cpsl
app = cpsl.App("remote", workers=1, process_workers=1)

@app.task
async def add(x, y):
    return x + y
'''

CLIENT = '''
import remote_mod
print(remote_mod.add.submit(20, 22).result(timeout=30))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bind_needs_keys_and_only_authorized_clients_get_in(procs, state_dir, tmp_path):
    (tmp_path / "remote_mod.py").write_text(MODULE)
    (tmp_path / "client.py").write_text(CLIENT)
    address = f"tcp://127.0.0.1:{_free_port()}"
    keys = tmp_path / "keys"

    # Without keys, `run --bind` refuses and says how to make them
    r = cli("run", "remote_mod:app", "--bind", address, "--keys", str(keys), state_dir=state_dir, cwd=tmp_path)
    assert r.returncode != 0 and "capsule-actors keys" in r.stderr

    # `keys DIR` makes a private directory with the server's and a client's key pairs
    r = cli("keys", str(keys), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert {p.name for p in keys.iterdir()} >= {"server.key", "server.key_secret", "client.key",
                                                  "client.key_secret", "authorized"}
    assert cli("keys", str(keys), cwd=tmp_path).returncode != 0  # never overwrites keys

    spawn_cli(procs, "run", "remote_mod:app", "--bind", address, "--keys", str(keys),
              state_dir=state_dir, cwd=tmp_path)
    wait_running(state_dir)

    # A client with the keys submits over TCP (no state directory needed)
    env = dict(os.environ, CAPSULE_CONNECT=address, CAPSULE_KEYS=str(keys),
               CAPSULE_STATE_DIR=str(tmp_path / "nowhere"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    done = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr

    # A client without keys, or with a key pair the supervisor does not know, gets no answer
    ctx = zmq.Context()
    try:
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        for curve in (False, True):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            try:
                if curve:
                    public, secret = zmq.curve_keypair()
                    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
                sock.connect(address)
                sock.send_multipart([messages.Status(1).encode()])
                assert not sock.poll(1000), "an unauthorized client got a reply"
            finally:
                sock.close(0)
    finally:
        ctx.term()
    # ... and the authorized client still does
    again = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.stdout.strip() == "42", again.stderr
    assert Path(keys / "authorized" / "client.key").exists()
