"""The studio against hostile clients (issue 21): decompression bombs, forged ingress paths, tokenless uploads, and
connections that idle, dribble or pile up; the Wyoming port keeps answering throughout."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the voice studio needs the web extra (pip install -e '.[web]')")

from aiohttp import ClientSession, FormData  # noqa: E402

from .studio_support import studio_server  # noqa: E402
from .test_voices_reference import constant_flac  # noqa: E402


def _form(audio: bytes, name: str = "bomb", filename: str = "bomb.flac", **fields: str) -> FormData:
    form = FormData()
    for key, value in {"name": name, "language": "en-US", **fields}.items():
        form.add_field(key, value)
    form.add_field("audio", audio, filename=filename, content_type="audio/flac")
    return form


async def _json(session: ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    "header", ["//evil.example/a", "///evil.example", "/a//evil.example", "/a/../b", "\\\\evil.example/a", "/a/./b"]
)
async def test_the_ingress_path_is_only_ever_a_path(tmp_path: Path, header: str) -> None:
    """Finding 15: `X-Ingress-Path: //evil.example/a` became `<base href="//evil.example/a/">` (another site)."""
    async with studio_server(tmp_path) as srv, ClientSession() as http:
        async with http.get(srv.url, headers={"X-Ingress-Path": header}) as response:
            page = await response.text()
        assert '<base href="./">' in page and "evil" not in page
        async with http.get(srv.url, headers={"X-Ingress-Path": "/api/hassio_ingress/Ab-9_x.y/"}) as response:
            assert '<base href="/api/hassio_ingress/Ab-9_x.y/">' in await response.text()


async def test_a_decompression_bomb_is_refused_by_check_and_save_without_decoding_it(tmp_path: Path) -> None:
    """Finding 3: a small FLAC of 20 min of constant audio; check decoded it all, save stored a broken voice."""
    bomb = constant_flac(1200.0)
    async with studio_server(tmp_path) as srv, ClientSession() as http:
        tracemalloc.start()
        try:
            status, report = await _json(http, "POST", srv.url + "api/check", data=_form(bomb))
            assert status == 200 and report["state"] == "broken"
            assert any("1200 s long; the limit is 120 s" in e for e in report["errors"]), report["errors"]
            status, saved = await _json(http, "POST", srv.url + "api/voices", data=_form(bomb))
            peak = tracemalloc.get_traced_memory()[1] / 1e6
        finally:
            tracemalloc.stop()
        assert status == 400 and "1200 s long" in saved["error"]
        assert srv.files() == [], "the bomb was saved"
        assert peak < 20, f"{peak:.0f} MB held while refusing a {len(bomb) // 1000} KB upload"
