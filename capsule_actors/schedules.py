"""Pure schedule logic for the clock actor: cron slots, DST rules, misfire policy, a fake clock.

Nothing here does I/O, sleeps or reads the real clock: every function takes the current time as an
argument, so the clock actor (and users' tests, through :class:`FakeClock`) decide what "now" is.

Cron syntax
    5 fields ``minute hour day month weekday`` or 6 fields ``second minute hour day month
    weekday`` -- the seconds field comes FIRST (Quartz / Spring / node-cron convention), so
    ``"*/2 * * * * *"`` fires every 2 seconds. croniter's own default puts seconds LAST (its 6th
    field); we call croniter with ``second_at_beginning=True``. A croniter-style seconds-last
    expression therefore means something else here (its 6th field is read as the weekday).
    croniter's 7-field (year) form and Jenkins-style ``H`` hashes are rejected; ``@hourly``-style
    aliases are accepted.

DST rules (slots are computed on the schedule's local wall clock, then mapped to instants)
    Two properties of the expression decide them (see docs/schedules.md for a table):

    * slots per hour: how many times the schedule fires within one hour it fires in -- the size
      of the minute field times the size of the seconds field (a 5-field expression has the one
      second :00). Hour, day, month and weekday fields do not change it: "*/20 1 * * *" has 3,
      "0,30 0 * * * *" has 2, "0 * * * *" and "30 2 * * *" have 1.
    * every hour: the hour field matches all 24 hours ("*", "0-23").

    * Spring forward: a wall time inside the gap does not exist. A schedule with one slot per
      hour that runs in some hours only (daily, "0 */2 * * *", "30 1-3 * * *") fires such a slot
      once at the first instant after the gap, or it would lose that day's (or period's) only
      firing: "30 2 * * *" in New York fires at 03:00 EDT. Several gap slots and a real slot at
      the gap's end collapse into that single firing. Every other schedule (more than one slot
      per hour, or every hour) has no slots in the gap and no catch-up, which would be a firing
      that matches no field, often minutes before a real slot: "7 * * * *" in London fires
      00:07 GMT then 02:07 BST, "0 * * * *" fires 23 times that day, "*/15 2 * * *" in New York
      not at all.
    * Fall back: a wall time repeats. A schedule replays the repeated period (fires its slots in
      both passes, following real time) if it has more than one slot per hour OR its hour field
      matches every hour:
        - more than one slot per hour: "*/20 1 * * *" in New York on 2024-11-03 fires 01:00,
          01:20, 01:40 EDT and again EST (6); "* 1-6 * * *" does not stop for an hour;
        - every hour: "0 * * * *" fires 01:00 EDT and 01:00 EST, 25 times that day (as Vixie
          cron, cronie, cronsim and croniter do), so an hourly job is never silent for two hours.
      Any other schedule (one slot per hour, in some hours only) fires a repeated wall time once,
      at its first occurrence: "30 1 * * *" fires at 01:30 EDT only, "0 1-3 * * *" at 01:00 EDT,
      02:00 EST and 03:00 EST.
    * Shifts of other sizes (30 minutes on Australia/Lord_Howe) follow the same rules: only the
      length of the gap or the repeated period changes.

    croniter's native handling of aware datetimes is not used: croniter 7.0.0 moves forward
    correctly on DST days, but its rules differ from these (it fires "30 1 * * *" in both passes
    of a repeated hour, and a sub-hourly gap slot such as "*/15 2 * * *" at the gap's end). We
    iterate croniter on naive local wall time instead (pure calendar arithmetic) and resolve gaps
    and folds with zoneinfo ourselves.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import math
from collections.abc import Iterable
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

from .errors import CapsuleInternalError, ConfigError

__all__ = [
    "MISFIRE",
    "ScheduleSpec",
    "ScheduleState",
    "next_fire",
    "first_state",
    "resume_state",
    "step",
    "seconds_until",
    "FakeClock",
]

MISFIRE = ("skip", "run_once")

UTC = _dt.UTC
_MINUTE_FIELD, _HOUR_FIELD, _SECOND_FIELD = 0, 1, 5  # indexes in croniter's `expanded` (6 fields only: seconds)
_TINY = _dt.timedelta(microseconds=1)
_CRON_HELP = (
    "use 5 fields 'minute hour day month weekday' or 6 fields "
    "'second minute hour day month weekday' (seconds first), e.g. '*/5 * * * *'"
)


@functools.lru_cache(maxsize=512)
def _prototype(cron: str) -> croniter:
    """A parsed croniter to copy per call: parsing a 6-field expression costs ~10x a get_next."""
    return croniter(cron, _dt.datetime(2000, 1, 1), ret_type=_dt.datetime, second_at_beginning=True)


def _wall_next(cron: str, wall: _dt.datetime) -> _dt.datetime:
    """First naive wall time strictly after naive ``wall`` matching ``cron`` (no time zone)."""
    it = copy.copy(_prototype(cron))  # the prototype itself is never mutated: thread-safe
    nxt: _dt.datetime = it.get_next(_dt.datetime, start_time=wall)
    return nxt


def _field_size(values: list[int | str], full: int) -> int:
    """How many values a croniter-expanded field matches (``["*"]`` matches all ``full``)."""
    return full if values == ["*"] else len(set(values))


@functools.lru_cache(maxsize=512)
def _slots_per_hour(cron: str) -> int:
    """How many times the schedule fires within an hour it fires in: minutes x seconds. The hour
    and day fields do not count, so "*/20 1 * * *" (3) is as sub-hourly as "*/20 * * * *"."""
    expanded = _prototype(cron).expanded
    seconds = _field_size(expanded[_SECOND_FIELD], 60) if len(expanded) > _SECOND_FIELD else 1
    return _field_size(expanded[_MINUTE_FIELD], 60) * seconds


@functools.lru_cache(maxsize=512)
def _every_hour(cron: str) -> bool:
    """True if the hour field matches all 24 hours."""
    return _field_size(_prototype(cron).expanded[_HOUR_FIELD], 24) == 24


def _replays_repeated_hour(cron: str) -> bool:
    """True if the schedule fires in both passes of a repeated (fall-back) period: more than one
    slot per hour ("*/20 1 * * *": skipping the second pass would silence it for an hour) OR an
    hour field matching every hour ("0 * * * *": skipping it would leave two hours between
    firings; it fires 25 times on a fall-back day). "30 1 * * *" and "0 1-3 * * *" fire once."""
    return _slots_per_hour(cron) > 1 or _every_hour(cron)


def _catches_up_gap(cron: str) -> bool:
    """True if a slot in a spring-forward gap fires at the gap's end: one slot per hour in some
    hours only, so the gap slot is the only firing of its day or period. For denser or every-hour
    schedules a catch-up would be an extra firing that matches no field."""
    return _slots_per_hour(cron) == 1 and not _every_hour(cron)


def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)  # ZoneInfo caches instances per key


def _utc(when: _dt.datetime, what: str) -> _dt.datetime:
    if not isinstance(when, _dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ConfigError(f"{what} must be an aware datetime (with tzinfo), got {when!r}")
    return when.astimezone(UTC)


def _classify(tz: ZoneInfo, wall: _dt.datetime) -> tuple[str, _dt.datetime, _dt.datetime]:
    """("normal" | "gap" | "fold", instant with fold=0, instant with fold=1), both in UTC.

    PEP 495: in a gap fold=0 uses the offset before the transition (the later instant); in a
    fold, fold=0 is the first occurrence (the earlier instant)."""
    u0 = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    u1 = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if u0 == u1:
        return "normal", u0, u1
    return ("fold" if u0 < u1 else "gap"), u0, u1


def _transition(tz: ZoneInfo, lo: _dt.datetime, hi: _dt.datetime) -> _dt.datetime:
    """The first instant in (lo, hi] whose UTC offset is hi's (offsets change on whole seconds)."""
    lo_s, hi_s = math.floor(lo.timestamp()), math.ceil(hi.timestamp())
    target = _dt.datetime.fromtimestamp(hi_s, tz).utcoffset()
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _dt.datetime.fromtimestamp(mid, tz).utcoffset() == target:
            hi_s = mid
        else:
            lo_s = mid
    return _dt.datetime.fromtimestamp(hi_s, UTC)


def _wall(tz: ZoneInfo, instant: _dt.datetime) -> _dt.datetime:
    """The naive local wall time of an aware ``instant``."""
    return instant.astimezone(tz).replace(tzinfo=None)


def _next_primary(cron: str, tz: ZoneInfo, wall: _dt.datetime, a: _dt.datetime) -> _dt.datetime:
    """The first firing after instant ``a`` of a wall slot after naive ``wall``, counting each
    wall time once: itself, its first occurrence if repeated, or the end of its gap (if the
    schedule catches gap slots up; otherwise the gap is jumped over)."""
    for _ in range(8):  # by construction the first real candidate is > a; the loop is a guard
        wall = _wall_next(cron, wall)
        kind, u0, u1 = _classify(tz, wall)
        if kind != "gap":
            p = u0
        elif _catches_up_gap(cron):
            p = _transition(tz, u1, u0)
        else:  # no slot in this gap: resume at its end
            wall = _wall(tz, _transition(tz, u1, u0)) - _TINY
            continue
        if p > a:
            return p
    raise CapsuleInternalError(f"next_fire({cron!r}, after {a.isoformat()}) made no progress")


def _second_pass_next(cron: str, tz: ZoneInfo, base: _dt.datetime, fold_end: _dt.datetime) -> _dt.datetime | None:
    """The second-pass instant of the first wall slot in (base, fold_end) -- the rest of a
    repeated period -- for schedules that replay it; None if there is none."""
    if not _replays_repeated_hour(cron):
        return None
    w = _wall_next(cron, base)
    return w.replace(tzinfo=tz, fold=1).astimezone(UTC) if w < fold_end else None


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """One declared schedule. Validated on construction so a bad declaration fails at decoration
    time with a ConfigError that names the bad value (and changes nothing)."""

    name: str
    cron: str
    tz: str = "UTC"
    misfire: str = "skip"
    grace: float = 1.0  # seconds a firing may be late and still count as on time

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"schedule name must be a non-empty string, got {self.name!r}")
        who = f"schedule {self.name!r}"
        if not isinstance(self.cron, str):
            raise ConfigError(f"{who}: cron must be a string, got {self.cron!r}; {_CRON_HELP}")
        fields = self.cron.split()
        alias = len(fields) == 1 and fields[0].startswith("@")
        if not alias and len(fields) not in (5, 6):
            raise ConfigError(f"{who}: cron {self.cron!r} has {len(fields)} fields; {_CRON_HELP}")
        try:
            _wall_next(self.cron, _dt.datetime(2000, 1, 1))
        except CroniterError as exc:
            # croniter either rejects the syntax or finds no matching date (e.g. "0 0 31 2 *").
            raise ConfigError(f"{who}: invalid cron expression {self.cron!r} ({exc}); {_CRON_HELP}") from None
        try:
            _zone(self.tz)
        except (ValueError, KeyError, OSError, TypeError):  # ZoneInfoNotFoundError is a KeyError
            raise ConfigError(
                f"{who}: unknown time zone {self.tz!r}; use an IANA name such as 'UTC', "
                "'Europe/Berlin' or 'America/New_York'"
            ) from None
        if self.misfire not in MISFIRE:
            raise ConfigError(f"{who}: unknown misfire policy {self.misfire!r}; use one of {MISFIRE}")
        grace = self.grace
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
            raise ConfigError(f"{who}: grace must be a finite number of seconds >= 0, got {grace!r}")


def next_fire(spec: ScheduleSpec, after: _dt.datetime) -> _dt.datetime:
    """The first slot strictly after ``after`` (aware, any tz), as an aware UTC datetime.

    Slots are cron matches on the schedule's local wall clock. A wall time in a spring-forward gap
    fires once at the gap's end only for schedules with one slot per hour in some hours only
    ("30 2 * * *"); a repeated (fall-back) wall time fires at its first occurrence, plus its second
    for schedules with more than one slot per hour ("*/20 1 * * *") or whose hour field matches
    every hour ("0 * * * *"), see the module docstring. Work is bounded: a few croniter calls
    whatever ``after`` is.
    """
    a = _utc(after, "after")
    tz = _zone(spec.tz)
    local = a.astimezone(tz)
    start = local.replace(tzinfo=None)
    best: _dt.datetime | None = None
    kind, u0, u1 = _classify(tz, start)
    if kind == "fold":  # `after` lies inside a repeated period (first or second pass)
        fold_start = _wall(tz, _transition(tz, u0, u1))
        fold_end = fold_start + (u1 - u0)
        second_pass = local.fold == 1
        best = _second_pass_next(spec.cron, tz, start if second_pass else fold_start - _TINY, fold_end)
        if second_pass:  # first occurrences in the fold are already past: resume after it
            start = fold_end - _TINY
    p = _next_primary(spec.cron, tz, start, a)
    return p if best is None or p < best else best


@dataclasses.dataclass
class ScheduleState:
    """Where a schedule stands: ``last_slot`` was handled (fired or skipped), ``next_slot`` is the
    first slot not handled yet. Persist ``last_slot`` to resume after a restart (resume_state)."""

    spec: ScheduleSpec
    last_slot: _dt.datetime | None
    next_slot: _dt.datetime


def first_state(spec: ScheduleSpec, now: _dt.datetime) -> ScheduleState:
    """State of a newly registered schedule: slots before registration (and at ``now``) never fire."""
    return ScheduleState(spec, None, next_fire(spec, now))


def resume_state(spec: ScheduleSpec, last_slot: _dt.datetime | None, now: _dt.datetime) -> ScheduleState:
    """State after a restart from the persisted ``last_slot``: slots after it are still pending, so
    the next ``step`` applies the misfire policy to those missed while down. ``None`` (never
    handled a slot) starts fresh like first_state."""
    if last_slot is None:
        return first_state(spec, now)
    last = _utc(last_slot, "last_slot")
    return ScheduleState(spec, last, next_fire(spec, last))


def _latest_slot(spec: ScheduleSpec, first: _dt.datetime, now: _dt.datetime) -> _dt.datetime:
    """The latest slot <= now, given a slot ``first`` <= now, in O(log(now - first)) next_fire calls
    (bisection), so a per-second schedule down for years costs ~60 calls, not millions."""
    lo, hi = first, now  # invariant: lo is a slot <= now, and no slot lies in (hi, now]
    for _ in range(400):
        nxt = next_fire(spec, lo)
        if nxt > hi:
            return lo
        mid = lo + (hi - lo) / 2
        if mid <= nxt:  # the next slot is already past the midpoint: take it
            lo = nxt
            continue
        probe = next_fire(spec, mid)
        if probe <= hi:
            lo = probe
        else:
            lo, hi = nxt, mid
    raise CapsuleInternalError(f"latest slot search did not converge for {spec!r}")


def step(state: ScheduleState, now: _dt.datetime) -> tuple[list[_dt.datetime], ScheduleState]:
    """Advance a schedule to ``now``: the slots to fire (one task each; at most one) and the new
    state. ``state`` is not modified.

    Slots in (last_slot, now] are handled: one with ``now - slot <= grace`` is on time, older ones
    were missed. "skip" fires the latest slot only if it is on time; "run_once" fires the latest
    slot whenever any slot is due -- a single catch-up that also covers an on-time slot. A
    ``now`` before ``state.next_slot`` (same or earlier time, clock stepped back) fires nothing,
    so no slot ever fires twice.
    """
    n = _utc(now, "now")
    if n < state.next_slot:
        return [], state
    spec = state.spec
    last = _latest_slot(spec, state.next_slot, n)
    on_time = (n - last).total_seconds() <= spec.grace
    fire = [last] if (on_time or spec.misfire == "run_once") else []
    return fire, ScheduleState(spec, last, next_fire(spec, last))


def seconds_until(state: ScheduleState, now: _dt.datetime) -> float:
    """How long the clock may sleep before the next slot is due (0 if it already is)."""
    return max(0.0, (state.next_slot - _utc(now, "now")).total_seconds())


class FakeClock:
    """Drives schedules through given datetimes without sleeping, for testing schedules.

    ``advance_to`` visits every slot on the way, so each fires on time (a fake clock never misses
    slots); ``down_until`` jumps in one step, as if the process had been down, and applies each
    schedule's misfire policy. Schedules registered at ``start`` never fire slots at or before it.

    >>> import datetime as dt
    >>> utc = dt.timezone.utc
    >>> clock = FakeClock([ScheduleSpec("digest", "0 * * * *")], dt.datetime(2024, 1, 1, tzinfo=utc))
    >>> [slot.hour for name, slot in clock.advance_to(dt.datetime(2024, 1, 1, 3, tzinfo=utc))]
    [1, 2, 3]
    >>> clock.down_until(dt.datetime(2024, 1, 1, 9, 30, tzinfo=utc))  # misfire="skip": nothing
    []
    """

    def __init__(self, specs: Iterable[ScheduleSpec], start: _dt.datetime) -> None:
        self._now = _utc(start, "start")
        self._states: dict[str, ScheduleState] = {}
        for spec in specs:
            if not isinstance(spec, ScheduleSpec):
                raise ConfigError(f"FakeClock takes ScheduleSpec objects, got {spec!r}")
            if spec.name in self._states:
                raise ConfigError(f"FakeClock: two schedules are named {spec.name!r}")
            self._states[spec.name] = first_state(spec, self._now)

    @property
    def now(self) -> _dt.datetime:
        """The fake current time (aware UTC)."""
        return self._now

    @property
    def states(self) -> dict[str, ScheduleState]:
        """A snapshot of each schedule's state, by name."""
        return dict(self._states)

    def _check_forward(self, when: _dt.datetime) -> _dt.datetime:
        w = _utc(when, "when")
        if w < self._now:
            raise ConfigError(f"FakeClock cannot go back in time: {when.isoformat()} < now {self._now.isoformat()}")
        return w

    def advance_to(self, when: _dt.datetime) -> list[tuple[str, _dt.datetime]]:
        """Move to ``when`` stopping at every due slot: (name, slot) firings in time order (ties in
        registration order). Costs one step per slot, so mind per-second schedules over long spans."""
        target = self._check_forward(when)
        fired: list[tuple[str, _dt.datetime]] = []
        while self._states:
            due = min(st.next_slot for st in self._states.values())
            if due > target:
                break
            for name, st in self._states.items():
                if st.next_slot == due:
                    slots, self._states[name] = step(st, due)
                    fired.extend((name, slot) for slot in slots)
            self._now = due
        self._now = target
        return fired

    def advance(self, delta: _dt.timedelta | float) -> list[tuple[str, _dt.datetime]]:
        """advance_to(now + delta); ``delta`` is a timedelta or seconds."""
        if not isinstance(delta, _dt.timedelta):
            delta = _dt.timedelta(seconds=delta)
        return self.advance_to(self._now + delta)

    def down_until(self, when: _dt.datetime) -> list[tuple[str, _dt.datetime]]:
        """Simulate the process being down until ``when``: one step per schedule at ``when``, which
        applies the misfire policy ("skip": nothing unless a slot is within grace; "run_once": one
        catch-up). Returns the (name, slot) firings in time order."""
        target = self._check_forward(when)
        fired: list[tuple[str, _dt.datetime]] = []
        for name, st in self._states.items():
            slots, self._states[name] = step(st, target)
            fired.extend((name, slot) for slot in slots)
        self._now = target
        order = {name: i for i, name in enumerate(self._states)}
        fired.sort(key=lambda f: (f[1], order[f[0]]))
        return fired
