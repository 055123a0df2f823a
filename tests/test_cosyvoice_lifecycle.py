"""The park/wake lifecycle (plugins/cosyvoice/lifecycle.py): the pure state machine step by step, and the Keeper on a
real event loop with park and wake steps that block on gates (the model work itself is tested with the real upstream
code in test_cosyvoice_parking.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

from wyoming_cosyvoice_plugins.cosyvoice.lifecycle import (
    PARKED,
    PARKING,
    READY,
    WAKING,
    Keeper,
    Machine,
    TransitionError,
)

# ------------------------------------------------------------------ the pure machine


def test_never_parks_with_keep_alive_minus_one() -> None:
    machine = Machine(keep_alive=-1, idle_since=0.0)
    assert machine.deadline() is None


def test_due_after_keep_alive_idle_seconds() -> None:
    machine = Machine(keep_alive=5, idle_since=10.0)
    assert not machine.due(14.9)
    assert machine.due(15.0)


def test_request_in_flight_keeps_it_awake_and_its_end_restarts_the_clock() -> None:
    machine = Machine(keep_alive=5, idle_since=0.0)
    assert machine.request_begins() == "run"
    assert not machine.due(100.0)
    machine.request_ends(100.0)
    assert machine.deadline() == 105.0


def test_open_reply_keeps_it_awake_until_released() -> None:
    machine = Machine(keep_alive=0, idle_since=0.0)
    machine.hold()
    assert machine.deadline() is None
    machine.release(3.0)
    assert machine.due(3.0)


def test_request_on_parked_model_wakes_once_and_later_ones_wait() -> None:
    machine = Machine(keep_alive=0, idle_since=0.0)
    machine.parking()
    machine.parked(True, 1.0)
    assert machine.request_begins() == "wake"
    assert machine.state == WAKING
    assert machine.request_begins() == "wait"
    machine.woke(0.5, 2.0)
    assert machine.need() == "run"
    assert machine.last_wake_s == 0.5


def test_request_during_parking_asks_the_park_to_stop() -> None:
    machine = Machine(keep_alive=0, idle_since=0.0)
    machine.parking()
    assert machine.request_begins() == "wait"
    assert machine.stop_park


def test_park_that_changed_nothing_leaves_it_ready() -> None:
    machine = Machine(keep_alive=0, idle_since=0.0)
    machine.parking()
    machine.parked(False, 4.0)
    assert (machine.state, machine.parks) == (READY, 0)


def test_explicit_park_ignores_keep_alive_and_holds_but_not_requests() -> None:
    machine = Machine(keep_alive=-1, idle_since=7.0)
    machine.hold()
    machine.park_wanted = True
    assert machine.due(7.0)
    machine.request_begins()
    assert not machine.due(1000.0)


def test_failed_wake_is_parked_again() -> None:
    machine = Machine(keep_alive=0, idle_since=0.0)
    machine.parking()
    machine.parked(True, 0.0)
    machine.request_begins()
    machine.wake_failed()
    assert machine.state == PARKED


def test_illegal_steps_raise() -> None:
    machine = Machine()
    with pytest.raises(TransitionError):
        machine.woke(0.1, 0.0)
    with pytest.raises(TransitionError):
        machine.request_ends(0.0)


# ------------------------------------------------------------------ the Keeper on a loop


class Steps:
    """Park and wake steps that count their calls and can be held on a gate."""

    def __init__(self) -> None:
        self.parks = 0
        self.wakes = 0
        self.park_gate = threading.Event()
        self.park_gate.set()
        self.wake_gate = asyncio.Event()
        self.wake_gate.set()
        self.park_started = asyncio.Event()
        self.wake_started = asyncio.Event()
        self.park_saw_stop = False

    async def park(self, stop: threading.Event) -> bool:
        self.parks += 1
        self.park_started.set()
        await asyncio.to_thread(self.park_gate.wait, 10)
        self.park_saw_stop = stop.is_set()
        return True

    async def wake(self) -> None:
        self.wakes += 1
        self.wake_started.set()
        await asyncio.wait_for(self.wake_gate.wait(), 10)


async def parked(keeper: Keeper) -> None:
    await asyncio.wait_for(keeper.wait_until(lambda: keeper.state == PARKED), 10)


async def test_keeper_parks_when_idle_and_a_request_wakes_it() -> None:
    steps = Steps()
    keeper = Keeper(0, "host", steps.park, steps.wake)
    keeper.start()
    try:
        await parked(keeper)
        async with keeper.request():
            assert keeper.state == READY
        assert (steps.parks, steps.wakes) == (1, 1)
        assert "last_wake" in keeper.facts()
    finally:
        await keeper.close()


async def test_requests_during_one_wake_share_it() -> None:
    steps = Steps()
    keeper = Keeper(-1, "unload", steps.park, steps.wake)
    keeper.start()
    try:
        assert await keeper.park_now() == "parked (unload)"
        steps.wake_gate.clear()
        entered: list[int] = []

        async def one(i: int) -> None:
            async with keeper.request():
                entered.append(i)

        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        await asyncio.wait_for(steps.wake_started.wait(), 10)
        assert keeper.state == WAKING and not entered
        steps.wake_gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert sorted(entered) == [0, 1, 2]
        assert steps.wakes == 1
    finally:
        await keeper.close()


async def test_request_during_parking_stops_the_park_then_wakes() -> None:
    steps = Steps()
    steps.park_gate.clear()
    keeper = Keeper(0, "host", steps.park, steps.wake)
    keeper.start()
    try:
        await asyncio.wait_for(steps.park_started.wait(), 10)
        assert keeper.state == PARKING
        request = asyncio.create_task(_enter(keeper))
        await asyncio.wait_for(keeper.wait_until(lambda: keeper.machine.stop_park), 10)
        steps.park_gate.set()
        await asyncio.wait_for(request, 10)
        assert steps.park_saw_stop
        assert steps.wakes == 1
    finally:
        await keeper.close()


async def _enter(keeper: Keeper) -> None:
    async with keeper.request():
        assert keeper.state == READY


async def test_a_waiter_leaving_does_not_cancel_the_wake() -> None:
    steps = Steps()
    keeper = Keeper(-1, "host", steps.park, steps.wake)
    keeper.start()
    try:
        await keeper.park_now()
        steps.wake_gate.clear()
        leaving = asyncio.create_task(_enter(keeper))
        await asyncio.wait_for(steps.wake_started.wait(), 10)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert keeper.machine.in_flight == 0
        steps.wake_gate.set()
        await asyncio.wait_for(keeper.wait_until(lambda: keeper.state == READY), 10)
        assert steps.wakes == 1
    finally:
        await keeper.close()


async def test_reply_hold_wakes_without_waiting_and_forgotten_hold_is_released() -> None:
    steps = Steps()
    keeper = Keeper(0, "host", steps.park, steps.wake)
    keeper.start()
    try:
        await parked(keeper)
        release: Any = keeper.hold()
        await asyncio.wait_for(keeper.wait_until(lambda: keeper.state == READY), 10)
        assert keeper.machine.holds == 1
        del release  # the holder went away without releasing
        gc.collect()
        await parked(keeper)
        assert keeper.machine.holds == 0
    finally:
        await keeper.close()


async def test_failed_wake_fails_the_request_and_the_next_one_retries() -> None:
    calls: list[int] = []

    async def park(stop: threading.Event) -> bool:
        return True

    async def wake() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk gone")

    keeper = Keeper(-1, "unload", park, wake)
    keeper.start()
    try:
        await keeper.park_now()
        with pytest.raises(RuntimeError):
            async with keeper.request():
                pass
        assert keeper.state == PARKED
        async with keeper.request():
            assert keeper.state == READY
    finally:
        await keeper.close()


def test_triton_ignores_the_parking_keys_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from pathlib import Path

    from wyoming_cosyvoice.config import Section
    from wyoming_cosyvoice_plugins.triton import without_parking_keys
    from wyoming_cosyvoice_plugins.triton.settings import TritonSettings

    data = {"endpoints": ["grpc://127.0.0.1:8001"], "keep_alive": 5, "park": "unload"}
    section = Section("triton", data, "server.yaml", "engines.triton", Path("."))
    settings = without_parking_keys(section).parse(TritonSettings)
    assert settings.endpoints == ("grpc://127.0.0.1:8001",)
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "keep_alive and park ignored" in warnings[0], warnings


def test_request_right_after_a_reply_opening_on_a_parked_model_does_not_spin() -> None:
    """Regression: the reply opening's wake began in a task of its own; a request arriving before that task ran saw
    `waking` with no wake to await and looped without yielding, freezing the event loop (the server stopped
    answering). Run on a loop in a thread so that a frozen loop fails the test instead of hanging it."""
    outcome: list[str] = []

    async def scenario() -> None:
        steps = Steps()
        keeper = Keeper(-1, "unload", steps.park, steps.wake)
        keeper.start()
        try:
            await keeper.park_now()
            release = keeper.hold()
            async with keeper.request():
                outcome.append(keeper.state)
            release()
            outcome.append(f"wakes={steps.wakes}")
        finally:
            await keeper.close()

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the event loop froze"
    assert outcome == [READY, "wakes=1"]
