"""``make bench QUICK=1`` as a smoke test: it runs to its end on the real servers and
prints every figure. No thresholds here: the figures are measurements, not tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = ("write_vs_insert_p50", "write_vs_insert_p99", "claim_1m_vs_1k", "relay_vs_pipeline",
        "relay_cpu_ms", "e2e_p99_vs_direct", "sqltransport_msgs", "consumer_inbox_vs_bare",
        "halfmsg_vs_plain", "seam_write_observed_p50", "seam_relay_observed")
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.mark.slow
@pytest.mark.exclusive  # it loads both cores, and its figures want them to itself
def test_quick_bench_prints_every_figure(postgres_url: object, redis_url: str,
                                         rocketmq_endpoints: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"),
           "OUTBOX_TEST_ROCKETMQ_ENDPOINTS": rocketmq_endpoints}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    pattern = "BENCH " + " ".join(f"{k}=({NUMBER})" for k in KEYS)
    match = re.fullmatch(pattern, last)
    assert match, f"last line is not a complete BENCH line: {last!r}"
    assert all(float(v) > 0 for v in match.groups()), last
    figures = json.loads(out.read_text())["figures"]
    assert set(KEYS) <= set(figures)
