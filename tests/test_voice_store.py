"""voice_store: the one code path that writes the voices folder (`voices add` and the studio page)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wyoming_cosyvoice.errors import VoiceError
from wyoming_cosyvoice.voice_store import (
    check_name,
    find_voice_dirs,
    remove_voice,
    transcript_warning,
    update_voice,
    write_voice,
)
from wyoming_cosyvoice_plugins.folder_voices import FolderVoiceProvider

from .audiogen import write


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_write_voice_from_bytes_is_read_back_by_the_folder_provider(tmp_path: Path) -> None:
    data = write(tmp_path / "a.wav").read_bytes()
    folder = tmp_path / "voices"
    target = write_voice(folder, "alice", "en-US", data, ".wav", transcript="Hi there.", description="Alice A")
    assert target == folder / "en_US" / "alice"
    assert _files(folder) == [
        "en_US",
        "en_US/alice",
        "en_US/alice/profile.yaml",
        "en_US/alice/reference.wav",
        "en_US/alice/transcript.txt",
    ]
    (profile,) = FolderVoiceProvider(folder).load()
    assert (profile.name, profile.description, profile.languages, profile.mode) == (
        "alice",
        "Alice A",
        ("en-US",),
        "zero_shot",
    )
    assert profile.reference_audio is not None and profile.reference_audio.read_bytes() == data


def test_existing_name_is_refused_unless_forced_and_force_replaces_it_in_any_language(tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    audio = write(tmp_path / "a.wav")
    write_voice(folder, "bob", "de-DE", audio, ".wav")
    with pytest.raises(VoiceError, match="already exists"):
        write_voice(folder, "bob", "en-US", audio, ".wav")
    write_voice(folder, "bob", "en-US", audio, ".wav", transcript="Hello.", force=True)
    assert find_voice_dirs(folder, "bob") == [folder / "en_US" / "bob"]
    assert not any(p.name.startswith(".") for p in folder.rglob("*")), "staging or old folders left behind"


@pytest.mark.parametrize("name", ["../evil", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "na me", "*"])
def test_names_that_are_not_one_safe_path_component_are_refused_before_any_write(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "voices"
    with pytest.raises(VoiceError, match="not a valid voice name"):
        write_voice(folder, name, "en-US", b"RIFF", ".wav")
    with pytest.raises(VoiceError):
        check_name(name)
    assert not folder.exists()


def test_update_changes_texts_and_keeps_other_profile_keys(tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    voice = write_voice(folder, "carol", "en-US", write(tmp_path / "a.wav"), ".wav", transcript="One.")
    (voice / "profile.yaml").write_text("description: Carol\nspeed: 1.2\n")
    update_voice(folder, "carol", description="Carol C", languages=["en-US", "de_DE"], transcript="Two words.")
    assert yaml.safe_load((voice / "profile.yaml").read_text()) == {
        "description": "Carol C",
        "speed": 1.2,
        "languages": ["en-US", "de-DE"],
    }
    assert (voice / "transcript.txt").read_text() == "Two words.\n"
    update_voice(folder, "carol", transcript="")
    assert not (voice / "transcript.txt").exists()
    with pytest.raises(VoiceError, match="BCP-47"):
        update_voice(folder, "carol", languages=["english!"])
    with pytest.raises(VoiceError, match="not in the voices folder"):
        update_voice(folder, "nobody", description="x")


def test_remove_deletes_the_folder_and_nothing_else(tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    audio = write(tmp_path / "a.wav")
    write_voice(folder, "dave", "en-US", audio, ".wav")
    write_voice(folder, "erin", "en-US", audio, ".wav")
    remove_voice(folder, "dave")
    assert _files(folder) == ["en_US", "en_US/erin", "en_US/erin/reference.wav"]
    with pytest.raises(VoiceError, match="not in the voices folder"):
        remove_voice(folder, "dave")


def test_a_symlinked_voice_folder_leading_outside_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "frank"
    outside.mkdir(parents=True)
    folder = tmp_path / "voices"
    (folder / "en_US").mkdir(parents=True)
    (folder / "en_US" / "frank").symlink_to(outside)
    assert find_voice_dirs(folder, "frank") == []
    with pytest.raises(VoiceError, match="not in the voices folder"):
        update_voice(folder, "frank", description="owned")
    assert list(outside.iterdir()) == []


def test_transcript_warning_flags_a_transcript_too_long_for_the_audio() -> None:
    assert transcript_warning("Hello there.", 2.0) is None
    warning = transcript_warning("x" * 200, 2.0)
    assert warning is not None and "does it match the recording" in warning
