"""Pure tests of capsule_actors.schedules: no processes, no sleeping, no real clock."""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import doctest
import itertools
import pickle
import time
from zoneinfo import ZoneInfo

import pytest

from capsule_actors import schedules as sch
from capsule_actors.errors import CapsuleError, ConfigError
from capsule_actors.schedules import (
    FakeClock,
    ScheduleSpec,
    ScheduleState,
    first_state,
    next_fire,
    resume_state,
    seconds_until,
    step,
)

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")


def u(*args: int, micro: int = 0) -> dt.datetime:
    """An aware UTC datetime."""
    return dt.datetime(*args, microsecond=micro, tzinfo=UTC)


def slots(spec: ScheduleSpec, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Every slot in (start, end], by iterating next_fire."""
    out, t = [], start
    while True:
        t = next_fire(spec, t)
        if t > end:
            return out
        out.append(t)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"cron": "not a cron"}, "not a cron"),
        ({"cron": "61 * * * *"}, "61 * * * *"),
        ({"cron": "*/0 * * * *"}, "*/0 * * * *"),
        ({"cron": "* * * * * * *"}, "* * * * * * *"),  # croniter's year form: not accepted
        ({"cron": "* * * *"}, "* * * *"),
        ({"cron": "H * * * *"}, "H * * * *"),
        ({"cron": "0 0 31 2 *"}, "0 0 31 2 *"),  # valid syntax, never fires
        ({"cron": "@reboot"}, "@reboot"),
        ({"cron": 5}, "5"),
        ({"tz": "Mars/Base"}, "Mars/Base"),
        ({"tz": "America"}, "America"),  # a directory of the tz database
        ({"tz": ""}, "''"),
        ({"tz": None}, "None"),
        ({"misfire": "twice"}, "twice"),
        ({"misfire": "run-once"}, "run-once"),
        ({"grace": -1}, "-1"),
        ({"grace": float("nan")}, "nan"),
        ({"grace": "1"}, "'1'"),
    ],
)
def test_invalid_spec_names_the_bad_value(kwargs: dict, bad: str) -> None:
    args = {"name": "digest", "cron": "*/5 * * * *", **kwargs}
    with pytest.raises(ConfigError) as info:
        ScheduleSpec(**args)
    msg = str(info.value)
    assert bad in msg
    assert "'digest'" in msg
    assert isinstance(info.value, CapsuleError) and isinstance(info.value, ValueError)


def test_validation_messages_say_what_is_right() -> None:
    with pytest.raises(ConfigError, match=r"7 fields.*5 fields.*6 fields.*seconds first"):
        ScheduleSpec("x", "0 0 0 1 1 * 2030")
    with pytest.raises(ConfigError, match="IANA"):
        ScheduleSpec("x", "* * * * *", tz="Nowhere/City")
    with pytest.raises(ConfigError, match=r"skip.*run_once"):
        ScheduleSpec("x", "* * * * *", misfire="always")
    with pytest.raises(ConfigError, match="name"):
        ScheduleSpec("", "* * * * *")


def test_valid_specs_and_defaults() -> None:
    spec = ScheduleSpec("digest", "*/5 * * * *")
    assert (spec.tz, spec.misfire, spec.grace) == ("UTC", "skip", 1.0)
    assert sch.MISFIRE == ("skip", "run_once")
    ScheduleSpec("a", "*/2 * * * * *", tz="Europe/Berlin", misfire="run_once", grace=0)
    ScheduleSpec("b", "@hourly")
    ScheduleSpec("c", "0 0 29 2 *")  # leap day: rare but fires
    ScheduleSpec("d", "0 9 * * mon-fri", tz="America/New_York")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.cron = "* * * * *"  # type: ignore[misc]


def test_spec_pickles_for_other_processes() -> None:
    spec = ScheduleSpec("digest", "*/5 * * * *", tz="Europe/Berlin", misfire="run_once", grace=2.5)
    assert pickle.loads(pickle.dumps(spec)) == spec


# --------------------------------------------------------------------------- next_fire


def test_next_fire_five_fields_is_strictly_after() -> None:
    spec = ScheduleSpec("five", "*/5 * * * *")
    assert next_fire(spec, u(2024, 5, 1, 10, 3, 27)) == u(2024, 5, 1, 10, 5)
    assert next_fire(spec, u(2024, 5, 1, 10, 5)) == u(2024, 5, 1, 10, 10)
    assert next_fire(spec, u(2024, 5, 1, 10, 4, 59, micro=999999)) == u(2024, 5, 1, 10, 5)
    assert next_fire(spec, u(2024, 5, 1, 23, 58)) == u(2024, 5, 2, 0, 0)


def test_next_fire_accepts_any_timezone_and_returns_utc() -> None:
    spec = ScheduleSpec("five", "*/5 * * * *")
    after = dt.datetime(2024, 5, 1, 12, 3, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    got = next_fire(spec, after)
    assert got == u(2024, 5, 1, 10, 5) and got.tzinfo is UTC


def test_next_fire_rejects_naive_datetimes() -> None:
    spec = ScheduleSpec("five", "*/5 * * * *")
    with pytest.raises(ConfigError, match="aware"):
        next_fire(spec, dt.datetime(2024, 5, 1))
    with pytest.raises(ConfigError, match="aware"):
        first_state(spec, dt.datetime(2024, 5, 1))


def test_six_fields_seconds_come_first() -> None:
    every2 = ScheduleSpec("every2", "*/2 * * * * *")
    assert slots(every2, u(2024, 1, 1), u(2024, 1, 1, 0, 0, 7)) == [
        u(2024, 1, 1, 0, 0, 2), u(2024, 1, 1, 0, 0, 4), u(2024, 1, 1, 0, 0, 6),
    ]
    assert next_fire(every2, u(2024, 1, 1, 0, 0, 59)) == u(2024, 1, 1, 0, 1, 0)
    at15 = ScheduleSpec("at15", "15 * * * * *")  # second 15 of every minute
    assert slots(at15, u(2024, 1, 1), u(2024, 1, 1, 0, 2)) == [u(2024, 1, 1, 0, 0, 15), u(2024, 1, 1, 0, 1, 15)]
    hourly_at_30s = ScheduleSpec("h", "30 0 * * * *")  # second 30, minute 0, every hour
    assert next_fire(hourly_at_30s, u(2024, 1, 1, 0, 0, 31)) == u(2024, 1, 1, 1, 0, 30)


def test_six_fields_sub_second_after() -> None:
    spec = ScheduleSpec("s", "* * * * * *")
    assert next_fire(spec, u(2024, 1, 1, 0, 0, 0, micro=500000)) == u(2024, 1, 1, 0, 0, 1)


def test_schedule_timezone_is_respected() -> None:
    spec = ScheduleSpec("nine", "0 9 * * *", tz="America/New_York")
    assert next_fire(spec, u(2024, 1, 15)) == u(2024, 1, 15, 14, 0)  # EST
    assert next_fire(spec, u(2024, 7, 15)) == u(2024, 7, 15, 13, 0)  # EDT
    weekdays = ScheduleSpec("wd", "0 9 * * mon-fri", tz="Europe/Berlin")
    assert next_fire(weekdays, u(2024, 6, 7, 8)) == u(2024, 6, 10, 7, 0)  # Fri after 10:00 CEST -> Mon


# --------------------------------------------------------------------------- DST


def test_spring_forward_new_york_missing_time_fires_once_after_gap() -> None:
    # 2024-03-10: 02:00 EST -> 03:00 EDT (07:00 UTC); 02:30 does not exist.
    spec = ScheduleSpec("x", "30 2 * * *", tz="America/New_York")
    assert slots(spec, u(2024, 3, 9, 12), u(2024, 3, 12, 12)) == [
        u(2024, 3, 10, 7, 0),  # 03:00 EDT, right after the gap
        u(2024, 3, 11, 6, 30),  # 02:30 EDT
        u(2024, 3, 12, 6, 30),
    ]


def test_spring_forward_gap_slots_collapse_into_one_firing() -> None:
    quarter = ScheduleSpec("q", "*/15 * * * *", tz="America/New_York")
    assert slots(quarter, u(2024, 3, 10, 6, 30), u(2024, 3, 10, 7, 30)) == [
        u(2024, 3, 10, 6, 45),  # 01:45 EST
        u(2024, 3, 10, 7, 0),  # 03:00 EDT: 02:00..02:45 do not exist, no extra firing
        u(2024, 3, 10, 7, 15),
        u(2024, 3, 10, 7, 30),
    ]
    hourly = ScheduleSpec("h", "0 * * * *", tz="America/New_York")
    assert slots(hourly, u(2024, 3, 10, 5, 30), u(2024, 3, 10, 8, 0)) == [
        u(2024, 3, 10, 6), u(2024, 3, 10, 7), u(2024, 3, 10, 8),  # 01:00 EST, 03:00 EDT, 04:00 EDT
    ]


def test_spring_forward_berlin() -> None:
    # 2024-03-31: 02:00 CET -> 03:00 CEST at 01:00 UTC.
    daily = ScheduleSpec("x", "30 2 * * *", tz="Europe/Berlin")
    assert slots(daily, u(2024, 3, 30, 12), u(2024, 4, 1, 12)) == [u(2024, 3, 31, 1, 0), u(2024, 4, 1, 0, 30)]
    at_two = ScheduleSpec("y", "0 2 * * *", tz="Europe/Berlin")
    assert next_fire(at_two, u(2024, 3, 30, 12)) == u(2024, 3, 31, 1, 0)
    seconds = ScheduleSpec("s", "*/20 * * * * *", tz="Europe/Berlin")
    assert slots(seconds, u(2024, 3, 31, 0, 59, 30), u(2024, 3, 31, 1, 0, 30)) == [
        u(2024, 3, 31, 0, 59, 40), u(2024, 3, 31, 1, 0, 0), u(2024, 3, 31, 1, 0, 20),
    ]


def test_fall_back_new_york_repeated_time_fires_once_at_first_occurrence() -> None:
    # 2024-11-03: 02:00 EDT -> 01:00 EST at 06:00 UTC; 01:00-01:59 happens twice.
    spec = ScheduleSpec("x", "30 1 * * *", tz="America/New_York")
    assert slots(spec, u(2024, 11, 2, 12), u(2024, 11, 4, 12)) == [
        u(2024, 11, 3, 5, 30),  # 01:30 EDT only, not 01:30 EST (06:30 UTC)
        u(2024, 11, 4, 6, 30),
    ]
    # Asked from inside the second pass, it still does not fire the repeated time.
    assert next_fire(spec, u(2024, 11, 3, 6, 10)) == u(2024, 11, 4, 6, 30)
    some_hours = ScheduleSpec("s", "0 1-3 * * *", tz="America/New_York")  # one slot per hour, hours 1-3
    assert slots(some_hours, u(2024, 11, 3, 4), u(2024, 11, 3, 9)) == [
        u(2024, 11, 3, 5), u(2024, 11, 3, 7), u(2024, 11, 3, 8),  # 01 EDT, 02 EST, 03 EST: not 01 EST
    ]


def test_fall_back_new_york_periodic_schedules_follow_real_time() -> None:
    hourly = ScheduleSpec("h", "0 * * * *", tz="America/New_York")  # every hour: both passes
    assert slots(hourly, u(2024, 11, 3, 4, 30), u(2024, 11, 3, 8)) == [
        u(2024, 11, 3, 5), u(2024, 11, 3, 6), u(2024, 11, 3, 7), u(2024, 11, 3, 8),  # 01 EDT, 01 EST, 02, 03
    ]
    assert next_fire(hourly, u(2024, 11, 3, 5, 0)) == u(2024, 11, 3, 6, 0)  # 01:00 EDT -> 01:00 EST
    assert next_fire(hourly, u(2024, 11, 3, 5, 30)) == u(2024, 11, 3, 6, 0)
    assert next_fire(hourly, u(2024, 11, 3, 6, 10)) == u(2024, 11, 3, 7, 0)
    assert next_fire(hourly, u(2024, 11, 3, 6, 0)) == u(2024, 11, 3, 7, 0)  # at the transition itself
    every20 = ScheduleSpec("t", "*/20 * * * *", tz="America/New_York")
    got = slots(every20, u(2024, 11, 3, 4, 50), u(2024, 11, 3, 7, 10))
    assert got == [u(2024, 11, 3, 4, 50) + dt.timedelta(minutes=10 + 20 * i) for i in range(7)]
    # From the end of the first pass the next slot is the start of the second pass.
    assert next_fire(every20, u(2024, 11, 3, 5, 50)) == u(2024, 11, 3, 6, 0)
    # From inside the second pass.
    assert next_fire(every20, u(2024, 11, 3, 6, 10)) == u(2024, 11, 3, 6, 20)
    pinned = ScheduleSpec("p", "*/20 1 * * *", tz="America/New_York")  # pinned to hour 1: both passes
    assert slots(pinned, u(2024, 11, 3, 4), u(2024, 11, 3, 8)) == [
        u(2024, 11, 3, 5, 0), u(2024, 11, 3, 5, 20), u(2024, 11, 3, 5, 40),  # EDT
        u(2024, 11, 3, 6, 0), u(2024, 11, 3, 6, 20), u(2024, 11, 3, 6, 40),  # EST
    ]
    assert next_fire(pinned, u(2024, 11, 3, 6, 10)) == u(2024, 11, 3, 6, 20)


def test_fall_back_berlin() -> None:
    # 2024-10-27: 03:00 CEST -> 02:00 CET at 01:00 UTC; 02:00-02:59 happens twice.
    daily = ScheduleSpec("x", "30 2 * * *", tz="Europe/Berlin")
    assert slots(daily, u(2024, 10, 26, 12), u(2024, 10, 28, 12)) == [u(2024, 10, 27, 0, 30), u(2024, 10, 28, 1, 30)]
    hourly = ScheduleSpec("h", "0 * * * *", tz="Europe/Berlin")
    assert slots(hourly, u(2024, 10, 26, 23, 30), u(2024, 10, 27, 2, 0)) == [
        u(2024, 10, 27, 0), u(2024, 10, 27, 1), u(2024, 10, 27, 2),  # 02 CEST, 02 CET, 03 CET
    ]
    two_hourly = ScheduleSpec("2h", "0 */2 * * *", tz="Europe/Berlin")  # pinned hours: no replay
    assert slots(two_hourly, u(2024, 10, 26, 21, 30), u(2024, 10, 27, 4)) == [
        u(2024, 10, 26, 22), u(2024, 10, 27, 0), u(2024, 10, 27, 3),  # 00 CEST, 02 CEST, 04 CET
    ]


@pytest.mark.parametrize("tz, day", [
    ("America/New_York", (2024, 3, 10)), ("America/New_York", (2024, 11, 3)),
    ("Europe/Berlin", (2024, 3, 31)), ("Europe/Berlin", (2024, 10, 27)),
    ("Australia/Lord_Howe", (2024, 4, 7)), ("Australia/Lord_Howe", (2024, 10, 6)),  # 30-minute shifts
])
@pytest.mark.parametrize("cron", [
    "0 * * * *", "*/20 * * * *", "30 1 * * *", "30 2 * * *", "*/20 1,2 * * *", "15 */2 * * *",
    "0,30 */3 * * * *",
])
def test_next_fire_is_consistent_across_dst(tz: str, day: tuple[int, int, int], cron: str) -> None:
    """next_fire(x) is the least slot > x for every x: the slot set is well defined, which the
    bisection in step() relies on. Slots are strictly increasing."""
    spec = ScheduleSpec("c", cron, tz=tz)
    start = dt.datetime(*day, tzinfo=ZoneInfo(tz)).astimezone(UTC) - dt.timedelta(hours=3)
    end = start + dt.timedelta(hours=30)
    got = slots(spec, start, end)
    assert got == sorted(set(got))
    probes = [start + dt.timedelta(minutes=7 * i) for i in range(30 * 60 // 7)]
    probes += [s + d for s in got for d in (-dt.timedelta(microseconds=1), dt.timedelta(0))]
    ordered = [*got, next_fire(spec, end)]
    for x in probes:
        assert next_fire(spec, x) == ordered[bisect.bisect_right(ordered, x)], x


# --------------------------------------------------------------------------- step


def test_first_state_never_fires_past_or_current_slots() -> None:
    spec = ScheduleSpec("m", "* * * * *")
    st = first_state(spec, u(2024, 1, 1, 10, 0))  # exactly on a slot
    assert st.last_slot is None and st.next_slot == u(2024, 1, 1, 10, 1)
    assert step(st, u(2024, 1, 1, 10, 0, 30)) == ([], st)


def test_every_minute_stepping() -> None:
    spec = ScheduleSpec("m", "* * * * *")
    st = first_state(spec, u(2024, 1, 1, 10, 0, 30))
    fired = []
    for minute in range(1, 11):
        now = u(2024, 1, 1, 10, minute, 0, micro=200000)  # 0.2 s late: within grace
        assert seconds_until(st, now) == 0
        got, st = step(st, now)
        fired += got
        assert step(st, now)[0] == []  # same now again: nothing
        assert seconds_until(st, now) == pytest.approx(59.8)
    assert fired == [u(2024, 1, 1, 10, m) for m in range(1, 11)]
    assert st.last_slot == u(2024, 1, 1, 10, 10) and st.next_slot == u(2024, 1, 1, 10, 11)


def test_step_does_not_mutate_state() -> None:
    spec = ScheduleSpec("m", "* * * * *")
    st = first_state(spec, u(2024, 1, 1))
    before = dataclasses.replace(st)
    step(st, u(2024, 1, 1, 0, 5))
    assert st == before


@pytest.mark.parametrize("misfire, expected", [("skip", []), ("run_once", [u(2024, 1, 1, 5)])])
def test_downtime_skip_vs_run_once(misfire: str, expected: list) -> None:
    spec = ScheduleSpec("h", "0 * * * *", misfire=misfire)
    st = first_state(spec, u(2024, 1, 1, 0, 0, 10))
    fired, st = step(st, u(2024, 1, 1, 5, 30))  # down: 01:00..05:00 all missed
    assert fired == expected
    assert st.last_slot == u(2024, 1, 1, 5) and st.next_slot == u(2024, 1, 1, 6)
    assert step(st, u(2024, 1, 1, 5, 30))[0] == []
    assert step(st, u(2024, 1, 1, 5, 59))[0] == []
    fired, st = step(st, u(2024, 1, 1, 6, 0, 0, micro=500))
    assert fired == [u(2024, 1, 1, 6)]  # back to normal


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_missed_plus_on_time_fires_exactly_once(misfire: str) -> None:
    spec = ScheduleSpec("h", "0 * * * *", misfire=misfire)
    st = first_state(spec, u(2024, 1, 1))
    fired, st = step(st, u(2024, 1, 1, 5, 0, 0, micro=300000))  # 01..04 missed, 05:00 on time
    assert fired == [u(2024, 1, 1, 5)]
    assert st.last_slot == u(2024, 1, 1, 5)


def test_grace_decides_on_time() -> None:
    spec = ScheduleSpec("h", "0 * * * *")
    st = first_state(spec, u(2024, 1, 1))
    assert step(st, u(2024, 1, 1, 1, 0, 0, micro=900000))[0] == [u(2024, 1, 1, 1)]
    assert step(st, u(2024, 1, 1, 1, 0, 1))[0] == [u(2024, 1, 1, 1)]  # exactly grace: on time
    assert step(st, u(2024, 1, 1, 1, 0, 1, micro=100000))[0] == []  # a stalled clock: missed, skipped
    lenient = ScheduleSpec("h", "0 * * * *", grace=30)
    assert step(first_state(lenient, u(2024, 1, 1)), u(2024, 1, 1, 1, 0, 29))[0] == [u(2024, 1, 1, 1)]
    strict = ScheduleSpec("h", "0 * * * *", grace=0)
    st = first_state(strict, u(2024, 1, 1))
    assert step(st, u(2024, 1, 1, 1))[0] == [u(2024, 1, 1, 1)]
    assert step(st, u(2024, 1, 1, 1, micro=1))[0] == []


def test_step_never_fires_a_slot_twice() -> None:
    spec = ScheduleSpec("h", "0 * * * *", misfire="run_once")
    st = first_state(spec, u(2024, 1, 1))
    fired, st2 = step(st, u(2024, 1, 1, 1))
    assert fired == [u(2024, 1, 1, 1)]
    assert step(st2, u(2024, 1, 1, 1)) == ([], st2)  # same now
    assert step(st2, u(2024, 1, 1, 0, 30)) == ([], st2)  # the clock stepped back
    assert step(st2, u(2023, 1, 1)) == ([], st2)


def test_seconds_level_step() -> None:
    spec = ScheduleSpec("s", "*/2 * * * * *")
    st = first_state(spec, u(2024, 1, 1))
    fired, st = step(st, u(2024, 1, 1, 0, 0, 2, micro=1000))
    assert fired == [u(2024, 1, 1, 0, 0, 2)]
    assert seconds_until(st, u(2024, 1, 1, 0, 0, 2, micro=1000)) == pytest.approx(1.999)
    # Two slots within grace (grace 3 s): only the latest fires.
    wide = ScheduleSpec("w", "* * * * * *", grace=3)
    fired, st = step(first_state(wide, u(2024, 1, 1)), u(2024, 1, 1, 0, 0, 3))
    assert fired == [u(2024, 1, 1, 0, 0, 3)]


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
@pytest.mark.parametrize("gap", [dt.timedelta(days=7), dt.timedelta(days=3650)])
def test_long_gap_on_per_second_schedule_is_bounded(monkeypatch: pytest.MonkeyPatch, misfire: str,
                                                    gap: dt.timedelta) -> None:
    spec = ScheduleSpec("s", "* * * * * *", misfire=misfire)
    st = first_state(spec, u(2024, 1, 1))
    calls = 0
    real = sch.next_fire

    def counting(spec: ScheduleSpec, after: dt.datetime) -> dt.datetime:
        nonlocal calls
        calls += 1
        return real(spec, after)

    monkeypatch.setattr(sch, "next_fire", counting)
    now = u(2024, 1, 1) + gap + dt.timedelta(milliseconds=500)
    t0 = time.perf_counter()
    fired, st = sch.step(st, now)
    assert time.perf_counter() - t0 < 1.0
    assert calls < 150  # bisection, not 600 000 (or 300 million) iterations
    latest = u(2024, 1, 1) + gap
    assert fired == [latest]  # 0.5 s late: on time for both policies
    assert st.last_slot == latest and st.next_slot == latest + dt.timedelta(seconds=1)


def test_long_gap_latest_slot_is_exact_for_sparse_schedules() -> None:
    spec = ScheduleSpec("d", "17 3 * * 2", tz="Europe/Berlin", misfire="run_once")  # Tue 03:17
    st = first_state(spec, u(2020, 1, 1))
    fired, st = step(st, u(2024, 7, 4, 12))  # Thursday
    assert fired == [u(2024, 7, 2, 1, 17)]  # Tue 2 July 03:17 CEST
    assert st.next_slot == u(2024, 7, 9, 1, 17)


def test_step_across_dst_gap_and_fold() -> None:
    spec = ScheduleSpec("x", "30 2 * * *", tz="Europe/Berlin", misfire="run_once")
    st = first_state(spec, u(2024, 3, 30, 12))
    fired, st = step(st, u(2024, 3, 31, 1, 0, 0, micro=10))
    assert fired == [u(2024, 3, 31, 1)]
    assert step(st, u(2024, 3, 31, 1, 30)) == ([], st)  # no second firing at wall 02:30/03:30
    st = first_state(spec, u(2024, 10, 26, 12))
    fired, st = step(st, u(2024, 10, 27, 0, 30))
    assert fired == [u(2024, 10, 27, 0, 30)]
    assert step(st, u(2024, 10, 27, 1, 30)) == ([], st)  # the repeated 02:30 CET does not fire


def test_seconds_until() -> None:
    spec = ScheduleSpec("h", "0 * * * *")
    st = first_state(spec, u(2024, 1, 1, 0, 59, 30))
    assert seconds_until(st, u(2024, 1, 1, 0, 59, 30)) == 30.0
    assert seconds_until(st, dt.datetime(2024, 1, 1, 1, 59, tzinfo=BERLIN)) == 60.0
    assert seconds_until(st, u(2024, 1, 1, 2)) == 0.0


@pytest.mark.parametrize("misfire, expected", [("skip", []), ("run_once", [u(2024, 1, 1, 5)])])
def test_resume_after_restart_from_persisted_last_slot(misfire: str, expected: list) -> None:
    spec = ScheduleSpec("h", "0 * * * *", misfire=misfire)
    st = resume_state(spec, u(2024, 1, 1, 0), u(2024, 1, 1, 5, 20))
    assert st.next_slot == u(2024, 1, 1, 1)
    fired, st = step(st, u(2024, 1, 1, 5, 20))
    assert fired == expected
    # Restarted right after a firing: the persisted slot is never fired again.
    again = resume_state(spec, u(2024, 1, 1, 5), u(2024, 1, 1, 5, 0, 0, micro=10))
    assert step(again, u(2024, 1, 1, 5, 0, 0, micro=10))[0] == []
    fresh = resume_state(spec, None, u(2024, 1, 1, 5, 20))
    assert fresh == first_state(spec, u(2024, 1, 1, 5, 20))


def test_schedule_state_fields() -> None:
    spec = ScheduleSpec("h", "0 * * * *")
    st = ScheduleState(spec=spec, last_slot=None, next_slot=u(2024, 1, 1, 1))
    assert step(st, u(2024, 1, 1, 1))[0] == [u(2024, 1, 1, 1)]


# --------------------------------------------------------------------------- FakeClock


def test_fake_clock_hourly_over_a_day() -> None:
    clock = FakeClock([ScheduleSpec("h", "0 * * * *")], u(2024, 1, 1))
    fired = clock.advance_to(u(2024, 1, 2))
    assert fired == [("h", u(2024, 1, 1) + dt.timedelta(hours=i)) for i in range(1, 25)]
    assert clock.now == u(2024, 1, 2)
    assert clock.advance_to(u(2024, 1, 2)) == []


@pytest.mark.parametrize("tz, day, count", [
    ("America/New_York", (2024, 3, 10), 23), ("America/New_York", (2024, 11, 3), 25),
    ("America/New_York", (2024, 6, 1), 24),
    ("Europe/Berlin", (2024, 3, 31), 23), ("Europe/Berlin", (2024, 10, 27), 25),
])
def test_fake_clock_hourly_across_a_dst_day(tz: str, day: tuple[int, int, int], count: int) -> None:
    zone = ZoneInfo(tz)
    start = dt.datetime(*day, tzinfo=zone)
    end = start + dt.timedelta(days=1)  # same-zone arithmetic is wall-clock: next local midnight
    clock = FakeClock([ScheduleSpec("h", "0 * * * *", tz=tz)], start - dt.timedelta(microseconds=1))
    fired = [slot for _, slot in clock.advance_to(end - dt.timedelta(microseconds=1))]
    assert len(fired) == count  # one per real hour of the local day
    assert fired[0] == start.astimezone(UTC)
    assert all(b - a == dt.timedelta(hours=1) for a, b in itertools.pairwise(fired))


def test_fake_clock_daily_across_dst_days_fires_once_per_day() -> None:
    clock = FakeClock([ScheduleSpec("d", "30 1 * * *", tz="America/New_York"),
                       ScheduleSpec("e", "30 2 * * *", tz="America/New_York")], u(2024, 1, 1))
    fired = clock.advance_to(u(2025, 1, 1))
    assert sum(1 for n, _ in fired if n == "d") == 366 and sum(1 for n, _ in fired if n == "e") == 366
    assert ("e", u(2024, 3, 10, 7)) in fired and ("d", u(2024, 11, 3, 5, 30)) in fired
    assert ("d", u(2024, 11, 3, 6, 30)) not in fired


def test_fake_clock_minutely_through_fall_back_follows_real_time() -> None:
    clock = FakeClock([ScheduleSpec("m", "* * * * *", tz="America/New_York")], u(2024, 11, 3, 4))
    fired = clock.advance_to(u(2024, 11, 3, 8))
    assert [slot for _, slot in fired] == [u(2024, 11, 3, 4) + dt.timedelta(minutes=i) for i in range(1, 241)]


def test_fake_clock_orders_several_schedules() -> None:
    clock = FakeClock([ScheduleSpec("b", "*/30 * * * *"), ScheduleSpec("a", "0 * * * *")], u(2024, 1, 1))
    assert clock.advance_to(u(2024, 1, 1, 1, 15)) == [
        ("b", u(2024, 1, 1, 0, 30)), ("b", u(2024, 1, 1, 1)), ("a", u(2024, 1, 1, 1)),
    ]
    assert clock.advance(dt.timedelta(minutes=15)) == [("b", u(2024, 1, 1, 1, 30))]
    assert clock.advance(1800) == [("b", u(2024, 1, 1, 2)), ("a", u(2024, 1, 1, 2))]
    assert set(clock.states) == {"a", "b"}
    assert clock.states["a"].last_slot == u(2024, 1, 1, 2)


def test_fake_clock_down_until_applies_misfire() -> None:
    specs = [ScheduleSpec("skip", "0 * * * *"), ScheduleSpec("once", "0 * * * *", misfire="run_once"),
             ScheduleSpec("soon", "*/7 * * * *", misfire="run_once")]
    clock = FakeClock(specs, u(2024, 1, 1))
    # Everything due is missed: "skip" drops it, "run_once" fires one catch-up each (time order).
    assert clock.down_until(u(2024, 1, 1, 5, 30)) == [("once", u(2024, 1, 1, 5)), ("soon", u(2024, 1, 1, 5, 28))]
    assert clock.now == u(2024, 1, 1, 5, 30)
    assert clock.states["skip"].last_slot == u(2024, 1, 1, 5)
    # Down until right after a slot: that slot is on time, so even "skip" fires it (ties in
    # registration order).
    assert clock.down_until(u(2024, 1, 1, 9, 0, 0, micro=500)) == [
        ("skip", u(2024, 1, 1, 9)), ("once", u(2024, 1, 1, 9)), ("soon", u(2024, 1, 1, 9)),
    ]
    # Back to normal driving: every slot fires on time.
    assert clock.advance_to(u(2024, 1, 1, 10)) == [
        ("soon", u(2024, 1, 1, 9, 7 * i)) for i in range(1, 9)
    ] + [("skip", u(2024, 1, 1, 10)), ("once", u(2024, 1, 1, 10)), ("soon", u(2024, 1, 1, 10))]


def test_fake_clock_rejects_bad_use() -> None:
    spec = ScheduleSpec("h", "0 * * * *")
    with pytest.raises(ConfigError, match="'h'"):
        FakeClock([spec, spec], u(2024, 1, 1))
    with pytest.raises(ConfigError, match="aware"):
        FakeClock([spec], dt.datetime(2024, 1, 1))
    clock = FakeClock([spec], u(2024, 1, 1, 5))
    with pytest.raises(ConfigError, match="back"):
        clock.advance_to(u(2024, 1, 1, 4))
    with pytest.raises(ConfigError, match="back"):
        clock.down_until(u(2024, 1, 1, 4))
    assert FakeClock([], u(2024, 1, 1)).advance_to(u(2024, 2, 1)) == []


def test_docstring_examples() -> None:
    assert doctest.testmod(sch).failed == 0
