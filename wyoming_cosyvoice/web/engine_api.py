"""`POST /api/engine/park` and `/api/engine/wake`: park the engines' models (free the GPU) or wake them now."""

from __future__ import annotations

from aiohttp import web

from .app import STUDIO_KEY


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the park and wake routes (token- and origin-checked by the studio's guard, as every POST)."""
    router.add_post("/api/engine/park", park)
    router.add_post("/api/engine/wake", wake)


async def park(request: web.Request) -> web.Response:
    """Park every engine that parks, after its requests in flight: `{"engines": {name: state}}`."""
    return web.json_response({"engines": await request.app[STUDIO_KEY].service.park()})


async def wake(request: web.Request) -> web.Response:
    """Wake every parked engine now: `{"engines": {name: state}}`."""
    return web.json_response({"engines": await request.app[STUDIO_KEY].service.wake()})
