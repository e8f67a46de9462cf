"""`reconciler.give_way`: a pass waits for the webhooks while they are busy, a step at a
time, never longer than the cap at once, never for more than its share of its time; waits
of concurrent tasks count once."""

from __future__ import annotations

import asyncio

import pytest

from reconciler.give_way import MAX_STEPS, STEP_SECONDS, GiveWay


class FakeTime:
    """A monotonic clock that moves only when told to, or when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def give_way(time: FakeTime, busy: object, share: float) -> GiveWay:
    return GiveWay(busy, share, time.sleep, monotonic=time)  # type: ignore[arg-type]


def test_no_busy_signal_or_a_quiet_daemon_or_a_share_of_zero_never_waits() -> None:
    time = FakeTime()
    for way in (give_way(time, None, 1.0), give_way(time, lambda: False, 1.0), give_way(time, lambda: True, 0.0)):
        time.now += 10  # the pass has worked a while: a share would allow a wait
        asyncio.run(way())
        assert time.slept == [] and way.yielded_seconds == 0


def test_waits_while_busy_a_step_at_a_time_and_then_goes_on() -> None:
    time = FakeTime()
    answers = iter([True, True, True, False])
    way = give_way(time, lambda: next(answers), 1.0)
    time.now += 10
    asyncio.run(way())
    assert time.slept == [STEP_SECONDS] * 3 and way.yielded_seconds == pytest.approx(3 * STEP_SECONDS)


def test_a_wait_ends_at_the_cap_however_long_the_daemon_stays_busy() -> None:
    time = FakeTime()
    way = give_way(time, lambda: True, 1.0)
    time.now += 1000  # so much work done that the share allows far more than the cap
    asyncio.run(way())
    asyncio.run(way())
    assert time.slept == [STEP_SECONDS] * (2 * MAX_STEPS)
    assert way.yielded_seconds == pytest.approx(2 * MAX_STEPS * STEP_SECONDS)


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_busy_for_good_the_waits_stay_within_the_share_of_the_pass_time(share: float) -> None:
    time = FakeTime()
    way = give_way(time, lambda: True, share)
    asyncio.run(way())
    assert time.slept == []  # at its very start a pass has earned no wait
    for _ in range(200):  # a unit of work of 0.1 s, then a wait, again and again
        time.now += 0.1
        asyncio.run(way())
    elapsed = time.now - 100.0
    # each wait stops at the first step that reaches the share: at most one step over it
    assert share * elapsed - STEP_SECONDS <= way.yielded_seconds <= share * elapsed + STEP_SECONDS
    assert way.yielded_seconds == pytest.approx(sum(time.slept))


def test_concurrent_waits_count_once() -> None:
    time = FakeTime()
    busy = [True]
    release = asyncio.Event()

    async def held_sleep(seconds: float) -> None:
        await release.wait()

    way = GiveWay(lambda: busy[0], 1.0, held_sleep, monotonic=time)

    async def go() -> None:
        time.now += 10
        waits = [asyncio.ensure_future(way()) for _ in range(4)]
        await asyncio.sleep(0)  # all four are waiting now
        time.now += 1.5
        assert way.yielded_seconds == pytest.approx(1.5)  # an open window counts too
        busy[0] = False
        release.set()
        await asyncio.gather(*waits)

    asyncio.run(go())
    assert way.yielded_seconds == pytest.approx(1.5)  # not 4 x 1.5


def test_a_share_outside_zero_to_one_is_refused() -> None:
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="share must be between 0 and 1"):
            GiveWay(None, share, asyncio.sleep)


def test_the_share_defaults_to_what_measured_best_for_the_database_and_a_setting_wins() -> None:
    from pacrecon.settings import ConfigurationError, load_settings

    assert load_settings(database_url="sqlite:///x.db", _env_file=None).yield_share() == 1.0
    assert load_settings(database_url="postgresql://u@h/db", _env_file=None).yield_share() == 0.5
    assert load_settings(database_url="postgresql://u@h/db", reconcile_yield_share=1, _env_file=None).yield_share() == 1.0
    assert load_settings(database_url="sqlite:///x.db", reconcile_yield_share=0.25, _env_file=None).yield_share() == 0.25
    with pytest.raises(ConfigurationError, match="PACRECON_RECONCILE_YIELD_SHARE"):
        load_settings(reconcile_yield_share=2, _env_file=None)
