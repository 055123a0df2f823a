"""The studio's voice routes: list (with state and waveform), check an upload, add, edit and remove folder voices.

Adding, editing and removing go through `voice_store` (the code `voices add` uses), into the folder voice
provider's directory only; file and audio work runs on threads. After each change the catalog is refreshed at once
(as a `describe` would), so the engine starts preparing the voice and the next listing shows it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

from ..errors import VoiceError
from ..reference import ReferenceInfo, inspect_reference_data
from ..voice_store import (
    check_language,
    check_name,
    check_texts,
    find_voice_dirs,
    remove_voice,
    transcript_warning,
    update_voice,
    write_voice,
)
from ..voices import STALE_CACHE_HINT, VoiceProfile
from .app import FORM_KEY, STUDIO_KEY, Studio, problem
from .connections import request_client
from .forms import Form
from .waveform import envelope, file_envelope

_LOGGER = logging.getLogger(__name__)

HA_NOTE = (
    "Home Assistant reads the voice list only when the Wyoming integration is loaded: reload it (Settings > "
    "Devices & services > Wyoming Protocol > ... > Reload) to see this change there."
)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the voice routes."""
    router.add_get("/api/voices", list_voices)
    router.add_get("/api/voices/{name}/envelope", voice_envelope)
    router.add_post("/api/check", check_upload)
    router.add_post("/api/voices", add_voice)
    router.add_patch("/api/voices/{name}", edit_voice)
    router.add_delete("/api/voices/{name}", delete_voice)


def _is_folder_voice(studio: Studio, profile: VoiceProfile) -> bool:
    """True for a voice that lives in the voices folder (only those can be edited or removed here)."""
    if not profile.source:
        return False
    try:
        return Path(profile.source).resolve().parent.parent == studio.voices_dir.resolve()
    except OSError:
        return False


def _voice_row(studio: Studio, profile: VoiceProfile, default: Optional[str], preparing: set[str]) -> dict[str, Any]:
    service = studio.service
    problem_line = service.catalog.broken.get(profile.name)
    info = service.preparer.references.get(profile.name)
    warnings = list(info.warnings) if info else []
    mismatch = transcript_warning(profile.transcript, info.kept_seconds) if info else None
    if mismatch:
        warnings.append(mismatch)
    if problem_line:
        state = "broken"
    elif profile.name in preparing:
        state = "preparing"
    else:
        state = "warning" if warnings else "ok"
    engine = profile.engine or service.engines.main_name
    folder = _is_folder_voice(studio, profile)
    return {
        "name": profile.name,
        "description": profile.description or profile.name,
        "languages": list(profile.languages),
        "mode": profile.mode,
        "state": state,
        "problem": studio.redact(problem_line) if problem_line else None,
        "warnings": [studio.redact(w) for w in warnings],
        "engine": engine,
        "heard_as": None if problem_line else service.heard_as(profile),
        "default": profile.name == default,
        "seconds": round(info.seconds, 2) if info else None,
        "kept_seconds": round(info.kept_seconds, 2) if info else None,
        "rate": info.rate if info else None,
        "has_reference": profile.reference_audio is not None,
        "transcript": profile.transcript or "",
        "instruct": profile.instruct or "",
        "editable": folder,
        "origin": "voices folder" if folder else Path(profile.source).name if profile.source else "configuration",
    }


async def list_voices(request: web.Request) -> web.Response:
    """Every voice with its state (ok / warning / preparing / broken and why), and the folders that were skipped."""
    studio = request.app[STUDIO_KEY]
    service = studio.service
    await service.preparer.refresh()  # what a describe does: picks up changes made outside the page too
    default = service.catalog.default
    preparing = service.preparer.preparing()
    rows = [_voice_row(studio, p, default.name if default else None, preparing) for p in service.catalog.all_profiles]
    broken = set(service.catalog.broken.values())
    skipped = [studio.redact(line) for line in service.catalog.problems if line not in broken]
    return web.json_response({"voices": rows, "skipped": skipped, "note": HA_NOTE})


def _profile(studio: Studio, name: str) -> Optional[VoiceProfile]:
    return next((p for p in studio.service.catalog.all_profiles if p.name == name), None)


async def voice_envelope(request: web.Request) -> web.Response:
    """The peak envelope of a voice's reference recording (for its waveform picture)."""
    studio = request.app[STUDIO_KEY]
    name = request.match_info["name"]
    profile = _profile(studio, name)
    if profile is None or profile.reference_audio is None:
        return problem(404, f"voice {name[:64]!r} has no reference recording")
    try:
        data = await asyncio.to_thread(file_envelope, profile.reference_audio)
    except (OSError, ValueError) as err:
        return problem(422, studio.redact(f"reference of voice {name!r} cannot be read: {err}"))
    return web.json_response(data)


async def _validate(studio: Studio, form: Form, *, saving: bool) -> tuple[dict[str, Any], Optional[ReferenceInfo]]:
    """What `voices check` would say about the form's voice, without writing anything."""
    errors: list[str] = []
    warnings: list[str] = []
    name = form.get("name").strip()
    language = form.get("language", "en-US").strip() or "en-US"
    try:
        check_name(name)
    except VoiceError as err:
        errors.append(str(err))
    try:
        language = check_language(name, language)
    except VoiceError as err:
        errors.append(str(err))
    transcript = description = None
    try:
        transcript, description = check_texts(name, form.get("transcript"), form.get("description"))
    except VoiceError as err:
        errors.append(str(err))
    if name and not errors:
        existing = _profile(studio, name)
        in_folder = await asyncio.to_thread(find_voice_dirs, studio.voices_dir, name)
        if existing is not None and not _is_folder_voice(studio, existing):
            errors.append(f"voice {name!r}: a voice of this name is defined in {Path(existing.source).name}")
        elif (existing is not None or in_folder) and not form.flag("replace"):
            errors.append(f"voice {name!r}: already exists (tick 'replace' to overwrite it)")
        elif existing is not None or in_folder:
            warnings.append(f"replaces the existing voice {name!r}. {STALE_CACHE_HINT}")
    info: Optional[ReferenceInfo] = None
    picture = None
    if form.audio is None:
        errors.append("no recording: upload a WAV/FLAC file or record one")
    else:
        try:
            info = await asyncio.to_thread(
                inspect_reference_data,
                form.audio,
                Path(form.filename),
                has_transcript=bool(transcript),
                max_seconds=studio.service.preparer.max_reference_seconds,  # the cap files on disk pass too
            )
            picture = await asyncio.to_thread(envelope, form.audio)
        except VoiceError as err:
            errors.append(str(err))
        except ValueError:
            picture = None
    if info is not None:
        warnings.extend(info.warnings)
        mismatch = transcript_warning(transcript, info.kept_seconds)
        if mismatch:
            warnings.append(mismatch)
        if not transcript:
            warnings.append("no transcript: cross-lingual mode; the exact words spoken make cloning closer")
    report = {
        "name": name,
        "language": language,
        "description": description or name,
        "mode": "zero_shot" if transcript else "cross_lingual",
        "state": "broken" if errors else "warning" if warnings else "ok",
        "errors": errors,
        "warnings": warnings,
        "info": None
        if info is None
        else {
            "summary": info.summary(),
            "format": info.format,
            "rate": info.rate,
            "channels": info.channels,
            "seconds": round(info.seconds, 2),
            "kept_seconds": round(info.kept_seconds, 2),
            "peak_dbfs": round(info.peak_dbfs, 1),
            "bytes": len(form.audio or b""),
        },
        "envelope": picture,
    }
    if saving:
        report["transcript"], report["description"] = transcript, description
    return report, info


async def check_upload(request: web.Request) -> web.Response:
    """Validate an upload and its fields as saving would, writing nothing."""
    studio = request.app[STUDIO_KEY]
    report, _ = await _validate(studio, request[FORM_KEY], saving=False)
    return web.json_response(report)


async def add_voice(request: web.Request) -> web.Response:
    """Validate, then write the voice folder atomically; 201 with the check report, else 4xx and nothing written."""
    studio = request.app[STUDIO_KEY]
    return await studio.unhurried(_add(studio, request[FORM_KEY], request_client(request)))


async def _add(studio: Studio, form: Form, remote: Optional[str]) -> web.Response:
    async with studio.write_lock:
        report, info = await _validate(studio, form, saving=True)
        if report["errors"] or info is None or form.audio is None:
            status = 409 if any("already exists" in e or "is defined in" in e for e in report["errors"]) else 400
            return web.json_response({**report, "error": report["errors"][0]}, status=status)
        suffix = ".flac" if info.format.startswith("FLAC") else ".wav"
        try:
            await asyncio.to_thread(
                write_voice,
                studio.voices_dir,
                report["name"],
                report["language"],
                form.audio,
                suffix,
                transcript=report.pop("transcript"),
                description=report.pop("description"),
                force=form.flag("replace"),
            )
        except (VoiceError, OSError) as err:
            return problem(500 if isinstance(err, OSError) else 400, studio.redact(f"not saved: {err}"))
    _LOGGER.info("studio: voice %r added (%s, %s) from %s", report["name"], report["language"], info.summary(), remote)
    await studio.service.preparer.refresh()
    saved = _profile(studio, report["name"])
    heard_as = studio.service.heard_as(saved) if saved is not None else None
    return web.json_response({**report, "saved": True, "heard_as": heard_as, "note": HA_NOTE}, status=201)


async def _folder_voice(studio: Studio, name: str) -> Optional[web.Response]:
    """None when `name` is a folder voice this page may change, else the error answer."""
    try:
        check_name(name)
    except VoiceError as err:
        return problem(400, str(err))
    profile = _profile(studio, name)
    if profile is not None and not _is_folder_voice(studio, profile):
        origin = Path(profile.source).name if profile.source else "the configuration"
        return problem(409, f"voice {name!r} is defined in {origin}; change it there")
    if not await asyncio.to_thread(find_voice_dirs, studio.voices_dir, name):
        return problem(404, f"voice {name!r} is not in the voices folder")
    return None


async def edit_voice(request: web.Request) -> web.Response:
    """Change a folder voice's transcript, description and languages (fields left out are kept)."""
    studio = request.app[STUDIO_KEY]
    return await studio.unhurried(_edit(studio, request[FORM_KEY], request.match_info["name"], request_client(request)))


async def _edit(studio: Studio, form: Form, name: str, remote: Optional[str]) -> web.Response:
    async with studio.write_lock:
        refused = await _folder_voice(studio, name)
        if refused is not None:
            return refused
        languages = form.fields.get("languages")
        try:
            await asyncio.to_thread(
                update_voice,
                studio.voices_dir,
                name,
                transcript=form.fields.get("transcript"),
                description=form.fields.get("description"),
                languages=[t.strip() for t in languages.replace(" ", ",").split(",")]
                if languages is not None
                else None,
            )
        except VoiceError as err:
            return problem(400, str(err))
        except OSError as err:
            return problem(500, studio.redact(f"not saved: {err}"))
    _LOGGER.info("studio: voice %r edited from %s", name, remote)
    await studio.service.preparer.refresh()
    return web.json_response({"name": name, "saved": True, "note": HA_NOTE})


async def delete_voice(request: web.Request) -> web.Response:
    """Remove a folder voice (the page asks for confirmation first)."""
    studio = request.app[STUDIO_KEY]
    return await studio.unhurried(_delete(studio, request.match_info["name"], request_client(request)))


async def _delete(studio: Studio, name: str, remote: Optional[str]) -> web.Response:
    async with studio.write_lock:
        refused = await _folder_voice(studio, name)
        if refused is not None:
            return refused
        try:
            await asyncio.to_thread(remove_voice, studio.voices_dir, name)
        except VoiceError as err:
            return problem(404, str(err))
        except OSError as err:
            return problem(500, studio.redact(f"not removed: {err}"))
    _LOGGER.info("studio: voice %r removed from %s", name, remote)
    await studio.service.preparer.refresh()
    return web.json_response({"name": name, "removed": True, "note": HA_NOTE})
