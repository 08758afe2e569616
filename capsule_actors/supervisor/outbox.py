"""Everything the supervisor sends, held until the turn's commit: replies to clients, messages to
actors and worker nodes. Owns the send side of the sockets."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import zmq

from .. import messages
from ..errors import CapsuleError

if TYPE_CHECKING:
    from .specs import ActorProcess

log = logging.getLogger("capsule_actors.supervisor")

Frames = list[bytes]
Socket = zmq.Socket[bytes]
REMOTE = b"\x01tcp:"  # prefix of remote client identities (local ROUTER identities start with 0)
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)


class Outbox:
    """Messages of this turn (sent after its commit) and acks that wait for any later commit."""

    def __init__(self, client_sock: Socket, actor_sock: Socket, remote_sock: Socket | None) -> None:
        self.client_sock = client_sock
        self.actor_sock = actor_sock
        self.remote_sock = remote_sock
        self.pending: list[tuple[Socket, Frames]] = []
        self.after_commit: list[tuple[Socket, Frames]] = []  # journaled acks: nobody waits for them

    def reply(
        self,
        ident: bytes,
        req: int,
        ok: bool,
        body: Any,
        frames: Frames = (),  # type: ignore[assignment]
        *,
        after_commit: bool = False,
    ) -> None:
        """Queue a reply: sent after this turn's commit, or (``after_commit``) after whichever
        commit comes next, without forcing one."""
        sock = self.client_sock
        if ident.startswith(REMOTE) and self.remote_sock is not None:
            sock, ident = self.remote_sock, ident[len(REMOTE) :]
        (self.after_commit if after_commit else self.pending).append(
            (sock, [ident, messages.Reply(req, ok, body).encode(), *frames])
        )

    def error(self, ident: bytes, req: int, exc: CapsuleError) -> None:
        self.reply(ident, req, False, [type(exc).__name__, str(exc)])

    def to_actor(self, proc: ActorProcess, *frames: bytes) -> None:
        sock = self.actor_sock if proc.spec.node is None else self.remote_sock
        assert sock is not None
        self.pending.append((sock, [proc.identity, *frames]))

    def to_node(self, ident: bytes, msg: messages.Message) -> None:
        assert self.remote_sock is not None
        self.pending.append((self.remote_sock, [ident, msg.encode()]))

    def hold(self) -> None:
        """This turn's writes did not commit: what it would send waits with the acks that wait
        for a commit, after them (in the order it was queued: an actor's messages keep theirs)."""
        self.after_commit += self.pending
        self.pending.clear()

    def committed(self) -> None:
        """A commit happened: the acks that waited for one go with the next flush."""
        self.pending += self.after_commit
        self.after_commit.clear()

    def flush(self) -> None:
        for sock, frames in self.pending:
            last = len(frames) - 1
            try:  # plain int flags: pyzmq's send_multipart spends more on flag enums than on sending
                for i, frame in enumerate(frames):
                    sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=False)
            except zmq.ZMQError as exc:  # a peer that vanished: its waits are resent on reconnect
                log.debug("send failed: %s", exc)
        self.pending.clear()
