"""DST rules of capsule_actors.schedules (issue 23), as exact instants and as firings per local day.

The rules (module docstring of schedules.py, docs/schedules.md):
* spring-forward gap: only a schedule with one slot per hour that runs in some hours only moves a
  gap slot to the gap's end; others have no slots in the gap;
* fall-back repeated period: a schedule with more than one slot per hour ("*/20 1 * * *") OR an
  hour field matching every hour ("0 * * * *") fires in both passes; any other schedule (one slot
  per hour in some hours only: "30 1 * * *", "0 1-3 * * *") fires once, at the first occurrence.

Pure: fixed datetimes, no processes, no sleeping.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest

from capsule_actors.schedules import FakeClock, ScheduleSpec, next_fire, resume_state, step

UTC = dt.UTC
NY = "America/New_York"
LONDON = "Europe/London"
RIGA = "Europe/Riga"
SYDNEY = "Australia/Sydney"
LORD_HOWE = "Australia/Lord_Howe"
SANTIAGO = "America/Santiago"


def at(tz: str, *wall: int, fold: int = 0) -> dt.datetime:
    """The instant of local wall time ``wall`` in ``tz`` (fold=1: its second occurrence), in UTC.

    UTC, because an aware datetime in a repeated hour never compares equal to one in another zone.
    Refuses a wall time in a gap or a fold=1 outside a repeated hour, so a typo cannot pass."""
    zone = ZoneInfo(tz)
    local = dt.datetime(*wall, tzinfo=zone, fold=fold)
    instant = local.astimezone(UTC)
    back = instant.astimezone(zone)
    assert back.replace(tzinfo=None) == local.replace(tzinfo=None) and back.fold == fold, local
    return instant


def firings(cron: str, tz: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    """The first ``n`` slots after ``after``, by iterating next_fire."""
    spec, out, t = ScheduleSpec("s", cron, tz=tz), [], after
    for _ in range(n):
        t = next_fire(spec, t)
        out.append(t)
    return out


# --------------------------------------------------------------------------- the cases


def test_london_hourly_at_minute_7_does_not_fire_at_the_gaps_end() -> None:
    # 2025-03-30: 01:00 GMT -> 02:00 BST (croniter's test_dst_hourly).
    assert firings("7 * * * *", LONDON, dt.datetime(2025, 3, 30, tzinfo=UTC), 3) == [
        at(LONDON, 2025, 3, 30, 0, 7), at(LONDON, 2025, 3, 30, 2, 7), at(LONDON, 2025, 3, 30, 3, 7),
    ]


def test_new_york_quarter_past_and_to_skip_the_gap() -> None:
    # 2023-03-12: 02:00 EST -> 03:00 EDT.
    assert firings("15,45 * * * *", NY, at(NY, 2023, 3, 12, 1, 59), 2) == [
        at(NY, 2023, 3, 12, 3, 15), at(NY, 2023, 3, 12, 3, 45),
    ]


def test_new_york_half_past_every_hour_skips_the_gap() -> None:
    assert firings("30 * * * *", NY, at(NY, 2024, 3, 10, 1, 0), 2) == [
        at(NY, 2024, 3, 10, 1, 30), at(NY, 2024, 3, 10, 3, 30),  # 01:30 EST, 03:30 EDT
    ]


def test_riga_every_minute_in_some_hours_runs_through_the_repeated_hour() -> None:
    # 2021-10-31: 04:00 EEST -> 03:00 EET; 03:00-03:59 happens twice.
    assert firings("* 1-6 * * *", RIGA, at(RIGA, 2021, 10, 31, 3, 58), 3) == [
        at(RIGA, 2021, 10, 31, 3, 59), at(RIGA, 2021, 10, 31, 3, 0, fold=1), at(RIGA, 2021, 10, 31, 3, 1, fold=1),
    ]


def test_new_york_every_20_minutes_in_hour_1_runs_both_passes() -> None:
    # 2024-11-03: 02:00 EDT -> 01:00 EST; cronie runs :00/:20/:40 in both passes.
    first = [at(NY, 2024, 11, 3, 1, m) for m in (0, 20, 40)]
    second = [at(NY, 2024, 11, 3, 1, m, fold=1) for m in (0, 20, 40)]
    assert firings("*/20 1 * * *", NY, at(NY, 2024, 11, 3, 0, 30), 7) == [*first, *second, at(NY, 2024, 11, 4, 1, 0)]
    # Asked from inside the second pass, and from the last first-pass slot.
    assert next_fire(ScheduleSpec("p", "*/20 1 * * *", tz=NY), second[0]) == second[1]
    assert next_fire(ScheduleSpec("p", "*/20 1 * * *", tz=NY), first[2]) == second[0]


# --------------------------------------------------------------------------- the rules, exactly


# Instants as ISO strings with the zone's UTC offset: "01:20-05:00" on 2024-11-03 is New York's
# second pass (EST), "01:20-04:00" its first (EDT).
RULE_CASES = [
    # Spring forward, one slot per hour in some hours only: the gap slot moves to the gap's end.
    # New York 2024-03-10: 02:00 EST (-05) -> 03:00 EDT (-04).
    ("30 2 * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-10T03:00-04:00", "2024-03-11T02:30-04:00"]),
    ("0 */2 * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-10T03:00-04:00", "2024-03-10T04:00-04:00"]),
    ("30 1-3 * * *", NY, "2024-03-10T01:00-05:00",
     ["2024-03-10T01:30-05:00", "2024-03-10T03:00-04:00", "2024-03-10T03:30-04:00"]),
    ("0 0 2 * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-10T03:00:00-04:00", "2024-03-11T02:00:00-04:00"]),
    # Spring forward, more than one slot per hour: no slots in the gap, and no catch-up.
    ("*/15 2 * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-11T02:00-04:00", "2024-03-11T02:15-04:00"]),
    ("15,45 1-6 * * *", NY, "2024-03-10T01:30-05:00", ["2024-03-10T01:45-05:00", "2024-03-10T03:15-04:00"]),
    ("* 0 2 * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-11T02:00:00-04:00", "2024-03-11T02:00:01-04:00"]),
    # Spring forward, every hour: the gap hour has no firing; a real slot at the gap's end stays.
    ("0 * * * *", NY, "2024-03-10T01:00-05:00", ["2024-03-10T03:00-04:00", "2024-03-10T04:00-04:00"]),
    ("0,30 0 * * * *", NY, "2024-03-10T01:01-05:00", ["2024-03-10T03:00:00-04:00", "2024-03-10T03:00:30-04:00"]),
    # Fall back, one slot per hour in some hours only: first occurrence only. New York 2024-11-03:
    # 02:00 EDT (-04) -> 01:00 EST (-05).
    ("30 1 * * *", NY, "2024-11-03T00:00-04:00", ["2024-11-03T01:30-04:00", "2024-11-04T01:30-05:00"]),
    ("0 1-3 * * *", NY, "2024-11-03T00:30-04:00",
     ["2024-11-03T01:00-04:00", "2024-11-03T02:00-05:00", "2024-11-03T03:00-05:00"]),
    ("30 0 1 * * *", NY, "2024-11-03T00:30-04:00", ["2024-11-03T01:00:30-04:00", "2024-11-04T01:00:30-05:00"]),
    # Fall back, every hour (one slot per hour): both passes.
    ("0 * * * *", NY, "2024-11-03T00:30-04:00",
     ["2024-11-03T01:00-04:00", "2024-11-03T01:00-05:00", "2024-11-03T02:00-05:00"]),
    ("0 0-23 * * *", NY, "2024-11-03T00:30-04:00",
     ["2024-11-03T01:00-04:00", "2024-11-03T01:00-05:00", "2024-11-03T02:00-05:00"]),
    ("30 0 * * * *", NY, "2024-11-03T00:30-04:00",
     ["2024-11-03T01:00:30-04:00", "2024-11-03T01:00:30-05:00", "2024-11-03T02:00:30-05:00"]),
    ("7 * * * *", LONDON, "2024-10-27T00:30+01:00",  # 02:00 BST -> 01:00 GMT
     ["2024-10-27T01:07+01:00", "2024-10-27T01:07+00:00", "2024-10-27T02:07+00:00"]),
    # Fall back, more than one slot per hour (here two seconds of minute 0): both passes.
    ("0,30 0 * * * *", NY, "2024-11-03T00:30-04:00", [
        "2024-11-03T01:00:00-04:00", "2024-11-03T01:00:30-04:00",
        "2024-11-03T01:00:00-05:00", "2024-11-03T01:00:30-05:00", "2024-11-03T02:00:00-05:00",
    ]),
    # Southern hemisphere. Sydney 2024-10-06: 02:00 AEST (+10) -> 03:00 AEDT (+11).
    ("7 * * * *", SYDNEY, "2024-10-06T01:00+10:00", ["2024-10-06T01:07+10:00", "2024-10-06T03:07+11:00"]),
    ("30 2 * * *", SYDNEY, "2024-10-06T01:00+10:00", ["2024-10-06T03:00+11:00", "2024-10-07T02:30+11:00"]),
    ("*/20 2 * * *", SYDNEY, "2024-10-06T01:00+10:00", ["2024-10-07T02:00+11:00"]),
    # Sydney 2024-04-07: 03:00 AEDT -> 02:00 AEST, 02:00-02:59 happens twice.
    ("*/20 2 * * *", SYDNEY, "2024-04-07T01:00+11:00", [
        "2024-04-07T02:00+11:00", "2024-04-07T02:20+11:00", "2024-04-07T02:40+11:00",
        "2024-04-07T02:00+10:00", "2024-04-07T02:20+10:00", "2024-04-07T02:40+10:00", "2024-04-08T02:00+10:00",
    ]),
    ("0 * * * *", SYDNEY, "2024-04-07T01:30+11:00",
     ["2024-04-07T02:00+11:00", "2024-04-07T02:00+10:00", "2024-04-07T03:00+10:00"]),
    ("30 2 * * *", SYDNEY, "2024-04-07T01:00+11:00", ["2024-04-07T02:30+11:00", "2024-04-08T02:30+10:00"]),
    # Santiago: the gap is midnight (2024-09-08 00:00 -04 -> 01:00 -03); 23:00 repeats on 2024-04-06.
    ("0 0 * * *", SANTIAGO, "2024-09-07T12:00-04:00", ["2024-09-08T01:00-03:00", "2024-09-09T00:00-03:00"]),
    ("0 * * * *", SANTIAGO, "2024-09-07T22:30-04:00", ["2024-09-07T23:00-04:00", "2024-09-08T01:00-03:00"]),
    ("*/30 23 * * *", SANTIAGO, "2024-04-06T22:00-03:00", [
        "2024-04-06T23:00-03:00", "2024-04-06T23:30-03:00", "2024-04-06T23:00-04:00", "2024-04-06T23:30-04:00",
    ]),
    ("30 23 * * *", SANTIAGO, "2024-04-06T22:00-03:00", ["2024-04-06T23:30-03:00", "2024-04-07T23:30-04:00"]),
    # Lord Howe, 30-minute shifts. 2024-10-06: 02:00 (+10:30) -> 02:30 (+11), gap 02:00-02:29.
    ("0 * * * *", LORD_HOWE, "2024-10-06T00:30+10:30", ["2024-10-06T01:00+10:30", "2024-10-06T03:00+11:00"]),
    ("30 * * * *", LORD_HOWE, "2024-10-06T01:00+10:30", ["2024-10-06T01:30+10:30", "2024-10-06T02:30+11:00"]),
    ("15 2 * * *", LORD_HOWE, "2024-10-06T01:00+10:30", ["2024-10-06T02:30+11:00", "2024-10-07T02:15+11:00"]),
    ("*/20 2 * * *", LORD_HOWE, "2024-10-06T01:00+10:30", ["2024-10-06T02:40+11:00", "2024-10-07T02:00+11:00"]),
    # Lord Howe 2024-04-07: 02:00 (+11) -> 01:30 (+10:30), 01:30-01:59 happens twice.
    ("*/20 1 * * *", LORD_HOWE, "2024-04-07T00:30+11:00", [
        "2024-04-07T01:00+11:00", "2024-04-07T01:20+11:00", "2024-04-07T01:40+11:00",
        "2024-04-07T01:40+10:30", "2024-04-08T01:00+10:30",
    ]),
    # Every hour: a slot in the repeated half hour fires in both passes (14:30Z, then 15:00Z) ...
    ("30 * * * *", LORD_HOWE, "2024-04-07T01:00+11:00",
     ["2024-04-07T01:30+11:00", "2024-04-07T01:30+10:30", "2024-04-07T02:30+10:30"]),
    ("45 * * * *", LORD_HOWE, "2024-04-07T01:00+11:00",
     ["2024-04-07T01:45+11:00", "2024-04-07T01:45+10:30", "2024-04-07T02:45+10:30"]),
    # ... one outside it fires once, 1.5 hours apart (01:00 is not repeated) ...
    ("0 * * * *", LORD_HOWE, "2024-04-07T00:30+11:00", ["2024-04-07T01:00+11:00", "2024-04-07T02:00+10:30"]),
    # ... and a schedule pinned to hour 1 fires its repeated slot once.
    ("45 1 * * *", LORD_HOWE, "2024-04-07T01:00+11:00", ["2024-04-07T01:45+11:00", "2024-04-08T01:45+10:30"]),
]


@pytest.mark.parametrize("cron, tz, after, expected", RULE_CASES)
def test_dst_rules_exact_instants(cron: str, tz: str, after: str, expected: list[str]) -> None:
    zone = ZoneInfo(tz)
    start, want = dt.datetime.fromisoformat(after), [dt.datetime.fromisoformat(x) for x in expected]
    for instant in (start, *want):  # the table's offsets are the zone's: no typo, no wall time in a gap
        assert instant.astimezone(zone).utcoffset() == instant.utcoffset(), instant
    assert firings(cron, tz, start, len(want)) == want


# --------------------------------------------------------------------------- firings per local day


@pytest.mark.parametrize(
    "cron, tz, day, count",
    [
        ("0 * * * *", NY, (2024, 6, 1), 24),
        ("0 * * * *", NY, (2024, 3, 10), 23),
        ("0 * * * *", NY, (2024, 11, 3), 25),  # every hour: 01:00 EDT and 01:00 EST
        ("@hourly", NY, (2024, 11, 3), 25),
        ("0 0-23 * * *", NY, (2024, 11, 3), 25),  # decided by expanded values, not spelling
        ("30 0 * * * *", NY, (2024, 11, 3), 25),
        ("0 1-3 * * *", NY, (2024, 11, 3), 3),  # some hours only: 01:00 once
        ("0 0-22 * * *", NY, (2024, 11, 3), 23),  # 23 of 24 hours is not every hour
        ("30 * * * *", NY, (2024, 3, 10), 23),
        ("30 * * * *", NY, (2024, 11, 3), 25),
        ("7 * * * *", LONDON, (2025, 3, 30), 23),
        ("7 * * * *", LONDON, (2024, 10, 27), 25),
        ("0 * * * *", "Europe/Berlin", (2024, 10, 27), 25),
        ("*/15 * * * *", NY, (2024, 3, 10), 92),
        ("*/15 * * * *", NY, (2024, 11, 3), 100),
        ("30 2 * * *", NY, (2024, 3, 10), 1),
        ("30 1 * * *", NY, (2024, 11, 3), 1),
        ("0 */2 * * *", NY, (2024, 3, 10), 12),  # 02:00 fires at 03:00
        ("*/15 2 * * *", NY, (2024, 3, 10), 0),
        ("*/20 1 * * *", NY, (2024, 11, 3), 6),
        ("* 1-6 * * *", RIGA, (2021, 10, 31), 6 * 60 + 60),
        ("0 * * * *", SYDNEY, (2024, 10, 6), 23),
        ("0 * * * *", SYDNEY, (2024, 4, 7), 25),
        ("30 2 * * *", SYDNEY, (2024, 4, 7), 1),
        ("30 2 * * *", SYDNEY, (2024, 10, 6), 1),
        ("*/20 2 * * *", SYDNEY, (2024, 4, 7), 6),
        ("* 1-6 * * *", SYDNEY, (2024, 10, 6), 5 * 60),
        ("* 1-6 * * *", SYDNEY, (2024, 4, 7), 6 * 60 + 60),
        ("0 * * * *", LORD_HOWE, (2024, 10, 6), 23),  # a 23.5-hour day without 02:00
        ("30 * * * *", LORD_HOWE, (2024, 10, 6), 24),  # 02:30 exists
        ("0 * * * *", LORD_HOWE, (2024, 4, 7), 24),  # no :00 slot in the repeated 01:30-01:59
        ("30 * * * *", LORD_HOWE, (2024, 4, 7), 25),  # 01:30 in both passes
        ("45 1 * * *", LORD_HOWE, (2024, 4, 7), 1),  # hour 1 only: once
        ("15 2 * * *", LORD_HOWE, (2024, 10, 6), 1),
        ("*/20 1 * * *", LORD_HOWE, (2024, 4, 7), 4),  # 01:40 twice
        ("* 1-6 * * *", LORD_HOWE, (2024, 10, 6), 6 * 60 - 30),
        ("* 1-6 * * *", LORD_HOWE, (2024, 4, 7), 6 * 60 + 30),
    ],
)
def test_fake_clock_firings_per_local_day(cron: str, tz: str, day: tuple[int, int, int], count: int) -> None:
    """FakeClock (the clock actor's step, driven without sleeping) across a whole local day."""
    zone = ZoneInfo(tz)
    start = dt.datetime(*day, tzinfo=zone).astimezone(UTC)
    end = (dt.datetime(*day, tzinfo=zone) + dt.timedelta(days=1)).astimezone(UTC)  # next local midnight
    clock = FakeClock([ScheduleSpec("s", cron, tz=tz)], start - dt.timedelta(microseconds=1))
    fired = [slot for _, slot in clock.advance_to(end - dt.timedelta(microseconds=1))]
    assert len(fired) == count
    assert all(start <= s < end for s in fired) and fired == sorted(set(fired))


def test_fake_clock_every_hour_fires_each_real_hour_on_fall_back_day() -> None:
    zone = ZoneInfo(NY)
    clock = FakeClock([ScheduleSpec("h", "0 * * * *", tz=NY)], at(NY, 2024, 11, 2, 23, 59))
    fired = [slot for _, slot in clock.advance_to(at(NY, 2024, 11, 3, 23, 59))]
    assert [s.astimezone(zone).hour for s in fired] == [0, 1, 1, *range(2, 24)]
    assert fired[1:3] == [at(NY, 2024, 11, 3, 1, 0), at(NY, 2024, 11, 3, 1, 0, fold=1)]
    assert all(b - a == dt.timedelta(hours=1) for a, b in itertools.pairwise(fired))


def test_fall_back_every_hour_replays_01_00_while_hour_1_fires_once() -> None:
    """The two conditions of the replay rule, side by side on one fall-back day: "0 * * * *"
    (every hour) fires local 01:00 twice, at two UTC instants; "0 1 * * *" (one slot, hour 1
    only) fires it once. Neither has more than one slot per hour."""
    specs = [ScheduleSpec("every_hour", "0 * * * *", tz=NY), ScheduleSpec("at_one", "0 1 * * *", tz=NY)]
    clock = FakeClock(specs, at(NY, 2024, 11, 2, 23, 59))
    fired = clock.advance_to(at(NY, 2024, 11, 3, 23, 59))
    zone = ZoneInfo(NY)
    at_01 = [(name, slot) for name, slot in fired if slot.astimezone(zone).hour == 1]
    assert at_01 == [
        ("every_hour", dt.datetime(2024, 11, 3, 5, tzinfo=UTC)),  # 01:00 EDT
        ("at_one", dt.datetime(2024, 11, 3, 5, tzinfo=UTC)),
        ("every_hour", dt.datetime(2024, 11, 3, 6, tzinfo=UTC)),  # 01:00 EST
    ]
    assert [name for name, _ in fired].count("every_hour") == 25
    assert [name for name, _ in fired].count("at_one") == 1


def test_restart_inside_the_repeated_hour_fires_each_pass_once() -> None:
    """A persisted last_slot from the first pass resumes at the second pass, and from the second
    pass does not replay the first: exactly once per slot across the repeat."""
    spec = ScheduleSpec("p", "*/20 1 * * *", tz=NY, misfire="run_once")
    st = resume_state(spec, at(NY, 2024, 11, 3, 1, 40), at(NY, 2024, 11, 3, 1, 45))
    assert st.next_slot == at(NY, 2024, 11, 3, 1, 0, fold=1)
    fired, st = step(st, at(NY, 2024, 11, 3, 1, 0, fold=1))
    assert fired == [at(NY, 2024, 11, 3, 1, 0, fold=1)]
    st = resume_state(spec, at(NY, 2024, 11, 3, 1, 40, fold=1), at(NY, 2024, 11, 3, 1, 45, fold=1))
    assert st.next_slot == at(NY, 2024, 11, 4, 1, 0)


def test_downtime_across_the_gap_catches_up_a_real_slot_only() -> None:
    """run_once after downtime over the gap fires the latest real slot, never a gap-end extra."""
    spec = ScheduleSpec("h", "7 * * * *", tz=LONDON, misfire="run_once")
    clock = FakeClock([spec], dt.datetime(2025, 3, 30, 0, 30, tzinfo=UTC))
    assert clock.down_until(at(LONDON, 2025, 3, 30, 2, 30)) == [("h", at(LONDON, 2025, 3, 30, 2, 7))]
    clock = FakeClock([spec], dt.datetime(2025, 3, 30, 0, 30, tzinfo=UTC))
    assert clock.down_until(at(LONDON, 2025, 3, 30, 2, 5)) == []  # nothing was due: 01:07 never existed


# --------------------------------------------------------------------------- the slot set is well defined


@pytest.mark.parametrize(
    "tz, day",
    [
        (LONDON, (2025, 3, 30)), (RIGA, (2021, 10, 31)),
        (SYDNEY, (2024, 10, 6)), (SYDNEY, (2024, 4, 7)),
        (LORD_HOWE, (2024, 10, 6)), (LORD_HOWE, (2024, 4, 7)),
        (SANTIAGO, (2024, 9, 8)), (SANTIAGO, (2024, 4, 6)),
    ],
)
@pytest.mark.parametrize(
    "cron", ["7 * * * *", "*/20 1-3 * * *", "15,45 * * * *", "30 2 * * *", "0 */2 * * *", "0,30 0 * * * *"]
)
def test_next_fire_is_the_least_slot_after_any_instant(tz: str, day: tuple[int, int, int], cron: str) -> None:
    """next_fire(x) is the least slot > x for every x, so step()'s bisection stays exact."""
    spec = ScheduleSpec("c", cron, tz=tz)
    start = dt.datetime(*day, 12, tzinfo=ZoneInfo(tz)).astimezone(UTC) - dt.timedelta(hours=15)
    end = start + dt.timedelta(hours=30)
    got, t = [], start
    while (t := next_fire(spec, t)) <= end:
        got.append(t)
    assert got == sorted(set(got)) and got
    ordered = [*got, next_fire(spec, end)]
    probes = [start + dt.timedelta(minutes=7 * i) for i in range(30 * 60 // 7)]
    probes += [s + d for s in got for d in (-dt.timedelta(microseconds=1), dt.timedelta(0))]
    for x in probes:
        assert next_fire(spec, x) == ordered[bisect.bisect_right(ordered, x)], x


# --------------------------------------------------------------------------- day-of-month with day-of-week


def test_day_of_month_and_day_of_week_combine_as_a_union_when_both_are_restricted() -> None:
    """croniter's rule, documented in docs/schedules.md: both restricted -> either matches; a field
    that merely starts with "*" (like "*/2") still counts as restricted, unlike Vixie cron."""
    jan = dt.datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
    days = [s.day for s in firings("0 0 1,15 * mon", "UTC", jan, 5)]
    assert days == [8, 15, 22, 29, 1]  # Mondays, the 15th, and Thu 1 Feb
    odd_or_monday = [s.day for s in firings("0 0 */2 * mon", "UTC", jan, 6)]
    assert odd_or_monday == [3, 5, 7, 8, 9, 11]  # Vixie cron: odd-day Mondays only (15th, 29th)
    assert [s.day for s in firings("0 0 * * mon", "UTC", jan, 2)] == [8, 15]  # one restricted: it alone
    assert [s.day for s in firings("0 0 13 * *", "UTC", jan, 2)] == [13, 13]
