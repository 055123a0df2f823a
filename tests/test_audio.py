"""PCM helpers."""

import numpy as np

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter, apply_gain, float_to_pcm16, split_pcm


def test_float_to_pcm16_clips_and_cleans() -> None:
    pcm = np.frombuffer(float_to_pcm16(np.array([0.0, 0.5, 2.0, -3.0, np.nan])), dtype="<i2")
    assert pcm.tolist() == [0, 16383, 32767, -32767, 0]


def test_gain_clips() -> None:
    pcm = np.array([1000, -20000, 30000], dtype="<i2").tobytes()
    assert np.frombuffer(apply_gain(pcm, 2.0), dtype="<i2").tolist() == [2000, -32768, 32767]


def test_split_on_frame_boundaries() -> None:
    assert [len(p) for p in split_pcm(b"\x00" * 10, 4)] == [4, 4, 2]
    assert [len(p) for p in split_pcm(b"\x00" * 12, 5, frame_bytes=4)] == [4, 4, 4]


def test_streaming_resample_matches_length_and_pitch() -> None:
    rate_in, rate_out = 22050, 48000
    t = np.arange(rate_in) / rate_in
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()
    conv = PcmConverter(AudioFormat(rate_in, 2, 1), AudioFormat(rate_out, 2, 2))
    out = b"".join(conv.convert(piece) for piece in split_pcm(tone, 2000))
    frames = np.frombuffer(out, dtype="<i2").reshape(-1, 2)
    assert abs(len(frames) - rate_out) <= 2
    assert (frames[:, 0] == frames[:, 1]).all()
    spectrum = np.abs(np.fft.rfft(frames[:, 0].astype(float)))
    peak_hz = np.argmax(spectrum) * rate_out / len(frames)
    assert abs(peak_hz - 440) < 2
