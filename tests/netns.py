"""Network namespaces for partition tests: a namespace joined to this one by a veth pair, whose
host-side link a test takes down to cut whatever runs inside off (root and `ip netns` needed)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from conftest import kill_tree


def available() -> bool:
    if os.geteuid() != 0 or (not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists()):
        return False
    name = f"cpsl-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return ok


@contextlib.contextmanager
def namespace(tag: str, subnet: str = "") -> Iterator[tuple[str, str, str]]:
    """A namespace joined to this one by a veth pair: (netns name, host-side link, host address)."""
    ns, host_if, ns_if = f"cpsl-{tag}", f"cph{tag}", f"cpn{tag}"
    octet = 100 + os.getpid() % 100
    third = subnet or tag[-1]
    host_ip, ns_ip = f"10.{octet}.{third}.1", f"10.{octet}.{third}.2"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", ns],
             ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if],
             ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        yield ns, host_if, host_ip
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            kill_tree(int(pid))
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
