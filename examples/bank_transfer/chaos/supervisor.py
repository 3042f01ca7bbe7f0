"""Runs the services of one scenario and restarts those that die.

Each service is a ``python -m bank_transfer.<module>`` child process, started as
the demo starts them (database URLs through the environment). Until the load is
done a dead service is restarted after a short random delay, with its crash
points armed again (and a new seed, so it does not die at the same spot); after
that ("calm"), it comes back without crash points, so that the run can settle.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..children import EXAMPLES_DIR
from ..runtime import url_env_var
from .faults import CRASH_ENV, LOG_ENV, SEED_ENV, format_spec


@dataclass
class Service:
    name: str  # bank1, relay, relay2, bank2
    module: str
    args: list[str]
    urls: dict[str, str]  # option -> URL, passed as environment variables
    crash: dict[str, float] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restart_at: float | None = None
    starts: int = 0
    kills: int = 0  # deaths by SIGKILL (the crash points')
    other_exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, services: list[Service], folder: Path, seed: int) -> None:
        self.services = {s.name: s for s in services}
        self.folder = folder
        self.random = random.Random(seed)
        self.seed = seed
        self.fault_log = folder / "faults.log"
        self.calm = False
        self.paused: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def _spawn(self, service: Service) -> None:
        env = dict(os.environ)
        env.update({url_env_var(opt): url for opt, url in service.urls.items()})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES_DIR),
                                                          env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(CRASH_ENV, None)
        if service.crash and not self.calm:
            env[CRASH_ENV] = format_spec(service.crash)
            env[SEED_ENV] = str(self.random.randrange(2**31))
            env[LOG_ENV] = str(self.fault_log)
        if service.log is None:
            service.log = (self.folder / f"{service.name}.log").open("ab")
        service.log.write(f"--- start {service.starts + 1} (crash points: "
                          f"{env.get(CRASH_ENV, 'none')})\n".encode())
        service.log.flush()
        service.process = subprocess.Popen(
            [sys.executable, "-m", service.module, *service.args],
            stdin=subprocess.DEVNULL, stdout=service.log, stderr=subprocess.STDOUT, env=env,
        )
        service.starts += 1

    def start(self) -> Supervisor:
        with self._lock:
            for service in self.services.values():
                self._spawn(service)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                for service in self.services.values():
                    self._tend(service)

    def _tend(self, service: Service) -> None:
        now = time.monotonic()
        if service.process is not None:
            code = service.process.poll()
            if code is None:
                return
            service.process = None
            if code == -signal.SIGKILL:
                service.kills += 1
            elif not (self.calm and code in (0, -signal.SIGTERM)):  # not quiet()'s doing
                service.other_exits.append(code)
            # Short and random: sometimes back before anyone noticed, sometimes not.
            service.restart_at = now + self.random.uniform(0.1, 1.0)
        if service.name in self.paused:
            return
        if service.restart_at is not None and now >= service.restart_at:
            service.restart_at = None
            self._spawn(service)

    def quiet(self) -> None:
        """The load is done: from now on a service comes back without crash points,
        and one that is still armed is restarted unarmed at once (gently)."""
        with self._lock:
            self.calm = True
            armed = [s for s in self.services.values() if s.crash and s.process is not None]
        for service in armed:
            process = service.process
            if process is not None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()

    def alive(self, name: str) -> bool:
        service = self.services[name]
        return service.process is not None and service.process.poll() is None

    def faults(self) -> dict[str, int]:
        """Faults the services recorded (one line each, written before acting)."""
        counts: dict[str, int] = {}
        try:
            lines = self.fault_log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return counts
        for line in lines:
            point = line.split(" ", 1)[0]
            counts[point] = counts.get(point, 0) + 1
        return counts

    def stop(self) -> list[str]:
        """Stop every service (SIGTERM, then SIGKILL); lines on unexpected exits."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        processes = [s.process for s in self.services.values() if s.process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        notes = []
        for service in self.services.values():
            if service.log is not None:
                service.log.close()
            if service.other_exits:
                notes.append(f"{service.name} exited by itself {len(service.other_exits)} "
                             f"time(s) (codes {sorted(set(service.other_exits))})")
        return notes
