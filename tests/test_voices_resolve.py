"""How a request's voice name or language resolves to a profile (docs/voices.md: "Choosing a voice")."""

import pytest

from wyoming_cosyvoice.errors import VoiceNotFound
from wyoming_cosyvoice.voices import VoiceCatalog, VoiceProfile


class Static:
    def __init__(self, *profiles: VoiceProfile) -> None:
        self.profiles = list(profiles)

    def load(self) -> list[VoiceProfile]:
        return self.profiles


CATALOG = VoiceCatalog(
    [
        Static(
            VoiceProfile("tars", "TARS", ("en-US",)),
            VoiceProfile("anna", "Anna", ("de-DE",), default=True),
            VoiceProfile("max", "Max", ("de-AT", "en-GB")),
        ),
        Static(VoiceProfile("tars", "Duplicate", ("fr-FR",)), VoiceProfile("li", "Li", ("zh-CN",))),
    ]
)


@pytest.mark.parametrize(
    ("name", "language", "expected"),
    [
        (None, None, "anna"),  # the profile marked default
        ("tars", None, "tars"),
        ("TARS", None, "tars"),  # case-insensitive fallback
        ("Max", None, "max"),  # by description
        (None, "de-DE", "anna"),  # default lists the exact tag
        (None, "en-GB", "max"),  # first exact match in order
        (None, "de-AT", "max"),  # exact beats the default's primary-subtag match
        (None, "de", "anna"),  # primary subtag: default first
        (None, "en", "tars"),  # primary subtag: first in order
        (None, "zh-TW", "li"),
        (None, "fr-FR", "anna"),  # the duplicate "tars" was dropped; nothing speaks French
        ("li", "en-US", "li"),  # a name beats a language
    ],
)
def test_resolution_rules(name, language, expected) -> None:  # type: ignore[no-untyped-def]
    assert CATALOG.resolve(name, language).name == expected


def test_first_profile_is_default_without_marker() -> None:
    catalog = VoiceCatalog([Static(VoiceProfile("a"), VoiceProfile("b"))])
    assert catalog.resolve().name == "a"


def test_unknown_name_lists_available() -> None:
    with pytest.raises(VoiceNotFound, match=r"unknown voice '../../etc/passwd' \(available: tars, anna, max, li\)"):
        CATALOG.resolve("../../etc/passwd")
    with pytest.raises(VoiceNotFound, match="no voice profiles are configured"):
        VoiceCatalog([]).resolve()
