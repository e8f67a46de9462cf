"""Does deploy/systemd/pacrecon.service let `pacrecon serve` do what it does?

The unit's seccomp filter answers a system call it does not allow with EPERM
(`SystemCallErrorNumber=EPERM`): nothing crashes, something fails later, under systemd
only. So the daemon runs here under strace, as the unit runs it (the webhook writer
process, PacSpace reachable: the sandbox), once on a SQLite ledger and once on PostgreSQL
when PACRECON_TEST_DATABASE_URL names a server (as .ci/run sets it; libpq's calls and
sockets are then traced too), through what it does in production: start, webhooks through
the writer process, a delta emitted to PacSpace, a reconciliation pass whose page is written
by the page writer process (PACRECON_RECONCILE_WRITER=process: its start must show in the
trace), the report, metrics, a stop by SIGTERM. Then every system call it and
its writer processes made is checked against the unit's SystemCallFilter= lines (expanded by
`systemd-analyze syscall-filter`, with the calls systemd always allows), every socket
family against RestrictAddressFamilies=, and no memory is mapped writable and executable
at once (MemoryDenyWriteExecute=).

    .ci/unit-syscalls.py TRACE_DIR     (run by .ci/check-deploy, with the project's .venv)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.conftest import POSTGRES_ENV, migrated_sqlite_url, postgres_database  # noqa: E402
from tests.daemon import SANDBOX_KEY, SandboxProcess, clean_environment, free_port  # noqa: E402
from tests.webhooks import TEST_SECRET, envelope, sign  # noqa: E402

UNIT = REPO / "deploy" / "systemd" / "pacrecon.service"
STALE_AFTER_SECONDS = 1
API, ADMIN = "api-token-for-the-syscall-check", "admin-token-for-the-syscall-check"
# SQLite gives a new -wal/-shm file its database's owner only when it runs as root
# (`geteuid()==0` just before, in its robust_open): the check runs as root in CI, the unit
# never does (DynamicUser=), so such a call right after `geteuid() = 0` is not counted
ROOT_ONLY = {"fchown"}
ROOT_CHECK = re.compile(r"^\d+\s+(?:geteuid\(\)|<\.\.\. geteuid resumed>\))\s+= 0$")
# the calls a filter never blocks (systemd.exec(5), SystemCallFilter=)
ALWAYS = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
CALL = re.compile(r"^\d+\s+([a-z0-9_]+)\(")
FAMILY = re.compile(r"^\d+\s+(?:socket|socketpair)\((AF_[A-Z0-9]+)")
WRITE_EXEC = re.compile(r"^\d+\s+(?:mmap|mprotect|pkey_mprotect)\(.*PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE")


def unit_lines(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """A syscall group of systemd-analyze, nested groups included."""
    seen = seen if seen is not None else set()
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, seen) if item.startswith("@") else {item}
    return calls


def allowed_calls() -> set[str]:
    """The unit's SystemCallFilter= lines in order: an allow-list, then what `~` takes away."""
    allowed: set[str] | None = None
    for value in unit_lines("SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.removeprefix("~").split():
            names |= expand(item) if item.startswith("@") else {item}
        if deny:
            allowed = (allowed if allowed is not None else set()) - names
        else:
            allowed = (allowed or set()) | names
    return (allowed or set()) | ALWAYS


def exercise(url: str, api: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(40):
            signed = sign(envelope("delta.verified", {"recordId": f"a_unknown_{time.time_ns()}", "delta": "1.5"}))
            answer = http.post("/webhooks/pacspace", content=signed.body, headers=signed.headers)
            assert answer.status_code == 200, answer.text
        answer = http.post("/v1/deltas", content='{"customerId":"cus_1","delta":-12.50,"reason":"usage"}',
                           headers={"Authorization": f"Bearer {api}", "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        time.sleep(STALE_AFTER_SECONDS + 0.5)  # stale by the pass: it has a page to write
        admin = {"Authorization": f"Bearer {ADMIN}"}
        run = http.post("/admin/reconciliation/runs", headers=admin)
        assert run.status_code == 202, run.text
        deadline = time.monotonic() + 60
        while http.get(f"/admin/reconciliation/runs/{run.json()['run_id']}", headers=admin).json()["status"] == "running":
            assert time.monotonic() < deadline, "the pass did not finish"
            time.sleep(0.2)
        for path in ("/admin/reconciliation/report?format=csv", "/admin/reconciliation/report?format=html", "/metrics", "/readyz"):
            assert http.get(path, headers=admin).status_code == 200, path


def run_traced(database_url: str, sandbox: SandboxProcess, work: Path, trace_dir: Path) -> tuple[int, Path]:
    """`pacrecon serve` on `database_url` under strace, through `exercise`, then SIGTERM:
    its exit code and the trace."""
    port = free_port()
    env = clean_environment(
        PACRECON_DATABASE_URL=database_url,
        PACRECON_WEBHOOK_SECRETS=TEST_SECRET,
        PACRECON_PORT=str(port),
        PACRECON_LOG_FORMAT="json",
        PACRECON_WEBHOOK_WRITER="process",
        PACRECON_RECONCILE_WRITER="process",  # a page of one delta written by the page writer process too
        PACRECON_PACSPACE_BASE_URL=sandbox.url,
        PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
        PACRECON_API_TOKEN=API,
        PACRECON_ADMIN_TOKEN=ADMIN,
        PACRECON_STALE_AFTER_SECONDS=str(STALE_AFTER_SECONDS),
    )
    trace = trace_dir / "serve.strace"
    log = (trace_dir / "serve.log").open("wb")
    daemon = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "pacrecon", "serve"],
                              env=env, cwd=work, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert daemon.poll() is None, f"pacrecon serve exited {daemon.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "pacrecon serve was not ready within 60 s under strace"
            time.sleep(0.1)
        exercise(f"http://127.0.0.1:{port}", API)
    finally:
        # to the daemon itself: strace started with -o FILE blocks fatal signals (its -I3)
        traced = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        for pid in traced:
            os.kill(int(pid), signal.SIGTERM)
        daemon.wait(60)
        log.close()
    return daemon.returncode, trace


def judge(exit_code: int, trace: Path, server_port: int | None = None) -> dict[str, object]:
    """What the trace shows against the unit's filters; "ok" says whether all is allowed
    (and, given `server_port`, that the database's connections were traced at all)."""
    calls: dict[str, int] = {}
    families: set[str] = set()
    write_exec: list[str] = []
    root_only = 0
    last_of: dict[str, str] = {}  # each thread's previous line
    lines = trace.read_text(errors="replace").splitlines()
    for line in lines:
        thread = line.split(" ", 1)[0]
        previous, last_of[thread] = last_of.get(thread, ""), line
        if (match := CALL.match(line)) is not None:
            if match[1] in ROOT_ONLY and ROOT_CHECK.match(previous):
                root_only += 1  # asked for because we run as root here; never under the unit's dynamic user
                continue
            calls[match[1]] = calls.get(match[1], 0) + 1
        if (match := FAMILY.match(line)) is not None:
            families.add(match[1])
        if WRITE_EXEC.match(line):
            write_exec.append(line[:200])
    processes = len({line.split()[0] for line in lines if line[:1].isdigit()})
    denied = sorted(set(calls) - allowed_calls())
    allowed_families = {f for value in unit_lines("RestrictAddressFamilies") for f in value.split()}
    bad_families = sorted(families - allowed_families)
    ports = (f"sin_port=htons({server_port})", f"sin6_port=htons({server_port})")
    database_connects = sum(1 for line in lines if "connect(" in line and any(port in line for port in ports))
    # the pass's page writer process ran (its calls are in the trace): its execve, as spawned
    page_writers = sum(1 for line in lines if "execve(" in line and '"pacrecon.page_writer"' in line)
    ok = exit_code == 0 and not denied and not bad_families and not write_exec and "socketpair" in calls and page_writers > 0
    ok = ok and (server_port is None or database_connects > 0)
    return {"ok": ok, "exit_code": exit_code, "database_connects_traced": database_connects if server_port else None,
            "page_writer_processes_traced": page_writers,
            "threads_and_processes": processes, "distinct_calls": len(calls), "root_only_calls_after_geteuid_0": root_only,
            "denied_calls": {c: calls[c] for c in denied}, "socket_families": sorted(families),
            "families_not_allowed": bad_families, "write_and_execute_mappings": write_exec[:5]}


def main() -> int:
    trace_root = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp(prefix="pacrecon-syscalls-"))
    admin_url = os.environ.get(POSTGRES_ENV)
    results: dict[str, dict[str, object]] = {}
    with ExitStack() as stack:
        sandbox = SandboxProcess(work, "--seed", "5", "--verify-delay", "0.2").start()
        stack.callback(sandbox.stop)
        ledgers: dict[str, tuple[Callable[[], str], int | None]] = {"sqlite": (lambda: migrated_sqlite_url(work / "ledger.db"), None)}
        if admin_url:
            server = make_url(admin_url)
            # over TCP its connections must show in the trace (libpq's calls traced at all)
            port = server.port or 5432 if server.host and not server.host.startswith("/") else None
            ledgers["postgresql"] = (lambda: stack.enter_context(postgres_database(admin_url, "pacrecon_syscalls")), port)
        else:
            print(f"{POSTGRES_ENV} is not set: PostgreSQL (libpq) is not traced", flush=True)
        for name, (ledger_url, server_port) in ledgers.items():
            trace_dir = trace_root / name
            trace_dir.mkdir(parents=True, exist_ok=True)
            results[name] = judge(*run_traced(ledger_url(), sandbox, work, trace_dir), server_port=server_port)
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    return 0 if all(result["ok"] for result in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
