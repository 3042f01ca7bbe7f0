"""The shipped operations files: the Prometheus alert rules pass their tests under
``promtool`` (Debian's prometheus package; scripts/services installs it), and the
rules and the Grafana dashboard name only metrics that outbox.metrics exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from outbox.metrics import HISTOGRAMS, METRICS

OPS = Path(str(resources.files("outbox") / "ops"))
NAME = re.compile(r"\boutbox_[a-z_]+\b")


def named_metrics(text: str) -> set[str]:
    """The outbox metric names an expression uses, histogram series as their family."""
    out = set()
    for name in NAME.findall(text):
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        out.add(family if family in HISTOGRAMS else name)
    return out


def test_the_alert_rules_pass_their_promtool_tests(promtool: str) -> None:
    check = subprocess.run([promtool, "check", "rules", "prometheus-rules.yml"], cwd=OPS,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    run = subprocess.run([promtool, "test", "rules", "prometheus-rules.test.yml"], cwd=OPS,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_a_broken_rule_fails_its_test(promtool: str, tmp_path: Path) -> None:
    """The tests can fail: a threshold moved from 5 to 50 minutes is caught."""
    rules = (OPS / "prometheus-rules.yml").read_text()
    assert "> 300" in rules
    (tmp_path / "prometheus-rules.yml").write_text(rules.replace("> 300", "> 3000"))
    shutil.copy(OPS / "prometheus-rules.test.yml", tmp_path)
    run = subprocess.run([promtool, "test", "rules", "prometheus-rules.test.yml"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "OutboxRelayLagging" in run.stdout + run.stderr


def test_the_rules_name_only_exported_metrics() -> None:
    used = named_metrics((OPS / "prometheus-rules.yml").read_text())
    assert used and used <= set(METRICS), used - set(METRICS)


def test_the_grafana_dashboard_parses_and_names_only_exported_metrics() -> None:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    used = set().union(*(named_metrics(e) for e in exprs))
    assert used <= set(METRICS), used - set(METRICS)
    # Every metric the framework exports has a panel.
    assert set(METRICS) <= used, set(METRICS) - used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
