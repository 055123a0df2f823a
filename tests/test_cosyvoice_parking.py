"""Parking and waking the REAL upstream CosyVoice 2 (tiny random-weight model, CPU), both modes: after `keep_alive`
the engine reports parked (unload: the model's memory is given back), a request wakes it and gets exactly the audio
it got awake (fixed seed), several requests share one wake, a request during the park waits for it and wakes the
model, a client leaving during a wake leaves nothing behind, and park/wake cycles leak no memory, thread or fd.

On the CPU `host` has nothing to copy (the weights are host memory already): it runs the same states and code paths;
the copies themselves need a GPU (docs/cosyvoice.md). Unload cycles take ~1.5 s each here: 2 by default, more with
WYOMING_COSYVOICE_PARK_CYCLES (50 for the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.client import TtsClient
from wyoming_cosyvoice.commands.describe import parse_health
from wyoming_cosyvoice.config import Section, load_config
from wyoming_cosyvoice.engine import SynthesisOptions
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins.cosyvoice.engine import CosyVoiceEngine
from wyoming_cosyvoice_plugins.cosyvoice.lifecycle import PARKED, PARKING, READY, WAKING
from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings

from .cosyvoice_support import forget_cosyvoice, write_prompt
from .helpers import collect, connect, running_server, write_config
from .realcode import engine_section

TEXT = "Hello there, how are you today?"
KEEP_ALIVE = 0.3
WAIT = 60.0
UNLOAD_CYCLES = int(os.environ.get("WYOMING_COSYVOICE_PARK_CYCLES") or 2)


@pytest.fixture(autouse=True)
def fresh_import() -> Iterator[None]:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def snapshot() -> tuple[float, int, int]:
    """RSS (MiB), threads, open file descriptors of this process."""
    return rss_mb(), threading.active_count(), len(os.listdir("/proc/self/fd"))


def make_engine(tmp_path: Path, repo: Path, model: Path, mode: str) -> CosyVoiceEngine:
    data = engine_section(repo, model, tmp_path / "cache", keep_alive=KEEP_ALIVE, park=mode)
    section = Section("cosyvoice", data, "test", "engines.cosyvoice", tmp_path)
    return CosyVoiceEngine(section.parse(CosyVoiceSettings))


def seeded(engine: CosyVoiceEngine) -> None:
    """Every request starts from the same random state (upstream samples tokens and the vocoder's phase)."""
    import torch

    original = engine.generate

    def generate(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        torch.manual_seed(1234)
        yield from original(*args, **kwargs)

    engine.generate = generate  # type: ignore[method-assign]


async def say(engine: CosyVoiceEngine, profile: VoiceProfile) -> bytes:
    audio = bytearray()
    async for chunk in engine.synthesize(TEXT, profile, SynthesisOptions()):
        audio += chunk.audio
    return bytes(audio)


async def until(engine: CosyVoiceEngine, settled: Callable[[], bool]) -> None:
    await asyncio.wait_for(engine.lifecycle.wait_until(settled), WAIT)


def in_state(engine: CosyVoiceEngine, state: str) -> Callable[[], bool]:
    return lambda: engine.lifecycle.state == state


@pytest.mark.parametrize("mode", ["unload", "host"])
async def test_park_and_wake_give_the_same_audio(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, mode: str
) -> None:
    engine = make_engine(tmp_path, cosyvoice_repo, tiny_cosyvoice2, mode)
    profile = VoiceProfile(name="v", mode="cross_lingual", reference_audio=write_prompt(tmp_path / "p.wav", rate=24000))
    await engine.start()
    try:
        await engine.prepare([profile])
        await engine.warmup()
        seeded(engine)
        release = engine.reply_opening()  # a reply open: awake (woken if it parked already) until released
        await until(engine, in_state(engine, READY))
        awake = await say(engine, profile)
        assert awake and await say(engine, profile) == awake, "precondition: two awake requests agree"
        rss_awake = rss_mb()
        release()

        await until(engine, in_state(engine, PARKED))
        assert engine.health()["lifecycle"] == f"parked ({mode})"
        if mode == "unload":
            weights = sum((tiny_cosyvoice2 / name).stat().st_size for name in ("llm.pt", "flow.pt", "hift.pt"))
            assert engine.model is None
            assert rss_awake - rss_mb() >= 0.5 * weights / 2**20, "the model's memory was not given back"

        wakes = engine.lifecycle.machine.wakes
        replies = await asyncio.wait_for(asyncio.gather(*(say(engine, profile) for _ in range(3))), WAIT)
        assert replies == [awake] * 3, "woken: not the audio it gave awake"
        assert engine.lifecycle.machine.wakes == wakes + 1, "several requests, more than one wake"
        assert "last_wake" in engine.health()

        await until(engine, in_state(engine, PARKED))
        leaving = asyncio.create_task(say(engine, profile))
        await until(engine, in_state(engine, WAKING))
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await until(engine, in_state(engine, PARKED))  # the wake finished for nobody, then the model parked again
        assert engine.lifecycle.machine.in_flight == 0 and engine.in_flight == 0

        await engine.wake()
        await until(engine, in_state(engine, PARKING))
        assert await asyncio.wait_for(say(engine, profile), WAIT) == awake, "a request during the park"

        cycles = 50 if mode == "host" else UNLOAD_CYCLES
        for _ in range(1):  # the allocator settles over the first cycle
            await engine.park()
            await engine.wake()
        before = snapshot()
        for _ in range(cycles):
            assert await engine.park() == f"parked ({mode})"
            assert await engine.wake() == READY
        rss, threads, fds = snapshot()
        assert (threads, fds) == before[1:]
        assert rss - before[0] < 40, f"RSS grew {rss - before[0]:.0f} MiB over {cycles} cycles"
        assert await say(engine, profile) == awake
    finally:
        await engine.close()


async def test_a_parked_server_wakes_at_synthesize_start(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path
) -> None:
    """Through the real server: `describe` shows the model parked; `synthesize-start` alone (Home Assistant sends it
    when its LLM starts streaming) wakes it before any text arrives; the reply ends and the model parks again; the
    `park` / `wake` commands' events answer with the state."""
    section = engine_section(cosyvoice_repo, tiny_cosyvoice2, tmp_path / "cache", keep_alive=KEEP_ALIVE, park="host")
    prompt = write_prompt(tmp_path / "p.wav", rate=24000)
    path = write_config(
        tmp_path / "cfg",
        voices=[{"name": "v", "reference_audio": str(prompt), "mode": "cross_lingual"}],
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": section},
    )
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        assert isinstance(engine, CosyVoiceEngine)
        await until(engine, in_state(engine, PARKED))
        async with TtsClient(f"tcp://127.0.0.1:{server.port}") as client:
            health = parse_health((await client.describe()).tts[0].description)
        assert health is not None and health["lifecycle"] == "parked (host)", health

        async with connect(server) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="v")).event())
            await until(engine, in_state(engine, READY))
            assert engine.lifecycle.last_wake_why == "a reply opening"
            await client.write_event(SynthesizeChunk(text=TEXT).event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped", timeout=WAIT)
        assert not reply.errors and reply.seconds > 0
        await until(engine, in_state(engine, PARKED))

        async with TtsClient(f"tcp://127.0.0.1:{server.port}", read_timeout=WAIT) as client:
            assert await client.engine_control("wake") == {"cosyvoice": READY}
            assert await client.engine_control("park") == {"cosyvoice": "parked (host)"}
        async with connect(server) as client:  # a one-shot request on the parked model: opens its reply, then speaks
            await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name="v")).event())
            one_shot = await collect(client, timeout=WAIT)
        assert not one_shot.errors and one_shot.seconds > 0
        assert engine.lifecycle.last_wake_why in ("a reply opening", "a request")
        await engine.park()
        await studio_park_and_wake(server, path.parent)


async def studio_park_and_wake(server: Any, config_dir: Path) -> None:
    """The studio's API: POST /api/engine/wake and /park answer with the state; /api/status shows it."""
    import dataclasses

    aiohttp = pytest.importorskip("aiohttp", reason="the studio needs the web extra")
    from wyoming_cosyvoice.web import start_studio

    web = dataclasses.replace(load_config(config_dir / "server.yaml").web, enabled=True, port=0)
    studio = await start_studio(server.service, web, config_dir / "voices", config_dir=config_dir)
    url = f"http://127.0.0.1:{studio.port}/api/"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            async with http.post(url + "engine/wake") as response:
                assert (response.status, await response.json()) == (200, {"engines": {"cosyvoice": READY}})
            async with http.post(url + "engine/park") as response:
                assert await response.json() == {"engines": {"cosyvoice": "parked (host)"}}
            async with http.get(url + "status") as response:
                health = (await response.json())["engines"][0]["health"]
            assert health["lifecycle"] == "parked (host)" and health["keep_alive"] == "0.3 s (host)", health
    finally:
        await studio.close()
