"""The submit journal: how a local ``submit()`` is durable before the supervisor answers.

A client on this machine writes the ``Submit`` message it is about to send to a file of its own
in ``<state>/journal/`` and returns at once; the supervisor's acknowledgement arrives later on the
I/O thread. The record is as durable as a commit with ``synchronous=NORMAL``: the kernel holds
it, so a crash of the client, the supervisor or both loses nothing, and a power loss can lose the
last writes. The writer holds a POSIX lock on its file for its whole life; the supervisor replays
the files whose lock is free (their writer died or closed with records unacknowledged) through
the same validated ``Submit`` path, and a task id it already has is ignored, so a record that was
both sent and replayed is recorded once.

Like SQLite's WAL, the file is reused rather than truncated (a truncate at every ack is a file
system metadata operation per task; a latency run with it showed a 0.28 s stall): the header holds an
epoch, every record carries the epoch it was written in, and once every record is acknowledged
the epoch is bumped and writing starts over after the header. Replay reads records from the
header on while they carry the header's epoch and pass their crc. Where one does not, it looks
further on for the next record that does: none means the records ended there (what follows is a
record torn by a crash, or acknowledged leftovers of earlier epochs, which never carry the
current one); one means the stretch before it is damaged, which is reported (``Skipped``) and
the file kept aside, while every intact record after it is still replayed.

File: ``<8s magic><u64 epoch>``, then records ``<u32 length><u32 crc32><u64 epoch>`` followed by
a msgpack array of the message's frames (the header, then one payload per item).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgpack

JOURNAL_DIR = "journal"
SUFFIX = ".journal"
UNREADABLE = ".unreadable"  # a journal set aside (its name + this): never replayed, never removed
SEGMENT_BYTES = 4 * 2**20  # past this, new records go to a new file; the old one goes once acked
TEMP_SUFFIX = ".tmp"  # a journal being made (``.NAME.tmp``), renamed to NAME.journal once locked
STALE_TEMP_AGE = 60.0  # seconds: a temp file this old with a free lock was left by a failed writer
_MAGIC = b"CPSLJRN1"
_FILE_HEAD = struct.Struct("<8sQ")
_HEAD = struct.Struct("<IIQ")
_EPOCH = struct.Struct("<Q")
_EPOCH_AT = 8  # the epoch's offset in a record's header
_ARRAY_START = b"[\x90-\x9f\xdc\xdd]"  # a record's body, a msgpack array, begins with one of these


class Segment:
    """One journal file: where the next record goes, and how many still wait for their ack."""

    __slots__ = ("epoch", "fd", "path", "pos", "unacked")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.epoch = 1
        self.pos = _FILE_HEAD.size
        self.unacked = 0

    def restart(self) -> None:
        """Every record is acknowledged: a new epoch, written over the old records (the header
        first: should it fail, the file goes on in its epoch, records and all)."""
        _write_at(self.fd, _FILE_HEAD.pack(_MAGIC, self.epoch + 1), 0)
        self.epoch += 1
        self.pos = _FILE_HEAD.size


class Journal:
    """This process's journal for one state directory (owned by its ``Connection``)."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / JOURNAL_DIR
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._segment = self._open()
        self._older: list[Segment] = []  # full segments still waiting for acks
        self._closed = False
        self.unacked_items = 0  # tasks written but not yet acknowledged, over every segment

    def _open(self) -> Segment:
        """Create, lock, then rename into place: the supervisor never sees an unlocked file. A
        failure (a full disk, say) leaves no temporary file behind."""
        name = f"{os.getpid()}-{os.urandom(6).hex()}"
        tmp = self.directory / f".{name}{TEMP_SUFFIX}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_at(fd, _FILE_HEAD.pack(_MAGIC, 1), 0)
            path = self.directory / f"{name}{SUFFIX}"
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Segment(fd, path)

    def append(self, frames: list[bytes], items: int) -> Segment:
        """Write one message of ``items`` tasks; durable when this returns. Pass the segment
        to :meth:`acked` when the supervisor answers."""
        body = msgpack.packb(frames, use_bin_type=True)
        with self._lock:
            if self._closed:
                raise OSError("the submit journal is closed")
            seg = self._segment
            if seg.pos >= SEGMENT_BYTES:
                fresh = self._open()  # first: if it fails, the current segment stays as it is
                self._older.append(seg)  # removed at its last ack
                seg = self._segment = fresh
            _write_at(seg.fd, _HEAD.pack(len(body), zlib.crc32(body), seg.epoch) + body, seg.pos)
            seg.pos += _HEAD.size + len(body)
            seg.unacked += 1
            self.unacked_items += items
        return seg

    def acked(self, seg: Segment, items: int) -> None:
        """The supervisor answered one of ``seg``'s records: start over once all are."""
        with self._lock:
            seg.unacked -= 1
            self.unacked_items -= items
            if seg.unacked or self._closed:
                return
            if seg is self._segment:
                seg.restart()
            else:
                self._older.remove(seg)
                self._remove(seg)

    def close(self) -> None:
        """Remove what is fully acknowledged; files with records still unanswered are left for
        the supervisor to replay (closing releases their locks)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for seg in (*self._older, self._segment):
                self._remove(seg)
            self._older.clear()

    @staticmethod
    def _remove(seg: Segment) -> None:
        if not seg.unacked:
            seg.path.unlink(missing_ok=True)
        os.close(seg.fd)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """One ``pwrite``; a short one is an error too (a full disk can cut it)."""
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(f"short write to the submit journal ({written} of {len(data)} bytes)")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A stretch of a journal that holds no record replay could read, between intact ones."""

    offset: int
    size: int
    records: int | None  # how many records it held, when their lengths say so; None: unknown
    why: str = ""  # more than "damaged", when known

    def describe(self) -> str:
        """``126 bytes at offset 141 (1 record)``, for the log."""
        if self.records is None:
            count = "an unknown number of records"
        else:
            count = f"{self.records} record{'' if self.records == 1 else 's'}"
        return f"{self.size} bytes at offset {self.offset} ({count}{'; ' + self.why if self.why else ''})"


@dataclasses.dataclass
class Contents:
    """What replay reads from one journal file: its messages, and what it could not read."""

    messages: list[list[bytes]] = dataclasses.field(default_factory=list)
    foreign: str | None = None  # another format's file: not read at all (another version's, say)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)  # damage: the file is kept

    def damage(self) -> str | None:
        """What was skipped, for the log line; None when nothing was."""
        if len(self.skipped) <= 1:
            return "skipped " + self.skipped[0].describe() if self.skipped else None
        total = sum(s.size for s in self.skipped)
        return f"skipped {total} bytes in {len(self.skipped)} places: " + ", ".join(s.describe() for s in self.skipped)


def orphaned(state_dir: Path) -> Iterator[tuple[Path, Contents]]:
    """Journals whose writer is gone, with what is in them. The caller records the messages,
    commits, then unlinks the path (a crash before that replays them again), or sets the file
    aside (``set_aside``) when it could not read all of it (``foreign`` or ``skipped``)."""
    directory = state_dir / JOURNAL_DIR
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive: it sends (or resends) these itself
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            yield path, read_contents(data)
        finally:
            os.close(fd)


def set_aside(path: Path) -> Path:
    """Keep a journal that could not be read whole (another version's, a damaged one) as
    ``NAME.unreadable``, out of the replay, so what it holds is not lost with it: renamed back,
    the version that wrote it replays it."""
    kept = path.with_name(path.name + UNREADABLE)
    path.rename(kept)
    return kept


def remove_stale_temps(state_dir: Path, min_age: float = STALE_TEMP_AGE) -> list[Path]:
    """Remove the temporary files (``.NAME.tmp``) of journals whose making failed or whose writer
    died before the rename: older than ``min_age`` (a writer locks its file right after creating
    it) and unlocked. They hold no record (records go in after the rename)."""
    directory = state_dir / JOURNAL_DIR
    try:
        temps = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []
    return [path for path in temps if _remove_if_stale(path, time.time() - min_age)]


def _remove_if_stale(path: Path, made_before: float) -> bool:
    """Unlink ``path`` if it is older than ``made_before`` and no process holds its lock."""
    try:
        if path.stat().st_mtime > made_before:
            return False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its writer is making it right now
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def read_contents(data: bytes) -> Contents:
    """The records of one journal file (``data``), and what of it could not be read."""
    if len(data) < _FILE_HEAD.size:
        return Contents()  # made, never written: nothing was journaled in it
    magic, epoch = _FILE_HEAD.unpack_from(data, 0)
    if magic != _MAGIC:
        return Contents(foreign=f"its header is {magic!r}, not this version's {_MAGIC!r}")
    newer = _newer_epoch(data, epoch)
    if newer is not None:
        why = f"the header's epoch {epoch} is below its first record's {newer}: the header is damaged"
        return Contents(skipped=[Skipped(0, len(data), None, why)])
    contents = Contents()
    pos = _FILE_HEAD.size
    while pos < len(data):
        end = _intact_end(data, pos, epoch)
        if end is None:
            found = _next_intact(data, pos + 1, epoch)
            if found is None:
                break  # the end: a record torn by a crash, or acknowledged leftovers
            contents.skipped.append(Skipped(pos, found - pos, _records_between(data, pos, found)))
            pos = found
            continue
        frames = _frames(data[pos + _HEAD.size : end])
        if frames is None:  # framed and intact, yet not a message of ours
            contents.skipped.append(Skipped(pos, end - pos, 1, "intact, but not a list of frames"))
        else:
            contents.messages.append(frames)
        pos = end
    return contents


def _intact_end(data: bytes, pos: int, epoch: int | None) -> int | None:
    """Where the record at ``pos`` ends, if one of ``epoch`` (None: any) is there whole with its
    crc right; None otherwise. An empty record is never one (bodies are msgpack arrays)."""
    if pos + _HEAD.size > len(data):
        return None
    length, crc, record_epoch = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + length
    if (epoch is not None and record_epoch != epoch) or not length or end > len(data):
        return None
    return end if zlib.crc32(memoryview(data)[pos + _HEAD.size : end]) == crc else None


def _next_intact(data: bytes, start: int, epoch: int) -> int | None:
    """The first position from ``start`` where an intact record of ``epoch`` begins. Only this
    epoch's records are looked for (its bytes, then a body's first byte: a C-speed search), so
    acknowledged leftovers never are."""
    candidate = re.compile(re.escape(_EPOCH.pack(epoch)) + _ARRAY_START)
    found = candidate.search(data, start + _EPOCH_AT)
    while found is not None:
        if _intact_end(data, found.start() - _EPOCH_AT, epoch) is not None:
            return found.start() - _EPOCH_AT
        found = candidate.search(data, found.start() + 1)
    return None


def _records_between(data: bytes, start: int, end: int) -> int | None:
    """How many records lie in ``data[start:end]``, when their length fields lead from ``start``
    exactly to ``end`` (the damage spared them); None when they do not."""
    count, pos = 0, start
    while pos < end and pos + _HEAD.size <= len(data):
        pos += _HEAD.size + _HEAD.unpack_from(data, pos)[0]
        count += 1
    return count if pos == end else None


def _newer_epoch(data: bytes, epoch: int) -> int | None:
    """The epoch of an intact first record when it is above the header's: a damaged header (a
    header is written before any record of its epoch, so it is never below one)."""
    if _intact_end(data, _FILE_HEAD.size, None) is None:
        return None
    (first,) = _EPOCH.unpack_from(data, _FILE_HEAD.size + _EPOCH_AT)
    return int(first) if first > epoch else None


def _frames(body: bytes) -> list[bytes] | None:
    """A record's body: the message's frames (header, payloads), or None when it is not that."""
    try:
        frames = msgpack.unpackb(body, raw=True, use_list=True)
    except Exception:
        return None
    if isinstance(frames, list) and frames and all(isinstance(f, bytes) for f in frames):
        return frames
    return None
