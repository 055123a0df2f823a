"""`wyoming-cosyvoice voices list|check|add`, run as a user would, and the project's own reference assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.reference import ASSET_DIR, inspect_reference

from . import audiogen
from .helpers import SHARED_VOICES, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(tmp_path / "cache"))


def _server(tmp_path: Path) -> Path:
    """A config with a good YAML voice, a broken (8 kHz) one, and a voices folder."""
    audiogen.write(tmp_path / "cfg" / "good.wav", 3.0, 24000)
    (tmp_path / "cfg" / "good.txt").write_text("Hello there, this is a good voice.\n")
    audiogen.write(tmp_path / "cfg" / "phone.wav", 3.0, 8000)
    return write_config(
        tmp_path / "cfg",
        voices=[
            {"name": "good", "description": "Good voice", "reference_audio": "good.wav"},
            {"name": "phone", "reference_audio": "phone.wav", "languages": ["de-DE"]},
            {"name": "plain", "languages": ["en-GB"]},
        ],
        voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wyoming_cosyvoice", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ},
    )


def test_list_and_check_as_a_subprocess(tmp_path: Path) -> None:
    server = _server(tmp_path)
    listed = _cli("voices", "list", "--config", str(server))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in listed.stdout.splitlines()}
    assert rows["good"].startswith("*") and " ok " in rows["good"] and " espeak voice for en-US " in rows["good"]
    assert "(3.0 s)" in rows["good"] and rows["good"].rstrip().endswith("Good voice")
    assert " broken " in rows["phone"] and " warning " in rows["plain"]

    checked = _cli("voices", "check", "--config", str(server))
    assert checked.returncode == 1  # something is broken
    out = checked.stdout
    assert "good: ok\n" in out and "transcript: 34 characters" in out
    assert "reference: " + str(tmp_path / "cfg" / "good.wav") + ": WAV PCM_16, 24000 Hz, 1 ch, 3.00 s" in out
    assert f"  error: {tmp_path / 'cfg' / 'voices.yaml'}: voice 'phone': reference audio" in out
    assert "sample rate 8000 Hz is below the minimum of 16000 Hz" in out
    assert "plain: warning" in out and "no reference audio" in out


def test_list_json_and_check_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = _server(tmp_path)
    assert main(["voices", "list", "--json", "--config", str(server)]) == 0
    doc = json.loads(capsys.readouterr().out)
    states = {row["name"]: (row["state"], row["default"]) for row in doc["voices"]}
    assert states == {"good": ("ok", True), "phone": ("broken", False), "plain": ("warning", False)}
    assert main(["voices", "check", "good", "--config", str(server)]) == 0
    assert "good: ok" in capsys.readouterr().out
    assert main(["voices", "check", "../../etc/passwd", "--config", str(server)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown voice '../../etc/passwd' (available: good, phone, plain)"


@pytest.mark.parametrize("model_dir", [None, "no-model"])
def test_list_says_what_the_engine_will_do_with_each_voice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_dir: str | None
) -> None:
    """Not "zero-shot": what a listener will hear. The CosyVoice engine cannot start here, so espeak speaks every
    voice in its language (the recording unused); a voice naming the CosyVoice engine is not spoken by espeak."""
    audiogen.write(tmp_path / "cfg" / "good.wav", 3.0, 24000)
    cosyvoice = {"model_dir": str(tmp_path / model_dir), "repo": str(tmp_path / "no-checkout")} if model_dir else {}
    server = write_config(
        tmp_path / "cfg",
        voices=[
            {"name": "good", "reference_audio": "good.wav", "languages": ["de-DE"]},
            {"name": "pinned", "reference_audio": "good.wav", "engine": "cosyvoice"},
            {"name": "robot", "languages": ["en-GB"], "engine": "espeak"},
        ],
        engine={"name": "cosyvoice", "fallback": "espeak"},
        engines={"cosyvoice": cosyvoice},
    )
    assert main(["voices", "list", "--json", "--config", str(server)]) == 0
    heard = {row["name"]: row["heard_as"] for row in json.loads(capsys.readouterr().out)["voices"]}
    why = "engine cosyvoice not set up" if model_dir is None else "cosyvoice engine: CosyVoice checkout"
    assert heard["good"].startswith(f"espeak voice for de-DE ({why}"), heard
    assert heard["pinned"].startswith(f"nothing: {why}") and heard["robot"] == "espeak voice for en-GB"


def test_check_a_recording_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = _server(tmp_path)
    quiet = audiogen.write(tmp_path / "quiet.wav", 3.0, 48000, peak=0.02, channels=2)
    assert main(["voices", "check", "good", "--audio", str(quiet), "--config", str(server)]) == 0
    out = capsys.readouterr().out
    assert f"{quiet}: warning: WAV PCM_16, 48000 Hz, 2 ch, 3.00 s" in out
    assert "warning: 2 channels mixed down to mono" in out and "warning: too quiet" in out


def test_add_validates_then_writes_a_folder_the_server_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = _server(tmp_path)
    folder = tmp_path / "cfg" / "voices"
    phone = tmp_path / "cfg" / "phone.wav"
    assert main(["voices", "add", "bad", str(phone), "--config", str(server)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {phone}: voice 'bad': reference audio {phone}: sample rate 8000 Hz")
    assert not folder.exists()  # nothing written

    source = SHARED_VOICES / "zero_shot_prompt.wav"
    if not source.is_file():
        source = audiogen.write(tmp_path / "float.wav", 3.5, 24000, subtype="FLOAT")
    transcript = tmp_path / "words.txt"
    transcript.write_text("希望你以后能够做的比我还好呦。\n")
    code = main(
        [
            "voices",
            "add",
            "mei",
            str(source),
            "--transcript-file",
            str(transcript),
            "--language",
            "zh-CN",
            "--description",
            "Mei (中文)",
            "--config",
            str(server),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "added voice 'mei' (zh-CN, zero_shot)" in out
    assert "  heard as: espeak voice for zh-CN\n" in out  # the config's engine is espeak: the recording is unused
    voice = folder / "zh_CN" / "mei"
    assert sorted(p.name for p in voice.iterdir()) == ["profile.yaml", "reference.wav", "transcript.txt"]
    assert (voice / "reference.wav").read_bytes() == source.read_bytes()
    assert [p.name for p in folder.glob("*/.*")] == []  # no staging leftovers

    assert main(["voices", "add", "mei", str(source), "--config", str(server)]) == 2
    assert "already exists (use --force to replace it)" in capsys.readouterr().err
    assert main(["voices", "add", "good", str(source), "--config", str(server)]) == 2
    assert "voice 'good': a voice of this name exists already" in capsys.readouterr().err
    assert main(["voices", "add", "../evil", str(source), "--config", str(server)]) == 2
    assert "not a valid voice name" in capsys.readouterr().err

    flac = audiogen.write(tmp_path / "new.flac", 4.0, 44100, subtype="PCM_24")
    code = main(
        [
            "voices",
            "add",
            "mei",
            str(flac),
            "--language",
            "zh-CN",
            "--force",
            "--instruct",
            "用开心的语气说",
            "--config",
            str(server),
        ]
    )
    assert code == 0
    assert "added voice 'mei' (zh-CN, instruct)" in capsys.readouterr().out
    assert sorted(p.name for p in voice.iterdir()) == ["instruct.txt", "reference.flac"]

    assert main(["voices", "list", "--json", "--config", str(server)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["voices"]}
    assert rows["mei"]["mode"] == "instruct" and rows["mei"]["languages"] == ["zh-CN"]
    assert rows["mei"]["state"] == "ok" and rows["mei"]["seconds"] == pytest.approx(4.0, abs=0.05)


def test_project_assets_are_valid_and_have_transcripts() -> None:
    wavs = sorted(ASSET_DIR.glob("*.wav"))
    assert len(wavs) >= 2
    for wav in wavs:
        info = inspect_reference(wav, has_transcript=True)
        assert info.warnings == () and 3.0 <= info.kept_seconds <= 15.0 and info.rate >= 16000
        words = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert len(words.split()) >= 10


def test_make_assets_script_reproduces_the_shipped_recordings(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ROOT / "script" / "make-assets"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    for shipped in sorted(ASSET_DIR.glob("*.wav")):
        made = tmp_path / shipped.name
        assert made.with_suffix(".txt").read_text() == shipped.with_suffix(".txt").read_text()
        a, b = sf.info(str(made)), sf.info(str(shipped))
        assert (a.samplerate, a.channels, a.subtype) == (b.samplerate, b.channels, b.subtype)
        assert abs(a.duration - b.duration) < 0.05 * b.duration  # same words at the same rate


def test_list_and_check_report_a_voice_naming_an_unregistered_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = write_config(
        tmp_path / "cfg", voices=[{"name": "plain", "engine": "espeak"}, {"name": "ghost", "engine": "nosuch"}]
    )
    assert main(["voices", "list", "--json", "--config", str(server)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["voices"]}
    assert rows["plain"]["state"] == "warning" and rows["ghost"]["state"] == "broken"
    assert rows["ghost"]["problem"] == (
        f"{tmp_path / 'cfg' / 'voices.yaml'}: voice 'ghost': needs engine nosuch, "
        "which is not registered (cosyvoice, espeak, triton)"
    )
    assert main(["voices", "check", "--config", str(server)]) == 1
    out = capsys.readouterr().out
    assert "plain: warning\n" in out and "  engine: espeak (started with the server;" in out
    assert "ghost: broken\n" in out and "needs engine nosuch, which is not registered" in out
