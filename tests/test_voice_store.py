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


def _outside_language_folder(tmp_path: Path) -> tuple[Path, Path]:
    """`voices/en_US` a symlink to a folder outside holding `precious/thesis.txt` (issue 21, finding 2)."""
    outside = tmp_path / "outside"
    (outside / "precious").mkdir(parents=True)
    (outside / "precious" / "thesis.txt").write_text("years of work\n")
    folder = tmp_path / "voices"
    folder.mkdir()
    (folder / "en_US").symlink_to(outside, target_is_directory=True)
    return folder, outside


@pytest.mark.parametrize("force", [False, True])
def test_write_voice_never_writes_or_deletes_through_a_symlinked_language_folder(tmp_path: Path, force: bool) -> None:
    folder, outside = _outside_language_folder(tmp_path)
    data = write(tmp_path / "a.wav").read_bytes()
    with pytest.raises(VoiceError, match="en_US/ in the voices folder is a link"):
        write_voice(folder, "precious", "en-US", data, ".wav", force=force)
    assert (outside / "precious" / "thesis.txt").read_text() == "years of work\n"
    assert _files(outside) == ["precious", "precious/thesis.txt"], "something was written outside"
    assert find_voice_dirs(folder, "precious") == []
    with pytest.raises(VoiceError, match="not in the voices folder"):
        remove_voice(folder, "precious")
    assert (outside / "precious" / "thesis.txt").is_file()


def test_write_voice_never_replaces_a_link_or_file_that_is_not_a_voice_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    folder = tmp_path / "voices"
    (folder / "en_US").mkdir(parents=True)
    (folder / "en_US" / "linked").symlink_to(outside, target_is_directory=True)
    (folder / "en_US" / "plain").write_text("a file, not a voice\n")
    data = write(tmp_path / "a.wav").read_bytes()
    for name in ("linked", "plain"):
        with pytest.raises(VoiceError, match="is not a voice folder"):
            write_voice(folder, name, "en-US", data, ".wav", force=True)
    assert (outside / "keep.txt").read_text() == "keep\n" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (folder / "en_US" / "linked").is_symlink() and (folder / "en_US" / "plain").is_file()
    assert _files(folder) == ["en_US", "en_US/linked", "en_US/plain"], "a staging folder was left behind"


def test_a_symlinked_voices_folder_itself_is_still_written_through(tmp_path: Path) -> None:
    real = tmp_path / "data" / "voices"
    real.mkdir(parents=True)
    folder = tmp_path / "voices"
    folder.symlink_to(real, target_is_directory=True)
    data = write(tmp_path / "a.wav").read_bytes()
    assert write_voice(folder, "alice", "en-US", data, ".wav") == folder / "en_US" / "alice"
    assert (real / "en_US" / "alice" / "reference.wav").read_bytes() == data
    write_voice(folder, "alice", "de-DE", data, ".wav", force=True)
    assert _files(real) == ["de_DE", "de_DE/alice", "de_DE/alice/reference.wav", "en_US"]
