"""Real process deaths for fault tests: SIGKILL the processes whose command line names a task."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def processes_running(fragment: str) -> list[int]:
    """PIDs whose command line (Ray sets it to `ray::<task>`) contains `fragment`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def killing(fragment: str, every: bool = False) -> Iterator[list[int]]:
    """While inside, SIGKILL the first process (or, with `every`, each one) whose command line
    contains `fragment`, as the OOM killer or a lost node would; yields the PIDs killed."""
    killed: list[int] = []
    stop = threading.Event()

    def kill() -> None:
        while not stop.is_set() and (every or not killed):
            for pid in processes_running(fragment):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                if not every:
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=5)
