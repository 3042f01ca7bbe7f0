"""The demo's three processes, observed: one OpenTelemetry trace from bank1's HTTP
request to bank2's credit across the processes (the SDK exporting each span as a JSON
line), and each process's Prometheus metrics while ``--keep-running`` holds them up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .test_demo import EXAMPLES_DIR, EXPECTED, run_demo


def spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_one_trace_from_bank1s_request_to_bank2s_credit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traces = tmp_path / "traces"
    monkeypatch.setenv("BANK_TRANSFER_TRACE_DIR", str(traces))
    code, output = run_demo(tmp_path / "run")
    assert output.strip().splitlines()[-1] == EXPECTED, output
    assert code == 0, output
    bank1, relay, bank2 = (spans(traces / f"{s}.jsonl") for s in ("bank1", "relay", "bank2"))
    requests = {s["trace_id"]: s for s in bank1
                if s["name"] == "POST /transfers" and s["kind"] == "SERVER"}
    assert len(requests) >= 12  # each committed transfer (and the refused ones)
    consumed = [s for s in bank2 if s["name"] == "outbox.consume"
                and s["attributes"].get("messaging.destination.name") == "bank-transfer"]
    credited = [s for s in consumed if s["status"] != "ERROR"]
    assert len({s["attributes"]["messaging.message.id"] for s in credited}) == 12
    bank1_spans = {s["span_id"] for s in bank1}
    relay_links = {(link["trace_id"], link["span_id"])
                   for s in relay if s["name"] == "outbox.publish" for link in s["links"]}
    for span in credited:
        request = requests.get(span["trace_id"])
        assert request is not None, f"bank2's span is not in a bank1 request's trace: {span}"
        assert span["parent_span_id"] in bank1_spans  # continued from the request
        assert span["kind"] == "CONSUMER"
        assert (span["trace_id"], span["parent_span_id"]) in relay_links  # the relay linked it
    # bank2's refunds (sent in the credit's transaction) stay in the same trace: bank1's
    # refund consumer continues them.
    refunds = [s for s in bank1 if s["name"] == "outbox.consume"]
    assert len(refunds) >= 2
    assert all(s["trace_id"] in requests for s in refunds), refunds


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def sample(body: str, name: str, **labels: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


@pytest.mark.slow
def test_keep_running_leaves_the_services_up_with_their_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(EXAMPLES_DIR), os.environ.get("PYTHONPATH")]))}
    demo = subprocess.Popen(
        [sys.executable, "-m", "bank_transfer.demo", "--workdir", str(tmp_path / "run"),
         "--keep-running"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert demo.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in demo.stdout:
            lines.append(line.rstrip("\n"))
            if "--keep-running: the services stay up" in line:
                break
            assert time.monotonic() < deadline, "\n".join(lines)
        text = "\n".join(lines)
        urls = dict(re.findall(r"(bank1|relay|bank2) (http://127\.0\.0\.1:\d+/metrics)", text))
        assert set(urls) == {"bank1", "relay", "bank2"}, text
        bank1, relay, bank2 = (scrape(urls[s]) for s in ("bank1", "relay", "bank2"))
        dashboard = re.search(r"dashboard \(while the services run\): (http://127\.0\.0\.1:\d+/) "
                              r"\(sign in with the token in (\S+) ", text)
        assert dashboard, text
        index = scrape(dashboard.group(1))
        assert "bank1.db" in index and "bank2.db" in index
        token = Path(dashboard.group(2))
        assert token.stat().st_mode & 0o077 == 0 and len(token.read_text().strip()) >= 16
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    output = "\n".join(lines) + "\n" + rest
    assert output.strip().splitlines()[-1] == EXPECTED, output
    assert demo.returncode == 0, output
    topic = "bank-transfer"
    assert sample(bank1, "outbox_messages_written_total", topic=topic) == 12
    assert sample(relay, "outbox_messages_published_total", topic=topic) == 12
    assert sample(bank2, "outbox_deliveries_processed_total", topic=topic, group="bank2") == 12
    assert sample(bank2, "outbox_deliveries_duplicate_total", topic=topic, group="bank2") == 1
    assert sample(bank2, "outbox_handler_seconds_count", topic=topic, group="bank2") == 12
    assert sample(bank1, "outbox_deliveries_processed_total", topic="bank-refund") == 2
    # The relay's backlog gauges: nothing pending once settled.
    assert sample(relay, "outbox_pending_messages", topic=topic) is None
