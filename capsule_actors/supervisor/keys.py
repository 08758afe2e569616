"""Lock keys on the supervisor's side: each key has one owner actor (a hash over its pool,
``router.py``) that admits submits of that key; this sends the admissions, applies the
decisions, and moves ownership when the pools change (worker nodes join or leave)."""

from __future__ import annotations

import collections
import itertools
import logging
from typing import TYPE_CHECKING, Any

from .. import messages
from .children import ROLE_CLOCK, ActorProcess
from .live import LiveTask, PendingSubmit

if TYPE_CHECKING:
    from .core import Supervisor

log = logging.getLogger("capsule_actors.supervisor")


class KeyRouting:
    """Admissions and re-keying; the key tables themselves live in the owner actors."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.admissions: dict[str, tuple[PendingSubmit, int, tuple[Any, ...]]] = {}  # task id -> its submit
        self.pending_admits: dict[str, list[list[str]]] = {}  # slot -> admissions waiting for its actor
        self.rekeying = False  # the pools changed: admissions wait until every owner has the new keys
        self.held_admits: list[list[str]] = []  # admissions that came during a re-keying

    def admit(self, item: list[str]) -> None:
        """Ask the key's owner actor to decide ``[task_id, key, policy]``; hold the request while
        that actor is down, or while the pools are being re-keyed."""
        sup = self.sup
        entry = self.admissions.get(item[0])
        if entry is None:
            return  # decided already
        if self.rekeying:
            self.held_admits.append(item)
            return
        slot = sup.owner_of(entry[2][1], item[1])
        proc = sup.procs.get(slot)
        if proc is None or not proc.ready:
            self.pending_admits.setdefault(slot, []).append(item)
            return
        proc.admitting[item[0]] = item
        sup.send_actor(proc, messages.Admit([item]).encode())

    def on_admitted(self, proc: ActorProcess, msg: messages.Admitted) -> None:
        sup = self.sup
        for task_id, verdict, holder in msg.decisions:
            if proc.admitting.pop(task_id, None) is None:
                continue
            entry = self.admissions.pop(task_id, None)
            if entry is None:
                continue
            pending, i, row = entry
            if verdict in ("run", "queue"):
                sup.intake.record([row], proc.spec.slot, verdict == "queue")
            else:
                pending.results[i] = [holder, verdict == "join", verdict == "reject"]
            pending.remaining -= 1
            if not pending.remaining:
                sup.intake.complete(pending)

    def on_promote(self, msg: messages.Promote) -> None:
        for task_id in msg.task_ids:
            task = self.sup.live.get(task_id)
            if task is not None and task.blocked:
                task.blocked = False
                self.sup.queue(task, task.run_at)

    def release(self, task: LiveTask) -> None:
        """Tell the key's owner that ``task`` is over (a restarting owner rebuilds from the store)."""
        proc = self.sup.procs.get(task.owner or "")
        if task.lock_key is not None and proc is not None and proc.ready:
            self.sup.send_actor(proc, messages.Release(task.id, task.lock_key).encode())

    def key_rows(self) -> dict[str, list[list[Any]]]:
        """slot -> the live keys it owns: ``[key, [holder, *queued]]``, from the store, after the
        cancelled or timed-out attempts whose bodies still run (they hold their keys until then)."""
        sup = self.sup
        keys: dict[str, dict[str, list[str]]] = {}
        for task in sup.abandoned_keys.values():
            assert task.lock_key is not None
            keys.setdefault(sup.owner_of(task.name, task.lock_key), {}).setdefault(task.lock_key, []).append(task.id)
        for task_id, name, key in sup.store.live_locked():
            if name in sup.app.tasks:
                keys.setdefault(sup.owner_of(name, key), {}).setdefault(key, []).append(task_id)
        return {slot: [[k, ids] for k, ids in by_key.items()] for slot, by_key in keys.items()}

    def pools_changed(self) -> None:
        """Recompute the pools from the live slots; if they changed, move key ownership.

        A key's owner is a hash over its pool, so a node joining or leaving moves some keys. To
        move them without a window where two owners could both admit one key: new admissions are
        held, the outstanding ones are answered (or die with their actor), and only then every
        owner rebuilds its table from the store (``Rekey``) -- the same rebuild a restarted owner
        does -- and the held admissions go to the new owners."""
        sup = self.sup
        specs = [s for s in sup.all_specs() if s.node is None or not sup.node_link.leaving(s.node)]
        pools = {role: [s.slot for s in specs if s.role == role] for role in sup.ready}
        if pools == sup.pools:
            return
        sup.pools = pools
        self.rekeying = True
        self.finish_rekey()

    def finish_rekey(self) -> None:
        sup = self.sup
        if any(proc.admitting for proc in sup.procs.values()):
            return  # wait for the answers: they were decided under the old owners
        self.rekeying = False
        held = [item for items in self.pending_admits.values() for item in items] + self.held_admits
        self.held_admits = []
        queued = [task_id for queue in sup.slot_ready.values() for task_id in queue]
        slots = {s.slot for s in sup.all_specs()}
        self.pending_admits = {slot: [] for slot in slots}
        sup.slot_ready = {slot: collections.deque() for slot in slots}
        for task in itertools.chain(sup.live.values(), sup.abandoned_keys.values()):
            if task.lock_key is not None:
                task.owner = sup.owner_of(task.name, task.lock_key)
        for task_id in queued:
            moved = sup.live.get(task_id)
            if moved is not None and moved.owner is not None:
                sup.slot_ready[moved.owner].append(task_id)
        rows = self.key_rows()
        for proc in sup.procs.values():
            if proc.ready and proc.spec.role != ROLE_CLOCK:
                sup.send_actor(proc, messages.Rekey(rows.get(proc.spec.slot, [])).encode())
        for item in held:
            self.admit(item)
        log.info("pools now: %s", {role: len(slots) for role, slots in sup.pools.items()})
