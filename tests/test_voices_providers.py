"""The YAML and folder voice providers: paths, defaults, modes, reload, problems, and path-escape attempts."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from wyoming_cosyvoice.config import Section, load_config
from wyoming_cosyvoice.errors import ConfigError, VoiceNotFound
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.reference import ASSET_DIR
from wyoming_cosyvoice.server import build_catalog
from wyoming_cosyvoice.voices import VoiceCatalog
from wyoming_cosyvoice_plugins.folder_voices import FolderVoiceProvider
from wyoming_cosyvoice_plugins.yaml_voices import YamlVoiceProvider, create_provider

from . import audiogen
from .helpers import SHARED_VOICES, write_config

TARS = "interstellar-tars-01-resemble-denoised.wav"


def _voices_file(path: Path, voices: list[dict[str, Any]], **top: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**top, "voices": voices}, sort_keys=False, allow_unicode=True))
    return path


def _touch_later(path: Path) -> None:
    """Move a file's mtime forward (filesystems with coarse timestamps would hide a quick rewrite)."""
    stamp = time.time() + 5
    os.utime(path, (stamp, stamp))


# ---------------------------------------------------------------------------------------------------- YAML


def test_yaml_paths_transcripts_and_modes(tmp_path: Path) -> None:
    audiogen.write(tmp_path / "cfg" / "refs" / "alice.wav")
    (tmp_path / "cfg" / "refs" / "alice.txt").write_text("Hello there, I am Alice.\n")
    audiogen.write(tmp_path / "cfg" / "bob.flac", subtype="PCM_24")
    elsewhere = audiogen.write(tmp_path / "elsewhere" / "carol.wav")
    path = _voices_file(
        tmp_path / "cfg" / "voices.yaml",
        [
            {"name": "alice", "reference_audio": "refs/alice.wav"},
            {"name": "bob", "reference_audio": "bob.flac", "languages": ["de-DE"]},
            {"name": "carol", "reference_audio": str(elsewhere), "instruct": "Speak cheerfully"},
            {"name": "dave", "reference_audio": "bob.flac", "transcript": "Hi", "mode": "cross_lingual"},
        ],
        default="bob",
    )
    profiles = {p.name: p for p in YamlVoiceProvider(path).load()}
    alice, bob, carol, dave = (profiles[n] for n in ("alice", "bob", "carol", "dave"))
    assert alice.reference_audio == tmp_path / "cfg" / "refs" / "alice.wav"  # relative to the YAML's folder
    assert alice.transcript == "Hello there, I am Alice." and alice.mode == "zero_shot"  # sidecar transcript
    assert bob.mode == "cross_lingual" and bob.default and not alice.default
    assert carol.reference_audio == elsewhere and carol.mode == "instruct"  # explicit path outside: allowed
    assert dave.mode == "cross_lingual"  # an explicit mode wins
    assert alice.source == str(path)


def test_yaml_bare_names_are_searched(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    audiogen.write(extra / "found.wav")
    path = _voices_file(
        tmp_path / "cfg" / "voices.yaml",
        [
            {"name": "found", "reference_audio": "found.wav"},
            {"name": "project", "reference_audio": "wyoming-cosyvoice-en-us.wav"},
            {"name": "lost", "reference_audio": "nowhere.wav"},
        ],
    )
    provider = YamlVoiceProvider(path, [extra, ASSET_DIR])
    profiles = {p.name: p for p in provider.load()}
    assert profiles["found"].reference_audio == extra / "found.wav"
    assert profiles["project"].reference_audio == ASSET_DIR / "wyoming-cosyvoice-en-us.wav"
    assert profiles["project"].mode == "zero_shot"  # the asset's transcript beside it
    assert "lost" not in profiles
    (problem,) = provider.problems
    assert problem.startswith(f"{path}: voice 'lost': voices[2].reference_audio: 'nowhere.wav' not found (looked in:")
    assert str(extra) in problem and "\n" not in problem


def test_default_tars_found_in_the_cosyvoice_checkout(tmp_path: Path) -> None:
    if not (SHARED_VOICES / TARS).is_file():
        pytest.skip("shared TARS voice not available")
    checkout = tmp_path / "CosyVoice"
    (checkout / "asset").mkdir(parents=True)
    (checkout / "asset" / TARS).symlink_to(SHARED_VOICES / TARS)  # a checkout's asset/ folder, not the project's
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "voices.yaml").write_text((Path(__file__).parents[1] / "config" / "voices.yaml").read_text())
    server = write_config(cfg, engines={"cosyvoice": {"repo": str(checkout)}})
    # write_config rewrote voices.yaml; put the shipped one back.
    (cfg / "voices.yaml").write_text((Path(__file__).parents[1] / "config" / "voices.yaml").read_text())
    catalog = build_catalog(load_config(server), Plugins())
    tars = catalog.resolve(None, None)
    assert tars.name == "tars" and tars.default
    assert tars.reference_audio == checkout / "asset" / TARS
    assert tars.mode == "cross_lingual" and tars.transcript is None
    # With a transcript beside it, the same profile becomes zero-shot.
    (checkout / "asset" / TARS.replace(".wav", ".txt")).write_text(
        "Everybody good? Plenty of slaves for my robot colony?"
    )
    _touch_later(cfg / "voices.yaml")
    assert catalog.refresh()[0].mode == "zero_shot"


def test_shipped_voices_without_tars_fall_back_to_the_project_voice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh install: TARS is not found, one info line says how to add it, the default is the project's voice."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="wyoming_cosyvoice_plugins")  # the voices commands quiet it in-process
    shipped = Path(__file__).parents[1] / "config" / "voices.yaml"
    cfg = tmp_path / "cfg"
    server = write_config(cfg)
    (cfg / "voices.yaml").write_text(shipped.read_text())
    catalog = build_catalog(load_config(server), Plugins())
    assert [p.name for p in catalog.profiles] == ["robot-en", "robot-de"]
    assert catalog.resolve(None, None).name == "robot-en"
    assert catalog.resolve(None, "de").name == "robot-de"
    assert catalog.problems == [], "a voice that is optional and not set up is no problem (voices check passes)"
    (note,) = catalog.notes
    assert note.startswith(f"{cfg / 'voices.yaml'}: voice 'tars': not set up: its recording '{TARS}' was not found")
    assert f"copy the file into {cfg}" in note and "until then the first usable voice is the default" in note
    said = [r for r in caplog.records if r.name.startswith("wyoming_cosyvoice")]
    assert [(r.levelname, r.getMessage()) for r in said] == [("INFO", note)], "one info line, no warning"
    for profile in catalog.profiles:
        assert profile.reference_audio is not None and profile.reference_audio.parent == ASSET_DIR
        assert profile.mode == "zero_shot" and profile.transcript
    # Copying the recording into place adds the voice at the next reload, as the default (voices.yaml untouched).
    audiogen.write(cfg / TARS)
    assert [p.name for p in catalog.refresh()] == ["tars", "robot-en", "robot-de"]
    assert catalog.resolve(None, None).name == "tars" and catalog.notes == []


def test_optional_voice_with_a_path_and_a_bad_optional_value(tmp_path: Path) -> None:
    """`optional` works for a path too; anything but true/false is a problem naming the key."""
    path = _voices_file(
        tmp_path / "voices.yaml",
        [
            {"name": "later", "reference_audio": "refs/later.wav", "optional": True},
            {"name": "odd", "reference_audio": "refs/later.wav", "optional": "yes"},
            {"name": "robot"},
        ],
    )
    provider = YamlVoiceProvider(path)
    assert [p.name for p in provider.load()] == ["robot"]
    (note,) = provider.notes
    assert f"voice 'later': not set up: its recording {tmp_path / 'refs' / 'later.wav'} was not found" in note
    (problem,) = provider.problems
    assert problem.endswith("voice 'odd': voices[1].optional: expected true or false, got 'yes'")


def test_yaml_bad_entries_are_skipped_and_named(tmp_path: Path) -> None:
    audiogen.write(tmp_path / "ok.wav")
    path = _voices_file(
        tmp_path / "voices.yaml",
        [
            {"name": "good", "reference_audio": "ok.wav"},
            {"name": "fast", "speed": "fast"},
            {"name": "../../etc/passwd"},
            {"name": "zs", "mode": "zero_shot", "reference_audio": "ok.wav"},
            {"name": "lang", "languages": ["english please"]},
            {"name": "typo", "descripton": "x"},
        ],
    )
    provider = YamlVoiceProvider(path)
    assert [p.name for p in provider.load()] == ["good"]
    expected = [
        "voice 'fast': voices[1].speed: expected a number, got 'fast'",
        "voice '../../etc/passwd': voices[2].name: '../../etc/passwd' is not a valid voice name",
        "voice 'zs': voices[3].transcript: zero_shot mode needs the transcript",
        "voice 'lang': voices[4].languages[0]: 'english please' is not a BCP-47 language tag",
        "voice 'typo': voices[5].descripton: unknown key",
    ]
    assert len(provider.problems) == len(expected)
    for line, part in zip(provider.problems, expected, strict=True):
        assert line.startswith(f"{path}: {part}"), line


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "voices.yaml"
    path.write_text(f'voices:\n  - !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="invalid YAML"):
        YamlVoiceProvider(path)
    assert not marker.exists()


def test_yaml_reload_on_change_keeps_old_voices_on_a_broken_file(tmp_path: Path) -> None:
    path = _voices_file(tmp_path / "voices.yaml", [{"name": "one"}])
    provider = YamlVoiceProvider(path)
    _voices_file(path, [{"name": "one"}, {"name": "two"}])
    _touch_later(path)
    assert [p.name for p in provider.load()] == ["one", "two"]
    path.write_text("voices: [unclosed\n")
    stamp = time.time() + 10
    os.utime(path, (stamp, stamp))
    assert [p.name for p in provider.load()] == ["one", "two"]


def test_yaml_search_folders_and_checkout_from_server_config(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    server = write_config(cfg, engines={"cosyvoice": {"repo": "../CosyVoice"}})
    section = Section("yaml", {"path": "voices.yaml", "search": ["refs"]}, str(server), "voice_providers.yaml", cfg)
    provider = create_provider(section)
    assert provider.search == [cfg, cfg / "refs", ASSET_DIR, cfg / ".." / "CosyVoice" / "asset"]


# ---------------------------------------------------------------------------------------------------- folder


def _voice_folder(root: Path, lang: str, name: str, **files: str) -> Path:
    folder = root / lang / name
    audiogen.write(folder / "reference.wav")
    for filename, text in files.items():
        (folder / filename.replace("_", ".", 1) if "_" in filename else folder / filename).write_text(text)
    return folder


def test_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    _voice_folder(root, "en_US", "alice", transcript_txt="Hello, I am Alice.\n")
    _voice_folder(root, "de-DE", "bernd", instruct_txt="Sprich fröhlich.")
    _voice_folder(root, "en_GB", "carl", profile_yaml="description: Carl from London\nspeed: 1.2\ndefault: true\n")
    (root / ".staging" / "x").mkdir(parents=True)  # hidden: ignored
    profiles = {p.name: p for p in FolderVoiceProvider(root).load()}
    assert sorted(profiles) == ["alice", "bernd", "carl"]
    alice, bernd, carl = profiles["alice"], profiles["bernd"], profiles["carl"]
    assert alice.languages == ("en-US",) and alice.mode == "zero_shot" and alice.transcript == "Hello, I am Alice."
    assert alice.reference_audio == (root / "en_US" / "alice" / "reference.wav").resolve()
    assert alice.source == str(root / "en_US" / "alice") and alice.description == "alice"
    assert bernd.languages == ("de-DE",) and bernd.mode == "instruct" and bernd.instruct == "Sprich fröhlich."
    assert carl.description == "Carl from London" and carl.speed == 1.2 and carl.default
    assert carl.mode == "cross_lingual"


def test_folder_reload_add_change_remove(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    provider = FolderVoiceProvider(root)  # missing folder: no voices yet, no error
    assert provider.load() == []
    _voice_folder(root, "en_US", "alice")
    assert [p.name for p in provider.load()] == ["alice"]
    (root / "en_US" / "alice" / "transcript.txt").write_text("Now with words.")
    (alice,) = provider.load()
    assert alice.mode == "zero_shot"
    _voice_folder(root, "en_US", "bob")
    assert [p.name for p in provider.load()] == ["alice", "bob"]
    for child in (root / "en_US" / "alice").iterdir():
        child.unlink()
    (root / "en_US" / "alice").rmdir()
    assert [p.name for p in provider.load()] == ["bob"]


def test_folder_problems_are_named_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    _voice_folder(root, "en_US", "good")
    (root / "en_US" / "empty").mkdir()
    _voice_folder(root, "en_US", "badyaml", profile_yaml="speed: fast\n")
    _voice_folder(root, "en_US", "sneaky", profile_yaml="reference_audio: ../../../etc/passwd\n")
    _voice_folder(root, "english", "lang")
    _voice_folder(root, "en_US", "bad name")
    provider = FolderVoiceProvider(root)
    assert [p.name for p in provider.load()] == ["good"]
    lines = sorted(provider.problems)
    assert len(lines) == 5
    expected = {
        "badyaml": "profile.yaml:speed: expected a number, got 'fast'",
        "bad name": "folder name is not a valid voice name",
        "empty": "no reference.wav or reference.flac in the folder",
        "lang": "language folder 'english' is not a language tag",
        "sneaky": "profile.yaml:reference_audio: not allowed here",
    }
    for name, problem in expected.items():
        lang = "english" if name == "lang" else "en_US"
        prefix = f"{root / lang / name}: voice {name!r}: {problem}"
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)


def test_folder_symlinks_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    outside = audiogen.write(tmp_path / "outside" / "secret.wav")
    (tmp_path / "outside" / "notes.txt").write_text("private")
    linked = root / "en_US" / "linked"
    linked.mkdir(parents=True)
    (linked / "reference.wav").symlink_to(outside)
    text_link = _voice_folder(root, "en_US", "textlink")
    (text_link / "transcript.txt").symlink_to(tmp_path / "outside" / "notes.txt")
    (root / "de_DE").mkdir()
    audiogen.write(tmp_path / "outside" / "voice" / "reference.wav")
    (root / "de_DE" / "dirlink").symlink_to(tmp_path / "outside" / "voice", target_is_directory=True)
    inside = _voice_folder(root, "en_US", "inside")
    (root / "en_US" / "alias").mkdir()
    (root / "en_US" / "alias" / "reference.wav").symlink_to(inside / "reference.wav")  # stays inside: fine
    provider = FolderVoiceProvider(root)
    assert sorted(p.name for p in provider.load()) == ["alias", "inside"]
    assert len(provider.problems) == 3
    for line in provider.problems:
        assert "points outside the voices folder" in line and line.endswith("; refused"), line
        assert "voice 'linked'" in line or "voice 'textlink'" in line or "voice 'dirlink'" in line


def test_request_names_never_become_paths(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    _voice_folder(root, "en_US", "alice")
    catalog = VoiceCatalog([FolderVoiceProvider(root)])
    for name in ("../../etc/passwd", "/etc/passwd", "en_US/alice", "en_US/alice/reference.wav", "..", "alice/"):
        with pytest.raises(VoiceNotFound, match="unknown voice"):
            catalog.resolve(name, None)
    assert catalog.resolve("ALICE", None).name == "alice"


def test_duplicate_names_across_providers_first_wins_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "voices"
    _voice_folder(root, "en_US", "alice")
    path = _voices_file(tmp_path / "voices.yaml", [{"name": "alice", "description": "YAML Alice"}])
    catalog = VoiceCatalog([YamlVoiceProvider(path), FolderVoiceProvider(root)])
    for _ in range(3):
        catalog.refresh()
    assert [p.description for p in catalog.profiles] == ["YAML Alice"]
    assert catalog.problems == [f"{root / 'en_US' / 'alice'}: voice 'alice': ignored: already defined in {path}"]
    assert sum("already defined" in r.getMessage() for r in caplog.records) == 1
