"""Real processes on free loopback ports: `pacrecon serve` and `pacrecon sandbox`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.webhooks import TEST_SECRET

SANDBOX_KEY = "sk_sandbox_test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pacrecon(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacrecon", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any PACRECON_* variable, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACRECON_")}
    env.update(settings)
    return env


class Service:
    """One `pacrecon` command running as a process, ready once `ready_path` answers 200."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path, port: int, ready_path: str) -> None:
        self.args, self.env, self.workdir, self.port, self.ready_path = args, env, workdir, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{args[0]}-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Any:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacrecon", *self.args], env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pacrecon {self.args[0]} exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pacrecon {self.args[0]} was not ready within {timeout} s:\n{self.log_text()}")

    def stop(self, timeout: float = 40) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]


class Daemon(Service):
    def __init__(self, database_url: str, workdir: Path, **settings: str) -> None:
        port = free_port()
        env = clean_environment(
            PACRECON_DATABASE_URL=database_url,
            PACRECON_WEBHOOK_SECRETS=TEST_SECRET,
            PACRECON_PORT=str(port),
            PACRECON_LOG_FORMAT="json",
            **settings,
        )
        # the working directory is not the repository: its .env must not leak in
        super().__init__(["serve"], env, workdir, port, "/readyz")


class SandboxProcess(Service):
    def __init__(self, workdir: Path, *options: str) -> None:
        port = free_port()
        args = ["sandbox", "--port", str(port), "--api-key", SANDBOX_KEY, *options]
        super().__init__(args, clean_environment(), workdir, port, "/_sandbox/state")

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Api-Key": SANDBOX_KEY}, timeout=15)
