"""Batched flow passes with the REAL upstream CosyVoice 2 and 3 code (tiny random models, CPU): what each stream's
flow makes in a batch equals, within 1e-4, what it makes alone; streams of different lengths, prompts and
finalize/streaming states share a batch; a member that never reaches the decoder holds nobody up; a failed batched
call is retried alone per member, and only a member that fails again fails."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("torch")

from wyoming_cosyvoice_plugins.cosyvoice import upstream  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.batching import DecoderRoute, batchable  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.scheduler import Batch, Stream  # noqa: E402

from .cosyvoice_support import forget_cosyvoice  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture
def fresh() -> Iterator[None]:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def load(repo: Path, model_dir: Path, version: int) -> Any:
    """Upstream's model object (CosyVoice2Model / CosyVoice3Model) of a tiny model, on the CPU."""
    module = upstream.import_cosyvoice(repo)
    cls = module.CosyVoice2 if version == 2 else module.CosyVoice3
    return cls(str(model_dir)).model


def call(inner: Any, seed: int, tokens: int, prompt_tokens: int, finalize: bool, streaming: bool) -> dict[str, Any]:
    """One flow pass's inputs, as upstream's token2wav builds them (a prompt of `prompt_tokens` tokens and its mel
    frames, a speaker embedding, `tokens` speech tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = int(inner.flow.input_embedding.num_embeddings)
    ratio = int(inner.flow.token_mel_ratio)
    return {
        "token": torch.randint(0, vocab, (1, tokens), generator=g, dtype=torch.int32),
        "token_len": torch.tensor([tokens], dtype=torch.int32),
        "prompt_token": torch.randint(0, vocab, (1, prompt_tokens), generator=g, dtype=torch.int32),
        "prompt_token_len": torch.tensor([prompt_tokens], dtype=torch.int32),
        "prompt_feat": torch.randn(1, prompt_tokens * ratio, 80, generator=g),
        "prompt_feat_len": torch.tensor([prompt_tokens * ratio], dtype=torch.int32),
        "embedding": torch.randn(1, 192, generator=g),
        "streaming": streaming,
        "finalize": finalize,
    }


CALLS = (
    # seed, speech tokens, prompt tokens, finalize, streaming: different lengths, prompts and states
    (1, 53, 26, False, True),
    (2, 78, 40, False, True),
    (3, 31, 26, True, True),
    (4, 60, 33, True, False),
)


def alone(inner: Any, calls: list[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [inner.flow.inference(**c)[0] for c in calls]


def batched(inner: Any, route: DecoderRoute, calls: list[dict[str, Any]], leaving: int = 0) -> list[Any]:
    """Each call's flow on its own thread, all members of one batch (plus `leaving` members that never come)."""
    import torch

    streams = [Stream(arrived=0.0) for _ in range(len(calls) + leaving)]
    batch = Batch(streams)
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def member(i: int) -> None:
        try:
            route.join(batch, streams[i])
            with torch.inference_mode():
                results[i] = inner.flow.inference(**calls[i])[0]
        except BaseException as err:
            errors.append(err)
        finally:
            route.alone()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for s in streams[len(calls) :]:
        batch.leave(s)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a batch member hung"
    if errors:
        raise errors[0]
    return results


def assert_equal(got: list[Any], want: list[Any]) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"call {i}: {tuple(a.shape)} != {tuple(b.shape)}"
        diff = float((a - b).abs().max())
        assert diff <= TOLERANCE, f"call {i}: batched differs from alone by {diff:.2e}"


@pytest.mark.parametrize("version", [2, 3])
def test_each_stream_in_a_batch_gets_what_it_gets_alone(
    fresh: None, version: int, cosyvoice_repo: Path, request: pytest.FixtureRequest
) -> None:
    inner = load(cosyvoice_repo, request.getfixturevalue(f"tiny_cosyvoice{version}"), version)
    assert batchable(inner.flow.decoder) is None
    calls = [call(inner, *spec) for spec in CALLS]
    want = alone(inner, calls)
    route = DecoderRoute(inner.flow.decoder)
    route.install()
    got = batched(inner, route, calls)
    assert route.batched_calls >= 1, "no batched decoder call ran"
    assert_equal(got, want)
    # Alone again through the route (no batch): unchanged.
    assert_equal(alone(inner, calls), want)


def test_a_member_that_never_comes_holds_nobody_up(fresh: None, cosyvoice_repo: Path, tiny_cosyvoice2: Path) -> None:
    inner = load(cosyvoice_repo, tiny_cosyvoice2, 2)
    calls = [call(inner, *spec) for spec in CALLS[:2]]
    want = alone(inner, calls)
    route = DecoderRoute(inner.flow.decoder)
    route.install()
    assert_equal(batched(inner, route, calls, leaving=1), want)


def test_a_failed_batch_is_retried_alone_and_only_a_repeat_failure_fails(
    fresh: None, cosyvoice_repo: Path, tiny_cosyvoice2: Path
) -> None:
    import torch

    inner = load(cosyvoice_repo, tiny_cosyvoice2, 2)
    calls = [call(inner, *spec) for spec in CALLS[:3]]
    want = alone(inner, calls)
    decoder = inner.flow.decoder
    estimator = decoder.forward_estimator
    bad_length = int(calls[1]["prompt_feat"].shape[1] + want[1].shape[2])  # call 1's mel frames, prompt included
    assert bad_length not in {
        int(c["prompt_feat"].shape[1] + w.shape[2]) for c, w in ((calls[0], want[0]), (calls[2], want[2]))
    }

    def failing(x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] > 2:
            raise RuntimeError("injected: batched pass failed")
        if x.shape[2] == bad_length:
            raise RuntimeError("injected: call 1 fails alone too")
        return estimator(x, *args, **kwargs)

    decoder.forward_estimator = failing
    route = DecoderRoute(decoder)
    route.install()
    streams = [Stream(arrived=0.0) for _ in calls]
    batch = Batch(streams)
    results: dict[int, Any] = {}

    def member(i: int) -> None:
        route.join(batch, streams[i])
        try:
            with torch.inference_mode():
                results[i] = inner.flow.inference(**calls[i])[0]
        except RuntimeError as err:
            results[i] = err
        finally:
            route.alone()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(results[1], RuntimeError) and "fails alone too" in str(results[1])
    assert_equal([results[0], results[2]], [want[0], want[2]])


# --- through the real server: passes ready together run as one batch ------------------------------------------------

TEXTS = (
    "This long sentence keeps its request streaming for a while, so that its passes meet the others at the flow",
    "Another long sentence of about the same length streams beside it, chunk after chunk, for several seconds",
    "A third request, as long as the two others, arrives at the same moment and waits for its first chunk too",
)
"""Long enough (about 80 text tokens: 160 speech tokens) for several chunks each: first chunks are not last ones."""


async def test_requests_at_once_share_batched_passes_and_stay_whole(
    fresh: None, tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path
) -> None:
    import asyncio

    import numpy as np
    from wyoming.tts import Synthesize, SynthesizeVoice

    from wyoming_cosyvoice.config import load_config

    from .cosyvoice_support import write_prompt
    from .helpers import collect, connect, running_server, write_config
    from .realcode import engine_section
    from .test_cosyvoice_realcode import full_seconds

    prompt = write_prompt(tmp_path / "prompt.wav", rate=24000, seconds=1.04)
    section = engine_section(cosyvoice_repo, tiny_cosyvoice2, tmp_path / "cache", concurrency=3, keep_real_time=False)
    path = write_config(
        tmp_path / "cfg",
        server={"max_concurrent": 8},
        voices=[{"name": "v", "reference_audio": str(prompt), "mode": "cross_lingual"}],
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": section},
    )
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        scheduler = engine.scheduling.scheduler
        assert engine.scheduling.route is not None and scheduler.max_batch == 3
        inner = engine.model.model
        token2wav = inner.token2wav
        held = threading.Event()

        def first_pass_waits(*args: Any, **kwargs: Any) -> Any:
            # The first pass to run waits until the two other requests wait for theirs: they are then ready together.
            if not held.is_set():
                held.set()
                for _ in range(6000):
                    if scheduler.waiting >= 2:
                        break
                    threading.Event().wait(0.05)
            return token2wav(*args, **kwargs)

        inner.token2wav = first_pass_waits

        async def speak(text: str) -> Any:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="v")).event())
                return await collect(client, timeout=300)

        replies = await asyncio.gather(*(speak(text) for text in TEXTS))
        inner.token2wav = token2wav
        for text, reply in zip(TEXTS, replies, strict=True):
            assert not reply.errors, reply.errors
            assert reply.stops == 1 and reply.seconds == pytest.approx(full_seconds(engine, text), abs=1e-6), text
            assert np.isfinite(reply.samples()).all()
        assert scheduler.batches >= 1 and engine.scheduling.route.batched_calls >= 1
        assert "batched passes" in engine.health()["batched_flow"]
        assert scheduler.open_streams == 0 and scheduler.waiting == 0
        assert inner.tts_speech_token_dict == {} and inner.hift_cache_dict == {}


def test_batch_flow_settings() -> None:
    from wyoming_cosyvoice_plugins.cosyvoice.options import AUTO_MAX_FLOW_BATCH, CosyVoiceSettings

    assert CosyVoiceSettings().flow_batch_limit() == AUTO_MAX_FLOW_BATCH
    assert CosyVoiceSettings(batch_flow=False).flow_batch_limit() == 1
    assert CosyVoiceSettings(max_flow_batch=2).flow_batch_limit() == 2
    assert CosyVoiceSettings(max_flow_batch=0).validate() == ("max_flow_batch", "must be auto or at least 1")
