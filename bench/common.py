"""What every benchmark here shares: the machine's conditions, child processes measured
from outside (wall time and peak RSS from the kernel), medians."""

from __future__ import annotations

import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench scripts run as files; tests.daemon and the packages live here
    sys.path.insert(0, str(REPO))


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    # the child's peak resident set (VmHWM of its own address space, read every 5 ms while it
    # runs), plus the peak of each process it started (a pass's page writer process): the
    # sum of their peaks, which is at least the peak of their sum. Not wait4's ru_maxrss: on
    # Linux that also counts the forking parent's resident set (exec keeps the high-water
    # mark of the address space it replaces), so a bench holding a large ledger in memory
    # made every child look as large as itself.
    max_rss_mb: float
    cpu_seconds: float = 0.0  # the child's user + system time, its reaped children's included (wait4's rusage)
    # each process's own peak, by pid, the child's first
    max_rss_mb_by_process: dict[int, float] = field(default_factory=dict)


def run_child(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 1800) -> ChildRun:
    """Run `args` to its end, sampling its peak RSS (VmHWM: the kernel's high-water mark
    since exec, so a sample misses only what grows in the last 5 ms of its life)."""
    started = time.perf_counter()
    out_path, err_path = cwd / "child.stdout", cwd / "child.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err)
        deadline = started + timeout
        peaks: dict[int, float] = {process.pid: 0.0}
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            for member in [process.pid, *descendants(process.pid)]:
                try:
                    peaks[member] = max(peaks.get(member, 0.0), proc_status_mb(member, "VmHWM"))
                except (OSError, KeyError):  # exiting: its address space is gone already
                    pass
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.005)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return ChildRun(
        returncode=process.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        wall_seconds=wall,
        max_rss_mb=sum(peaks.values()),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss_mb_by_process=peaks,
    )


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs. Read from each one's main thread only (as
    `children_of`): the daemon and a pass start their writer processes from their event
    loop, the main thread; every thread's list, read every 5 ms, would cost the machine
    being measured."""
    found: list[int] = []
    for child in children_of(pid):
        found += [child, *descendants(child)]
    return found


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system time the processes `pids` have used so far, their reaped children's
    included (a PostgreSQL backend that exits is counted in its postmaster's)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime: fields 14-17 of stat
    return total / _TICK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid` so far: its main thread (the event loop, in a daemon)
    apart from its other threads (the ledger's writer among them)."""
    main = others = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        used = int(fields[11]) + int(fields[12])
        if int(task.name) == pid:
            main += used
        else:
            others += used
    return {"main_thread": main / _TICK, "other_threads": others / _TICK}


def children_of(pid: int) -> list[int]:
    """The running child processes of `pid` (a daemon's webhook writer process)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pids_named(name: str) -> list[int]:
    """Every running process whose command name is `name` (a PostgreSQL server's backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def proc_status_mb(pid: int, field: str) -> float:
    """VmRSS / VmHWM of a running process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1


def resident_mb_together(pids: list[int]) -> float:
    """The resident memory of `pids` together, each physical page counted once, in MiB.

    Summed VmRSS counts a page twice when two processes map it (the shared libraries a
    daemon and its child both load); PSS divides it among every process that maps it,
    those outside `pids` too. This reads each page's frame number from
    /proc/PID/pagemap (root only: others read 0) and counts the distinct frames: what the
    processes hold in RAM between them, which is what a cgroup's memory limit sees of them
    (page cache and kernel memory aside)."""
    if os.geteuid() != 0:
        raise PermissionError("frame numbers in /proc/PID/pagemap are readable by root only")
    frames: set[int] = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                start, end = (int(part, 16) for part in line.split()[0].split("-"))
                if line.rstrip().endswith("[vsyscall]"):
                    continue  # outside the process's own pages; pagemap cannot be read there
                pagemap.seek(start // _PAGE * 8)
                entries = pagemap.read((end - start) // _PAGE * 8)
                for (entry,) in struct.iter_unpack("<Q", entries):
                    if entry & _PRESENT:
                        frames.add(entry & _PFN_MASK)
    return len(frames) * _PAGE / 2**20


def conditions() -> dict[str, Any]:
    """The load and the machine, recorded beside every figure (the machine is shared)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "commit": commit,
        "loadavg_1_5_15": os.getloadavg(),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)
