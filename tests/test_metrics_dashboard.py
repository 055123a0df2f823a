"""The Grafana dashboard (docker/grafana/dashboards/wyoming-cosyvoice.json): its structure is what Grafana loads, and
every metric its queries name is one the server exports. Grafana itself is not installed here (no Debian package),
so the dashboard is checked, not rendered."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from wyoming_cosyvoice.metrics import GPU_METRICS, NAMESPACE  # noqa: E402

from .helpers import collect, connect, running_server  # noqa: E402
from .metrics_support import ROOT, dashboard, expressions  # noqa: E402
from .studio_support import wait_for  # noqa: E402

PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge", "state-timeline", "text", "row"}
METRIC = re.compile(r"\b((?:wyoming_cosyvoice|process)_[a-z_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def test_dashboard_structure() -> None:
    doc = dashboard()
    assert doc["title"] and doc["uid"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h"))
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{panel['title']}: refIds must be unique"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = " ".join(panel["title"].lower() for panel in doc["panels"])
    for topic in ("first audio", "real-time factor", "underruns", "in flight", "refusals", "fallbacks", "gpu memory"):
        assert topic in titles, f"no panel for {topic}"


async def test_dashboard_names_only_exported_metrics(config: Any) -> None:
    """Every metric the queries name is in a real server's /metrics (GPU ones only where NVML answers)."""
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Fill the histograms.").event())
            assert (await collect(client)).stops == 1
        metrics = server.service.metrics
        await wait_for(lambda: metrics.summary()["requests"] == 1, what="the reply counted")
        metrics.fallback("dashboard_test")  # fallback_total has series only once a fallback happened
        body = metrics.exposition()[0].decode()
    exported = {s.name for family in text_string_to_metric_families(body) for s in family.samples}
    exported |= {f"{NAMESPACE}_{name}" for name in GPU_METRICS}
    named = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert named, "no metric names found in the dashboard"
    missing = sorted(named - exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    for name in named:
        if name.endswith(HISTOGRAM_SUFFIXES):
            assert name in exported


def test_compose_profile_mounts_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["metrics"] and services["grafana"]["profiles"] == ["metrics"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "./docker/grafana/dashboards:" in mounts and "./docker/grafana/provisioning:" in mounts
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:10202"]
    for name in ("wyoming-cosyvoice", "wyoming-cosyvoice-cpu"):
        command = services[name]["command"]
        assert command[command.index("--metrics-port") + 1] == "10202"
