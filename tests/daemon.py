"""Real processes on free loopback ports: `pacrecon serve` and `pacrecon sandbox`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage.engine import make_engine
from tests.webhooks import TEST_SECRET

SANDBOX_KEY = "sk_sandbox_test"
SECRET_SETTINGS = ("PACRECON_WEBHOOK_SECRETS", "PACRECON_API_TOKEN", "PACRECON_ADMIN_TOKEN", "PACRECON_PACSPACE_API_KEY")
SECRET_OPTIONS = ("--api-key", "--webhook-secret")
MIN_SECRET_LENGTH = 6  # shorter values would match ordinary text by chance
STARTED: list[Service] = []  # every process the suite ran: their logs are scanned at the end (conftest)


HANDED_OUT: set[int] = set()  # a port picked but not yet listened on is free again to the kernel


def free_port() -> int:
    """A port no earlier call of this run returned: two services set up before either starts
    would otherwise get the same port now and then, and the second would fail to bind."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in HANDED_OUT:
            HANDED_OUT.add(port)
            return port


def pacrecon(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pacrecon", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert_no_secret(result.stdout + result.stderr, configured_secrets(args, env), f"pacrecon {args[0]}")
    return result


def configured_secrets(args: list[str], env: dict[str, str]) -> dict[str, str]:
    """What a command was given that must never be logged: the secret settings, the
    database password, and the secrets passed as options; by where each came from."""
    found: dict[str, str] = {}
    for name in SECRET_SETTINGS:
        for n, value in enumerate(v.strip() for v in env.get(name, "").split(",")):
            found[f"{name}[{n}]"] = value
    try:
        found["PACRECON_DATABASE_URL password"] = make_url(env.get("PACRECON_DATABASE_URL", "")).password or ""
    except Exception:
        pass  # not a URL: nothing to find
    for n, arg in enumerate(args[:-1]):
        if arg in SECRET_OPTIONS:
            found[f"{arg} #{n}"] = args[n + 1]
    return {where: value for where, value in found.items() if len(value) >= MIN_SECRET_LENGTH}


def assert_no_secret(text: str, secrets: dict[str, str], what: str) -> None:
    leaked = [where for where, value in secrets.items() if value in text]
    # name where the secret came from, never the secret itself
    assert not leaked, f"{what} wrote a configured secret to its log: {', '.join(leaked)}"


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
        STARTED.append(self)
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
        self.check_log()
        return self.process.returncode

    def check_log(self) -> None:
        """Fail if any secret this process was configured with is in its captured log."""
        assert_no_secret(self.log_text(), configured_secrets(self.args, self.env), f"pacrecon {self.args[0]} ({self.log_path})")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        # the last line may be half written while the service (or its writer process) runs: only whole lines
        whole = self.log_text().split("\n")[:-1]
        return [json.loads(line) for line in whole if line.strip()]


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


def stored_events(database_url: str, event_id: str) -> int:
    """How many rows the ledger holds for `event_id` (exactly once means 1)."""
    engine = make_engine(database_url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM webhook_event WHERE event_id = :e"), {"e": event_id}).scalar_one()
    engine.dispose()
    return int(count)


def alive(pid: int) -> bool:
    """Process `pid` runs: not gone, not a zombie (gone for our purpose, its parent has not
    reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Until `check()` holds; fails the test after `seconds`, saying `what` did not happen."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.02)
