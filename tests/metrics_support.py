"""Shared by the metrics tests: the Grafana dashboard of docker/grafana/dashboards and its PromQL expressions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "wyoming-cosyvoice.json"


def dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
