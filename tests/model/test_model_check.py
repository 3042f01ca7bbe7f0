"""The Spin model of the commit protocol (model/outbox.pml), through scripts/model-check.

Each real configuration must verify with no counterexample (and terminate: no cycle),
and each mutation must be caught. The checker runs once for the module (all runs,
two at a time: a few minutes). Without spin (or gcc) the tests skip on a laptop and
fail when ``CI`` is set: a model check that silently did not run must not pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "model-check"

#: The checker keeps both cores busy for minutes: make test runs it alone, after the lanes.
pytestmark = pytest.mark.exclusive

#: Runs that must verify (``scripts/model-check --list`` shows their flags).
REAL = ["outbox", "rocketmq", "rocketmq-2tx", "rocketmq-noguard-fixed", "rocketmq-lateend-fixed"]
#: Mutations that must give a counterexample.
MUTATIONS = ["m1-no-guard", "m2-check-unknown", "m3-ack-early", "m3-ack-early-outbox",
             "mx-no-holdback", "m4-clock-after-read", "m5-settle-late-commit"]
#: Known weaknesses of the design: a counterexample is expected (see model/README.md).
FINDINGS = ["f1-rocketmq-key-order"]
#: A mutation the design survives (the guard row covers it).
TOLERATED = ["m2-check-unknown-guarded"]


@dataclass(frozen=True)
class Run:
    kind: str
    verdict: str
    states: str
    termination: str


@dataclass(frozen=True)
class Results:
    returncode: int
    output: str
    runs: dict[str, Run]


def _require_tools() -> None:
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    if not missing:
        return
    reason = (f"{' and '.join(missing)} not installed (apt-get install -y spin gcc; "
              "scripts/model-check installs spin itself)")
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Results | None:
    """The whole checker's results; None without the tools (each test then fails in
    CI or skips, in its own body: a failure, not a setup error)."""
    if shutil.which("spin") is None or shutil.which("gcc") is None:
        return None
    env = {**os.environ, "MODEL_CHECK_DIR": str(tmp_path_factory.mktemp("model-check"))}
    proc = subprocess.run([str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    output = proc.stdout + proc.stderr
    runs = {}
    for name, kind, verdict, states, rest in re.findall(
            r"^(\S+)\s+(pass|mutation|finding|tolerated)\s+(\S+)\s+(\S+)\s+\S+\s*(.*)$",
            output, re.MULTILINE):
        runs[name] = Run(kind, verdict, states, rest)
    return Results(proc.returncode, output, runs)


def _results(checked: Results | None) -> Results:
    """In a test's body, so that missing tools fail the test itself (or skip it)."""
    _require_tools()
    assert checked is not None
    return checked


def _run(results: Results, name: str) -> Run:
    assert name in results.runs, f"no result line for {name}:\n{results.output}"
    return results.runs[name]


def test_every_run_is_listed_here(checked: Results | None) -> None:
    results = _results(checked)
    assert set(results.runs) == set(REAL + MUTATIONS + FINDINGS + TOLERATED), results.output


def test_checker_exit_status(checked: Results | None) -> None:
    results = _results(checked)
    # Zero exactly when every real configuration verifies and every mutation is caught.
    assert results.returncode == 0, results.output


@pytest.mark.parametrize("name", REAL)
def test_real_model_has_no_counterexample(checked: Results | None, name: str) -> None:
    results = _results(checked)
    run = _run(results, name)
    assert run.verdict == "ok", results.output
    assert run.termination.startswith("no cycle"), results.output
    assert int(run.states) > 0


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutation_is_caught(checked: Results | None, name: str) -> None:
    results = _results(checked)
    assert _run(results, name).verdict == "caught", results.output
    assert f"--- {name} (mutation): counterexample" in results.output


@pytest.mark.parametrize("name", FINDINGS)
def test_known_finding_still_reproduces(checked: Results | None, name: str) -> None:
    results = _results(checked)
    # Gone means the model (or the design) changed: update model/README.md and this list.
    assert _run(results, name).verdict == "found", results.output


@pytest.mark.parametrize("name", TOLERATED)
def test_tolerated_mutation_passes(checked: Results | None, name: str) -> None:
    results = _results(checked)
    assert _run(results, name).verdict == "ok", results.output
