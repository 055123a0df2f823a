"""Reference audio validation and normalization: every rule, with the shared voices and generated files."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import soundfile as sf

from wyoming_cosyvoice.errors import VoiceError
from wyoming_cosyvoice.reference import (
    MAX_GAIN,
    MAX_SECONDS,
    TARGET_PEAK,
    inspect_reference,
    inspect_reference_data,
    normalize_reference,
    normalized_reference,
)
from wyoming_cosyvoice.voices import VoiceProfile

from . import audiogen
from .helpers import SHARED_VOICES

SHARED = {
    "interstellar-tars-01-resemble-denoised.wav": (44100, "PCM_16", 6.34),
    "zero_shot_prompt.wav": (24000, "FLOAT", 3.48),
    "cross_lingual_prompt.wav": (22050, "PCM_16", 13.75),
}


def _normalized_ok(path: Path, rate: int, peak: float = TARGET_PEAK) -> np.ndarray:
    """The cached file is a 16-bit mono WAV at the original rate, peak-normalized."""
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, rate)
    data, _ = sf.read(str(path), dtype="float32")
    assert abs(float(np.max(np.abs(data))) - peak) < 0.01
    return data


@pytest.mark.parametrize("filename", sorted(SHARED))
def test_shared_voices_are_accepted_and_normalized(filename: str, tmp_path: Path) -> None:
    source = SHARED_VOICES / filename
    if not source.is_file():
        pytest.skip(f"{source} not available")
    rate, subtype, seconds = SHARED[filename]
    cached, info = normalize_reference(source, cache_dir=tmp_path)
    assert (info.rate, info.channels) == (rate, 1)
    assert info.format == f"WAV {subtype}"
    assert abs(info.seconds - seconds) < 0.01
    assert 0.5 < info.kept_seconds <= info.seconds
    assert info.warnings == ()
    data = _normalized_ok(cached, rate)
    assert abs(len(data) / rate - info.kept_seconds) < 0.01
    # Content-keyed cache: the same file again is the same path, not rewritten.
    stamp = cached.stat().st_mtime_ns
    assert normalize_reference(source, cache_dir=tmp_path)[0] == cached
    assert cached.stat().st_mtime_ns == stamp


def test_cache_is_keyed_by_content_and_survives_a_restart(tmp_path: Path) -> None:
    a = audiogen.write(tmp_path / "a.wav", 2.5, 24000, peak=0.5)
    b = audiogen.write(tmp_path / "b.wav", 2.5, 24000, peak=0.3)
    cache = tmp_path / "cache"
    path_a, _ = normalize_reference(a, cache_dir=cache)
    path_b, _ = normalize_reference(b, cache_dir=cache)
    assert path_a != path_b
    copy = tmp_path / "copy-of-a.wav"
    copy.write_bytes(a.read_bytes())
    path_copy, info = normalize_reference(copy, cache_dir=cache)
    assert path_copy == path_a and info.path == copy
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".wav", ".wav"]


def test_stereo_is_downmixed_with_a_warning(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "stereo.wav", 3.0, 48000, channels=2)
    cached, info = normalize_reference(path, cache_dir=tmp_path / "c")
    assert info.channels == 2
    assert any("2 channels mixed down to mono" in w for w in info.warnings)
    _normalized_ok(cached, 48000)


def test_8khz_is_refused(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "phone.wav", 3.0, 8000)
    with pytest.raises(VoiceError) as caught:
        inspect_reference(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "8000 Hz is below the minimum of 16000 Hz" in message


def test_16khz_is_the_lowest_accepted_rate(tmp_path: Path) -> None:
    assert inspect_reference(audiogen.write(tmp_path / "16k.wav", 3.0, 16000)).rate == 16000
    with pytest.raises(VoiceError, match="15999 Hz"):
        inspect_reference(audiogen.write(tmp_path / "15999.wav", 3.0, 15999))


def test_longer_than_30s_is_trimmed_without_transcript(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "long.wav", 42.0, 16000)
    cached, info = normalize_reference(path, cache_dir=tmp_path / "c")
    assert info.seconds == pytest.approx(42.0)
    assert MAX_SECONDS - 2.0 <= info.kept_seconds <= MAX_SECONDS
    assert info.cut and any("longer than 30 s" in w and "only the first" in w for w in info.warnings)
    data = _normalized_ok(cached, 16000)
    assert len(data) / 16000 <= MAX_SECONDS


def test_longer_than_30s_is_refused_with_transcript(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "long.wav", 31.0, 16000)
    with pytest.raises(VoiceError, match="longer than 30 s; with a transcript it cannot be cut"):
        normalize_reference(path, has_transcript=True, cache_dir=tmp_path / "c")
    # The trimmed copy cached for a transcript-less profile must not let the transcript profile through.
    normalize_reference(path, has_transcript=False, cache_dir=tmp_path / "c")
    with pytest.raises(VoiceError, match="cannot be cut"):
        normalize_reference(path, has_transcript=True, cache_dir=tmp_path / "c")


def test_silence_padding_is_trimmed(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "padded.wav", 2.0, 22050, pad=3.0)
    cached, info = normalize_reference(path, cache_dir=tmp_path / "c")
    assert info.seconds == pytest.approx(8.0)
    assert 2.0 <= info.kept_seconds <= 2.3  # the sound plus up to 0.1 s margin on each side
    assert any("silence trimmed" in w for w in info.warnings)
    data = _normalized_ok(cached, 22050)
    assert abs(len(data) / 22050 - info.kept_seconds) < 0.01
    # 0.1 s of the silence is kept as a margin; the sound starts right after it.
    assert np.max(np.abs(data[: int(0.09 * 22050)])) == 0.0
    assert np.max(np.abs(data[: int(0.13 * 22050)])) > 0.1


def test_silent_and_too_short_recordings_are_refused(tmp_path: Path) -> None:
    silent = audiogen.write(tmp_path / "silent.wav", samples=np.zeros(48000, dtype=np.float32), rate=24000)
    with pytest.raises(VoiceError, match="no sound"):
        inspect_reference(silent)
    short = audiogen.write(tmp_path / "short.wav", 0.3, 24000, pad=1.0)
    with pytest.raises(VoiceError, match=r"only 0\.\d+ s of sound; at least 0.5 s needed"):
        inspect_reference(short)
    brief = inspect_reference(audiogen.write(tmp_path / "brief.wav", 1.2, 24000))
    assert any("cloning works better with 3-10 s" in w for w in brief.warnings)


def test_quiet_recording_warns_and_is_raised(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "quiet.wav", 3.0, 24000, peak=0.02)
    cached, info = normalize_reference(path, cache_dir=tmp_path / "c")
    assert info.peak_dbfs == pytest.approx(-34.0, abs=0.5)
    assert any("too quiet (peak -34 dBFS)" in w for w in info.warnings)
    _normalized_ok(cached, 24000, peak=0.02 * MAX_GAIN)  # raised, at most +30 dB


def test_clipped_recording_warns(tmp_path: Path) -> None:
    loud = np.clip(audiogen.speechlike(3.0, 24000, peak=1.0) * 3.0, -1.0, 1.0)
    path = audiogen.write(tmp_path / "clipped.wav", samples=loud, rate=24000)
    info = inspect_reference(path)
    assert any(w.startswith("clipped (") for w in info.warnings)
    clean = inspect_reference(audiogen.write(tmp_path / "clean.wav", 3.0, 24000, peak=0.99))
    assert not any("clipped" in w for w in clean.warnings)


def test_flac_and_float_over_full_scale(tmp_path: Path) -> None:
    flac = audiogen.write(tmp_path / "voice.flac", 3.0, 32000, subtype="PCM_24")
    cached, info = normalize_reference(flac, cache_dir=tmp_path / "c")
    assert info.format == "FLAC PCM_24" and info.rate == 32000
    _normalized_ok(cached, 32000)
    hot = audiogen.write(tmp_path / "hot.wav", 3.0, 24000, peak=1.7, subtype="FLOAT")
    cached, info = normalize_reference(hot, cache_dir=tmp_path / "c")
    assert info.peak_dbfs == pytest.approx(4.6, abs=0.1)
    _normalized_ok(cached, 24000)  # scaled down, not clipped


def test_unreadable_and_other_formats_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(VoiceError, match="not a readable WAV/FLAC file"):
        inspect_reference(text)
    ogg = audiogen.write(tmp_path / "voice.ogg", 3.0, 24000, subtype="VORBIS", fmt="OGG")
    with pytest.raises(VoiceError, match="OGG files are not accepted; convert it to WAV or FLAC"):
        inspect_reference(ogg)
    with pytest.raises(VoiceError, match="file not found"):
        inspect_reference(tmp_path / "missing.wav")
    with pytest.raises(VoiceError, match="is a folder"):
        inspect_reference(tmp_path)


def test_normalized_reference_for_engines(tmp_path: Path) -> None:
    path = audiogen.write(tmp_path / "ref.wav", 3.0, 44100)
    profile = VoiceProfile(name="alice", reference_audio=path, source="voices.yaml")
    cached = normalized_reference(profile, cache_dir=tmp_path / "c")
    _normalized_ok(cached, 44100)
    with pytest.raises(VoiceError) as caught:
        normalized_reference(VoiceProfile(name="plain", source="voices.yaml"), cache_dir=tmp_path / "c")
    assert str(caught.value) == "voices.yaml: voice 'plain': no reference audio configured"
    bad = VoiceProfile(name="bob", reference_audio=audiogen.write(tmp_path / "8k.wav", 3.0, 8000), source="v.yaml")
    with pytest.raises(VoiceError) as caught:
        normalized_reference(bad, cache_dir=tmp_path / "c")
    assert str(caught.value).startswith(f"v.yaml: voice 'bob': reference audio {tmp_path / '8k.wav'}: sample rate")


T = TypeVar("T")


def constant_flac(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    """A FLAC of constant audio: a few hundred KB that decode to `seconds` of sound (a decompression bomb)."""
    buffer = io.BytesIO()
    block = np.full((rate * 60, channels), 0.5, dtype=np.float32)
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as handle:
        for _ in range(int(seconds // 60)):
            handle.write(block)
        handle.write(block[: int(seconds % 60 * rate)])
    return buffer.getvalue()


def unknown_length(flac: bytes) -> bytes:
    """The same FLAC with its header's sample count set to 0 ("unknown")."""
    data = bytearray(flac)
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO: total samples, 36 bits
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


def peak_memory(call: Callable[[], T]) -> tuple[T, float]:
    """What `call` returned (or raised, as the value) and the most memory Python and numpy held meanwhile, in MB."""
    tracemalloc.start()
    try:
        try:
            result: T = call()
        except VoiceError as err:
            result = err  # type: ignore[assignment]
        return result, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    """Issue 21, finding 3: 20 min of constant audio in a 60 KB FLAC (the audit used 2 h); uploads had no cap."""
    bomb = constant_flac(1200.0)
    assert len(bomb) < 1_000_000
    refused, peak = peak_memory(lambda: inspect_reference_data(bomb, Path("bomb.flac")))
    assert isinstance(refused, VoiceError) and "1200 s long; the limit is 120 s" in str(refused)
    assert peak < 10, f"{peak:.0f} MB held while refusing a 60 KB upload"
    (tmp_path / "bomb.flac").write_bytes(bomb)
    refused, peak = peak_memory(
        lambda: normalize_reference(tmp_path / "bomb.flac", cache_dir=tmp_path, max_seconds=120)
    )
    assert isinstance(refused, VoiceError) and "1200 s long" in str(refused) and peak < 10
    with pytest.raises(VoiceError, match="the header does not say how long it is"):
        inspect_reference_data(unknown_length(constant_flac(5.0)), Path("stream.flac"))
    with pytest.raises(VoiceError, match="the header does not say how long it is"):
        inspect_reference_data(unknown_length(constant_flac(5.0)), Path("stream.flac"), max_seconds=None)


def test_only_the_part_kept_is_decoded(tmp_path: Path) -> None:
    """100 s of 48 kHz stereo under the 120 s cap: measured block by block, only the first 30 s decoded whole."""
    data = constant_flac(100.0, rate=48000, channels=2)
    info, peak = peak_memory(lambda: inspect_reference_data(data, Path("long.flac")))
    assert not isinstance(info, VoiceError)
    assert info.seconds == pytest.approx(100.0) and info.cut and info.kept_seconds <= MAX_SECONDS
    decoded = 100 * 48000 * 2 * 4 / 1e6  # what reading it whole as float32 takes
    assert peak < 25 < decoded, f"{peak:.0f} MB held for a reference of which 30 s are kept"
    with pytest.raises(VoiceError, match="100 s long; the limit is 60 s"):
        inspect_reference_data(data, Path("long.flac"), max_seconds=60)
