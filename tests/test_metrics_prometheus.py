"""A real Prometheus (Debian's package; script/setup --test installs it) scrapes a real server while requests run;
PromQL through its HTTP API returns the request count and a first-audio p95 equal to the server's own summary."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

pytest.importorskip("prometheus_client")
aiohttp = pytest.importorskip("aiohttp")

from wyoming.tts import Synthesize  # noqa: E402

from wyoming_cosyvoice.config import MetricsSettings  # noqa: E402
from wyoming_cosyvoice.web.metrics_route import MetricsListener  # noqa: E402

from .helpers import TIMEOUT, collect, connect, running_server  # noqa: E402
from .metrics_support import expressions as dashboard_expressions  # noqa: E402
from .studio_support import wait_for  # noqa: E402

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (script/setup --test installs Debian's package)"
)

REQUESTS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Prometheus on a loopback port scraping `target` every 250 ms, its storage under tmp_path; its base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n"
        "scrape_configs:\n  - job_name: wyoming-cosyvoice\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    assert PROMETHEUS is not None
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)
        log.close()


async def query(session: Any, url: str, promql: str) -> list[dict[str, Any]]:
    """An instant PromQL query's result vector (empty on any failure, e.g. Prometheus not ready yet)."""
    try:
        async with session.get(f"{url}/api/v1/query", params={"query": promql}) as response:
            if response.status != 200:
                return []
            body = await response.json()
    except aiohttp.ClientError:
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def scalar(session: Any, url: str, promql: str) -> float:
    result = await query(session, url, promql)
    return float(result[0]["value"][1]) if result else float("nan")


async def test_prometheus_scrapes_counts_and_first_audio_p95(config: Any, tmp_path: Path) -> None:
    async with running_server(config) as server:
        listener = MetricsListener(server.service, MetricsSettings(port=0))
        await listener.start()
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        try:
            async with (
                prometheus(tmp_path, f"127.0.0.1:{listener.port}") as url,
                aiohttp.ClientSession(timeout=timeout) as session,
            ):
                await wait_for(lambda: query(session, url, "up == 1"), what="Prometheus scraping the server")

                async def one(i: int) -> None:
                    async with connect(server) as client:
                        await client.write_event(Synthesize(text=f"Request number {i} is being scraped.").event())
                        assert (await collect(client)).stops == 1

                for start in range(0, REQUESTS, 3):  # three at a time, while Prometheus scrapes
                    await asyncio.gather(*(one(i) for i in range(start, start + 3)))

                total = "sum(wyoming_cosyvoice_requests_total)"
                await wait_for(
                    lambda: query(session, url, f"{total} == {REQUESTS}"), what=f"{REQUESTS} requests in Prometheus"
                )
                ok = await scalar(session, url, 'sum(wyoming_cosyvoice_requests_total{outcome="ok"})')
                p95 = await scalar(
                    session, url, "histogram_quantile(0.95, sum by (le) (wyoming_cosyvoice_first_audio_seconds_bucket))"
                )
                count = await scalar(session, url, "wyoming_cosyvoice_first_audio_seconds_count")
                summary = server.service.metrics.summary()
                for expr in dashboard_expressions():  # every dashboard query is PromQL this Prometheus accepts
                    promql = expr.replace("$__rate_interval", "1m")
                    async with session.get(f"{url}/api/v1/query", params={"query": promql}) as response:
                        assert response.status == 200, f"{promql}: {await response.text()}"
        finally:
            await listener.close()
    assert ok == REQUESTS
    assert count == REQUESTS
    assert 0 < p95 < 30
    assert p95 * 1000 == pytest.approx(summary["first_audio_p95_ms"], abs=0.1)  # one algorithm, one source
