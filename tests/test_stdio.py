"""`serve --uri stdio://` driven as a subprocess, as wyoming-piper's tests do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .helpers import assert_speech, write_config


def test_stdio_server(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(config), "--uri", "stdio://"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    try:
        write_event(Describe().event(), proc.stdin)
        proc.stdin.flush()
        event = read_event(proc.stdout)
        assert event is not None and Info.is_type(event.type)
        assert [v.name for v in Info.from_event(event).tts[0].voices] == ["tars", "anna"]

        write_event(Synthesize(text="Testing the standard input server.").event(), proc.stdin)
        proc.stdin.flush()
        event = read_event(proc.stdout)
        assert event is not None and AudioStart.is_type(event.type)
        start = AudioStart.from_event(event)
        audio = bytearray()
        while True:
            event = read_event(proc.stdout)
            assert event is not None
            if AudioStop.is_type(event.type):
                break
            assert AudioChunk.is_type(event.type)
            audio += AudioChunk.from_event(event).audio
        assert_speech(np.frombuffer(bytes(audio), dtype="<i2") / 32768.0, start.rate, words=5)

        # Streaming, then stdin closes: the server finishes the work before exiting.
        for event in (SynthesizeStart().event(), SynthesizeChunk(text="Last words.").event(), SynthesizeStop().event()):
            write_event(event, proc.stdin)
        proc.stdin.close()
        types = []
        while (event := read_event(proc.stdout)) is not None:
            types.append(event.type)
        assert types[0] == "audio-start" and types[-2:] == ["audio-stop", SynthesizeStopped().event().type]
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
