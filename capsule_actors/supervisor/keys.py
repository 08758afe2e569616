"""Lock keys on the supervisor's side: each key has one owner actor (a hash over its pool,
``router.py``) that admits submits of that key; this sends the admissions, hands back the
decisions, and moves ownership when the pools change (worker nodes join or leave)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import messages
from .router import owner
from .specs import ROLE_CLOCK, ROLE_PROCESS, ROLE_WORKER, ActorProcess

if TYPE_CHECKING:
    from ..app import App
    from ..store import TaskStore
    from .children import Children
    from .outbox import Outbox
    from .tasks import LiveTask, TaskTable

log = logging.getLogger("capsule_actors.supervisor")


class Decision(NamedTuple):
    """An owner's answer to one admission: ``verdict`` is run, queue, join or reject; ``holder``
    the live task holding the key (for join and reject); ``context`` what ``admit`` was given."""

    context: Any
    verdict: str
    holder: str
    slot: str


class KeyRouting:
    """The pools (which slots own keys), the admissions in flight, and re-keying. The key tables
    themselves live in the owner actors (``actors/keys.py``)."""

    def __init__(self, app: App, tasks: TaskTable, children: Children, store: TaskStore, outbox: Outbox) -> None:
        self._app = app
        self._tasks = tasks
        self._children = children
        self._store = store
        self._outbox = outbox
        self.pools = self._current_pools()
        self._admissions: dict[str, tuple[str, Any]] = {}  # task id -> (task name, context)
        self._waiting: dict[str, list[list[str]]] = {}  # slot -> admissions waiting for its actor
        self.rekeying = False  # the pools changed: admissions wait until every owner has the new keys
        self._held: list[list[str]] = []  # admissions that came during a re-keying

    def _current_pools(self) -> dict[str, list[str]]:
        specs = self._children.pool_specs()
        return {role: [s.slot for s in specs if s.role == role] for role in (ROLE_WORKER, ROLE_PROCESS)}

    def owner_of(self, name: str, key: str) -> str:
        return owner(key, self.pools[ROLE_PROCESS if self._app.tasks[name].process else ROLE_WORKER])

    # ---- admissions --------------------------------------------------------------------------
    def admit(self, task_id: str, key: str, name: str, context: Any) -> None:
        """Ask the key's owner actor to decide, by the task's ``on_conflict``; ``on_admitted``
        hands ``context`` back with it."""
        self._admissions[task_id] = (name, context)
        self._route([task_id, key, self._app.tasks[name].on_conflict])

    def _route(self, item: list[str]) -> None:
        """Send ``[task_id, key, policy]`` to the owner; hold it while that actor is down, or while
        the pools are being re-keyed."""
        entry = self._admissions.get(item[0])
        if entry is None:
            return  # decided already
        if self.rekeying:
            self._held.append(item)
            return
        slot = self.owner_of(entry[0], item[1])
        proc = self._children.get(slot)
        if proc is None or not proc.ready:
            self._waiting.setdefault(slot, []).append(item)
            return
        proc.admitting[item[0]] = item
        self._outbox.to_actor(proc, messages.Admit([item]).encode())

    def on_admitted(self, proc: ActorProcess, msg: messages.Admitted) -> list[Decision]:
        """The owner's decisions, in order (answers to admissions it was not asked are dropped)."""
        decided = []
        for task_id, verdict, holder in msg.decisions:
            if proc.admitting.pop(task_id, None) is None:
                continue
            entry = self._admissions.pop(task_id, None)
            if entry is not None:
                decided.append(Decision(entry[1], verdict, holder, proc.spec.slot))
        return decided

    def keys_in_flight(self) -> list[str]:
        """The keys of admissions not decided yet (a cluster member keeps their shards)."""
        keys = [item[1] for items in self._waiting.values() for item in items] + [item[1] for item in self._held]
        keys += [item[1] for proc in self._children.procs.values() for item in proc.admitting.values()]
        return keys

    def rekey(self) -> None:
        """Live keys came from the store (a cluster member adopted a shard's tasks): every owner
        rebuilds its table, as at a change of pools."""
        self.rekeying = True
        self.finish_rekey()

    def actor_up(self, proc: ActorProcess) -> None:
        """A key owner said hello: the admissions that waited for it go now."""
        for item in self._waiting.pop(proc.spec.slot, []):
            self._route(item)

    def actor_gone(self, proc: ActorProcess) -> None:
        """A key owner died: what it was asked goes to its next incarnation."""
        for item in proc.admitting.values():
            self._route(item)

    def release(self, task: LiveTask) -> None:
        """Tell the key's owner that ``task`` is over (a restarting owner rebuilds from the store)."""
        if task.lock_key is not None:
            self.free(task.id, task.lock_key, task.owner or "")

    def free(self, task_id: str, key: str, slot: str) -> None:
        """Tell the owner in ``slot`` that ``task_id`` no longer holds or waits for ``key``."""
        proc = self._children.get(slot)
        if proc is not None and proc.ready:
            self._outbox.to_actor(proc, messages.Release(task_id, key).encode())

    def rows_for(self, slot: str) -> list[list[Any]]:
        return self._key_rows().get(slot, [])

    def _key_rows(self) -> dict[str, list[list[Any]]]:
        """slot -> the live keys it owns: ``[key, [holder, *queued]]``, from the store, after the
        cancelled or timed-out attempts whose bodies still run (they hold their keys until then)."""
        keys: dict[str, dict[str, list[str]]] = {}
        for task in self._tasks.abandoned_keys.values():
            assert task.lock_key is not None
            slot = self.owner_of(task.name, task.lock_key)
            keys.setdefault(slot, {}).setdefault(task.lock_key, []).append(task.id)
        for task_id, name, key in self._store.live_locked():
            if name in self._app.tasks:
                keys.setdefault(self.owner_of(name, key), {}).setdefault(key, []).append(task_id)
        return {slot: [[k, ids] for k, ids in by_key.items()] for slot, by_key in keys.items()}

    # ---- re-keying ---------------------------------------------------------------------------
    def pools_changed(self) -> None:
        """Recompute the pools from the live slots; if they changed, move key ownership.

        A key's owner is a hash over its pool, so a node joining or leaving moves some keys. To
        move them without a window where two owners could both admit one key: new admissions are
        held, the outstanding ones are answered (or die with their actor), and only then every
        owner rebuilds its table from the store (``Rekey``) -- the same rebuild a restarted owner
        does -- and the held admissions go to the new owners."""
        pools = self._current_pools()
        if pools == self.pools:
            return
        self.pools = pools
        self.rekeying = True
        self.finish_rekey()

    def finish_rekey(self) -> None:
        children = self._children
        if any(proc.admitting for proc in children.procs.values()):
            return  # wait for the answers: they were decided under the old owners
        self.rekeying = False
        held = [item for items in self._waiting.values() for item in items] + self._held
        self._held = []
        self._waiting = {}
        self._tasks.reassign_owners(children.slots(), self.owner_of)
        rows = self._key_rows()
        for proc in children.procs.values():
            if proc.ready and proc.spec.role != ROLE_CLOCK:
                self._outbox.to_actor(proc, messages.Rekey(rows.get(proc.spec.slot, [])).encode())
        for item in held:
            self._route(item)
        log.info("pools now: %s", {role: len(slots) for role, slots in self.pools.items()})
