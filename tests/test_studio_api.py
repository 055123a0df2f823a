"""The voice studio over real HTTP on a real port, served by the Wyoming server's own loop."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the voice studio needs the web extra (pip install -e '.[web]')")

from aiohttp import ClientSession, FormData  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402

from .audiogen import write  # noqa: E402
from .helpers import connect, read  # noqa: E402
from .studio_support import gate_engine, ingress_proxy, studio_server, wait_for  # noqa: E402


def _form(audio: bytes | None, name: str = "alice", filename: str = "alice.wav", **fields: str) -> FormData:
    form = FormData()
    for key, value in {"name": name, "language": "en-US", **fields}.items():
        form.add_field(key, value)
    if audio is not None:
        form.add_field("audio", audio, filename=filename, content_type="audio/wav")
    return form


async def _json(session: ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def test_page_status_and_voices_are_served_with_relative_urls_and_the_ingress_path(tmp_path: Path) -> None:
    async with studio_server(tmp_path) as srv, ClientSession() as http:
        async with http.get(srv.url) as response:
            page = await response.text()
            assert response.status == 200 and response.headers["Content-Security-Policy"].startswith("default-src")
        assert '<base href="./">' in page and 'src="static/studio.js"' in page and "http" not in page.split("<body>")[0]
        async with http.get(srv.url, headers={"X-Ingress-Path": "/api/hassio_ingress/abc"}) as response:
            assert '<base href="/api/hassio_ingress/abc/">' in await response.text()
        async with http.get(srv.url, headers={"X-Ingress-Path": '/x"><script>alert(1)</script>'}) as response:
            assert '<base href="./">' in await response.text()
        for asset in ("studio.js", "studio.css", "icon.svg"):
            async with http.get(srv.url + "static/" + asset) as response:
                assert response.status == 200 and len(await response.read()) > 100
        async with http.get(srv.url + "static/..%2F__init__.py") as response:
            assert response.status == 404
        status, health = await _json(http, "GET", srv.url + "api/status")
        assert status == 200 and health["engines"][0]["name"] == "espeak" and health["in_flight"] == 0
        assert health["engines"][0]["health"]["state"] == "ready" and health["token_required"] is False
        status, listing = await _json(http, "GET", srv.url + "api/voices")
        assert [v["name"] for v in listing["voices"]] == ["tars", "anna"]
        assert listing["voices"][0]["default"] and not listing["voices"][0]["editable"]
        assert listing["voices"][0]["origin"] == "voices.yaml" and "Home Assistant" in listing["note"]
        assert str(tmp_path) not in str(listing) + str(health), "the page shows no server paths"


async def test_check_validates_without_writing_then_save_writes_the_folder_and_wyoming_lists_it(
    tmp_path: Path,
) -> None:
    audio = write(tmp_path / "in.wav", seconds=3.0, rate=24000, pad=1.0).read_bytes()
    async with studio_server(tmp_path / "cfg") as srv, ClientSession() as http:
        fields = {"transcript": "Hello there, this is Alice.", "description": "Alice A"}
        status, report = await _json(http, "POST", srv.url + "api/check", data=_form(audio, **fields))
        assert status == 200 and report["errors"] == [] and report["state"] == "warning"
        assert report["mode"] == "zero_shot" and report["info"]["rate"] == 24000
        assert report["info"]["seconds"] == 5.0 and report["info"]["kept_seconds"] < 3.5
        assert any("silence trimmed" in w for w in report["warnings"]) and len(report["envelope"]["peaks"]) == 160
        assert srv.files() == [], "check wrote something"

        status, saved = await _json(http, "POST", srv.url + "api/voices", data=_form(audio, **fields))
        assert status == 201 and saved["saved"] and "Home Assistant" in saved["note"]
        assert saved["heard_as"] == "espeak voice for en-US"  # what a listener hears: espeak ignores the recording
        voice = srv.voices / "en_US" / "alice"
        assert srv.files() == ["en_US", "en_US/alice", "en_US/alice/profile.yaml", "en_US/alice/reference.wav",
                               "en_US/alice/transcript.txt"]  # fmt: skip
        assert (voice / "reference.wav").read_bytes() == audio
        assert (voice / "transcript.txt").read_text() == "Hello there, this is Alice.\n"

        async def listed() -> Any:
            _, data = await _json(http, "GET", srv.url + "api/voices")
            row = next((v for v in data["voices"] if v["name"] == "alice"), None)
            return row if row and row["state"] not in ("preparing",) else None

        row = await wait_for(listed, what="alice prepared")
        assert row["state"] == "warning" and row["editable"] and row["kept_seconds"] < 3.5
        assert row["description"] == "Alice A" and row["languages"] == ["en-US"] and row["engine"] == "espeak"
        assert row["heard_as"] == "espeak voice for en-US"
        status, picture = await _json(http, "GET", srv.url + "api/voices/alice/envelope")
        assert status == 200 and picture["seconds"] == 5.0 and max(picture["peaks"]) == 1.0

        async with connect(srv.server) as client:  # the Wyoming side of the same process sees it too
            await client.write_event(Describe().event())
            info = Info.from_event(await read(client))
            assert "alice" in [v.name for v in info.tts[0].voices]

        status, clash = await _json(http, "POST", srv.url + "api/voices", data=_form(audio))
        assert status == 409 and "already exists" in clash["error"]


async def test_edit_and_remove_a_folder_voice_but_never_a_configured_one(tmp_path: Path) -> None:
    audio = write(tmp_path / "in.wav").read_bytes()
    async with studio_server(tmp_path / "cfg") as srv, ClientSession() as http:
        assert (await _json(http, "POST", srv.url + "api/voices", data=_form(audio, name="bob")))[0] == 201
        status, edited = await _json(
            http,
            "PATCH",
            srv.url + "api/voices/bob",
            json={"description": "Bob B", "languages": "en-US, de-DE", "transcript": "New words here."},
        )
        assert status == 200 and edited["saved"]
        bob = srv.voices / "en_US" / "bob"
        assert (bob / "transcript.txt").read_text() == "New words here.\n"
        assert "languages:\n- en-US\n- de-DE" in (bob / "profile.yaml").read_text()
        status, refused = await _json(http, "PATCH", srv.url + "api/voices/tars", json={"description": "x"})
        assert status == 409 and "voices.yaml" in refused["error"]
        status, refused = await _json(http, "DELETE", srv.url + "api/voices/tars")
        assert status == 409
        status, removed = await _json(http, "DELETE", srv.url + "api/voices/bob")
        assert status == 200 and removed["removed"] and "Home Assistant" in removed["note"]
        assert srv.files() == ["en_US"]
        status, _ = await _json(http, "DELETE", srv.url + "api/voices/bob")
        assert status == 404


async def test_bad_names_uploads_and_bodies_are_refused_and_write_nothing(tmp_path: Path) -> None:
    good = write(tmp_path / "in.wav").read_bytes()
    low = write(tmp_path / "low.wav", rate=8000).read_bytes()
    big = write(tmp_path / "big.wav", seconds=3.0, rate=48000, subtype="FLOAT").read_bytes()  # 576 KB
    async with studio_server(tmp_path / "cfg", max_upload_bytes=262144) as srv, ClientSession() as http:
        for name in ("../evil", "..", "a/b", ".hidden", "x" * 65, "na me"):
            status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(good, name=name))
            assert status == 400 and "not a valid voice name" in body["error"], name
        for path in ("..%2Fevil", "..%2F..%2Fcfg", "%2E%2E"):
            async with http.delete(srv.url + "api/voices/" + path) as response:
                assert response.status in (400, 404), path
            async with http.patch(srv.url + "api/voices/" + path, json={"description": "x"}) as response:
                assert response.status in (400, 404), path
        status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(big))
        assert status == 413 and "262144" in body["error"]
        status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(b"not audio at all" * 100))
        assert status == 400 and "not a readable WAV/FLAC" in body["error"]
        status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(low))
        assert status == 400 and "8000 Hz" in body["error"]
        status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(None))
        assert status == 400 and "no recording" in body["error"]
        status, body = await _json(http, "POST", srv.url + "api/voices", data=_form(good, language="english!"))
        assert status == 400 and "BCP-47" in body["error"]
        status, body = await _json(
            http,
            "POST",
            srv.url + "api/voices",
            data=b"--xx\r\nContent-Disposition: garbage\r\n\r\n\x00\x01",
            headers={"Content-Type": "multipart/form-data; boundary=yy"},
        )
        assert status == 400
        status, body = await _json(
            http, "POST", srv.url + "api/voices", data=b"abc", headers={"Content-Type": "text/plain"}
        )
        assert status == 415
        assert srv.files() == [], "a refused request wrote something"


async def test_the_token_guards_every_change_and_foreign_sites_are_refused(tmp_path: Path) -> None:
    good = write(tmp_path / "in.wav").read_bytes()
    token = "s3cret-token-1"
    async with studio_server(tmp_path / "cfg", token=token) as srv, ClientSession() as http:
        assert (await _json(http, "GET", srv.url + "api/voices"))[0] == 200  # reading needs no token
        status, health = await _json(http, "GET", srv.url + "api/status")
        assert health["token_required"] is True
        for headers in ({}, {"X-Studio-Token": "wrong-token"}, {"Authorization": "Bearer nope"}):
            for method, path, kwargs in (
                ("POST", "api/voices", {"data": _form(good)}),
                ("POST", "api/check", {"data": _form(good)}),
                ("POST", "api/audition", {"json": {"voice": "tars", "text": "hi"}}),
                ("PATCH", "api/voices/tars", {"json": {"description": "x"}}),
                ("DELETE", "api/voices/tars", {}),
            ):
                status, body = await _json(http, method, srv.url + path, headers=headers, **kwargs)
                assert status == 401 and "token" in body["error"], (method, path, headers)
        assert srv.files() == []
        status, _ = await _json(http, "POST", srv.url + "api/voices", data=_form(good, token=token))  # form field
        assert status == 201
        headers = {"X-Studio-Token": token}
        status, _ = await _json(http, "DELETE", srv.url + "api/voices/alice", headers=headers)
        assert status == 200
        status, _ = await _json(http, "POST", srv.url + "api/voices", data=_form(good), headers=headers)
        assert status == 201
        for foreign in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            status, body = await _json(http, "DELETE", srv.url + "api/voices/alice", headers={**headers, **foreign})
            assert status == 403 and "refused" in body["error"]
        async with http.get(srv.url + "api/voices", headers={"Host": "rebound.example:80"}) as response:
            assert response.status == 421  # a loopback-bound page answers only loopback names (DNS rebinding)
        assert (srv.voices / "en_US" / "alice").is_dir()


def _wav_rate(header: bytes) -> int:
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt " and header[36:40] == b"data"
    return struct.unpack("<I", header[24:28])[0]


async def test_audition_streams_the_first_chunk_before_synthesis_ends_and_a_leaving_browser_stops_it(
    tmp_path: Path,
) -> None:
    async with studio_server(tmp_path / "cfg", engine="gate", max_concurrent=1) as srv, ClientSession() as http:
        engine = gate_engine(srv)
        assert engine is not None
        async with http.post(srv.url + "api/audition", json={"voice": "tars", "text": "Hello there."}) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "audio/wav"
            assert int(response.headers["X-First-Audio-Ms"]) >= 0
            received = b""
            while len(received) < 44 + 3200:  # header + the first chunk, while the engine still waits at its gate
                received += await asyncio.wait_for(response.content.readany(), 20)
            assert _wav_rate(received[:44]) == 16000 and not engine.gate.is_set()
            status, busy = await _json(http, "POST", srv.url + "api/audition", json={"voice": "tars", "text": "x"})
            assert status == 503 and "busy" in busy["error"]  # the audition holds its admission slot
            engine.gate.set()
            received += await asyncio.wait_for(response.content.read(), 20)
        assert len(received) == 44 + 4 * 3200 and engine.outcomes == ["done"]

        engine.gate.clear()
        async with http.post(srv.url + "api/audition", json={"voice": "tars", "text": "Bye."}) as response:
            await asyncio.wait_for(response.content.readexactly(44 + 3200), 20)
            response.close()  # the browser leaves mid-sentence
        await wait_for(lambda: engine.outcomes == ["done", "cancelled"], what="the engine to stop")
        await wait_for(lambda: srv.server.service.concurrency_limit.active == 0, what="the slot to be freed")

        status, body = await _json(http, "POST", srv.url + "api/audition", json={"voice": "nobody", "text": "hi"})
        assert status == 404 and "unknown voice" in body["error"]
        status, body = await _json(http, "POST", srv.url + "api/audition", json={"voice": "tars", "text": " "})
        assert status == 400


async def test_pages_work_through_an_ingress_style_proxy(tmp_path: Path) -> None:
    async with studio_server(tmp_path / "cfg") as srv, ingress_proxy(srv.url) as base, ClientSession() as http:
        async with http.get(base + "/") as response:
            assert '<base href="/api/hassio_ingress/t0k3n/">' in await response.text()
        status, listing = await _json(http, "GET", base + "/api/voices")
        assert status == 200 and listing["voices"][0]["name"] == "tars"
        async with http.post(base + "/api/audition", json={"voice": "tars", "text": "Hello."}) as response:
            assert response.status == 200 and len(await response.read()) > 44 + 1000
