"""The demo, run as a user runs it, settles with every cent accounted for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import make_url

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXPECTED = (
    "SETTLED transfers=14 committed=12 rolled_back=2 credited=10 refunded=2 duplicates_ignored=1 "
    "total_before=10000.00 total_after=10000.00 conserved=yes"
)
TIMEOUT = 180


def run_demo(workdir: Path, *args: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run the demo; returns its exit code and stdout (stderr is folded in)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(EXAMPLES_DIR), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "bank_transfer.demo", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the demo stop its three services before it exits.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"demo did not finish within {timeout} s:\n{output}")
    return process.returncode, output


def assert_settled(code: int, output: str, workdir: Path) -> None:
    lines = output.strip().splitlines()
    assert lines, "the demo printed nothing"
    assert lines[-1] == EXPECTED, output
    assert code == 0, output
    # The services log to files in the run folder, not to the demo's output.
    assert "consumer_processed" not in output
    for service in ("bank1", "relay", "bank2"):
        assert (workdir / f"{service}.log").stat().st_size > 0
    assert (workdir / "bank2.log").read_text().count("consumer_duplicate_ignored") == 1


def server_databases(base_url: str) -> list[str]:
    url = make_url(base_url)
    bank1 = url.set(database="bank1").render_as_string(hide_password=False)
    bank2 = url.set(database="bank2").render_as_string(hide_password=False)
    # The queue tables share bank1's database; their names do not clash.
    return ["--bank1-db", bank1, "--bank2-db", bank2, "--transport-db", bank1]


@pytest.mark.slow
def test_demo_on_sqlite(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    code, output = run_demo(workdir)
    assert_settled(code, output, workdir)
    assert {p.name for p in workdir.glob("*.db")} == {"bank1.db", "bank2.db", "broker.db"}


@pytest.mark.slow
def test_demo_runs_again_in_the_same_folder(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    run_demo(workdir)
    code, output = run_demo(workdir)
    assert_settled(code, output, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("server", [
    pytest.param("postgres_server", marks=pytest.mark.postgres),
    pytest.param("mariadb_server", marks=pytest.mark.mariadb),
])
def test_demo_on_a_database_server(
    tmp_path: Path, server: str, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(server)
    workdir = tmp_path / "run"
    for _ in range(2):  # the second run proves the demo resets the server's tables
        code, output = run_demo(workdir, *server_databases(url))
        assert_settled(code, output, workdir)
    password = make_url(url).password
    if password:
        assert f":{password}@" not in output


def test_demo_refuses_to_wipe_a_foreign_folder(tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("not the demo's")
    code, output = run_demo(tmp_path)
    assert code != 0
    assert "refusing to wipe" in output
    assert keep.read_text() == "not the demo's"
