"""Starting and stopping the three services as child processes of the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from .runtime import url_env_var

EXAMPLES_DIR = Path(__file__).resolve().parent.parent


class ServiceFailed(RuntimeError):
    """A service exited or never became ready; the message names its log file."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def check_running(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ServiceFailed(
                f"{self.name} exited with code {code}; see {self.log_path}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(name: str, args: list[str], log_dir: Path, urls: dict[str, str],
          extra_env: dict[str, str] | None = None) -> Child:
    """Run ``python -m bank_transfer.<name> ARGS`` with stdout and stderr in ``<name>.log``.

    Database URLs (``urls``: option name to URL) go through the environment, not the
    command line, where any local user could read a password with ``ps``;
    ``extra_env`` is added to it too.
    """
    env = dict(os.environ)
    env.update({url_env_var(option): url for option, url in urls.items()})
    env.update(extra_env or {})
    # The child imports bank_transfer from the same folder as this demo.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", f"bank_transfer.{name}", *args],
        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
    )
    return Child(name, process, log_path, log_file)


def wait_healthy(child: Child, url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200, failing early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            child.check_running()
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ServiceFailed(f"{child.name} did not answer {url} within {timeout:.0f} s; "
                                    f"see {child.log_path}")
            time.sleep(0.1)


def stop_all(children: list[Child], timeout: float = 10.0) -> list[str]:
    """SIGTERM every child, then kill those still running after ``timeout`` seconds.

    Returns one line per child saying how it ended.
    """
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + timeout
    report: list[str] = []
    for child in children:
        try:
            code = child.process.wait(max(0.0, deadline - time.monotonic()))
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            report.append(f"{child.name} stopped ({how})")
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
            report.append(f"{child.name} did not stop in {timeout:.0f} s and was killed")
        finally:
            child.log_file.close()
    return report
