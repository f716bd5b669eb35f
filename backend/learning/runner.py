"""Run a training command in its own process group, so nothing it does can take the server down.

A crash, an out-of-memory kill or a hang ends the subprocess, never the server: the worker gets
an exit code and a one-line reason for the job's row. The subprocess starts a new session
(``start_new_session=True``), so it leads its own process group and everything it spawns
(data loader workers, a grandchild shell) is in that group: cancelling kills the whole group,
SIGTERM first, SIGKILL after a grace period, and whatever is left of the group after the
command ends is killed too, so nothing of a job outlives it. If the server itself is killed
(``kill -9``), an ``ovss-label`` command started with ``OVSS_PARENT_PID`` in its environment
dies with it (:func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

TAIL_BYTES = 4096
"""How much of the end of the log is read for the last line of a failure."""


def run_in_subprocess(
    command: list[str],
    *,
    on_tick: Callable[[], bool],
    poll_seconds: float = 1.0,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    grace_seconds: float = 10.0,
    on_start: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Runs ``command`` to its end, or until ``on_tick`` says stop.

    Args:
        command: The program and its arguments (no shell).
        on_tick: Called every ``poll_seconds`` while the command runs; the worker heartbeats
            there. Returning False (cancelled, or the lease lost) kills the process group. If it
            raises, the group is killed and the exception propagates.
        poll_seconds: How often ``on_tick`` runs.
        env: The subprocess's environment (None: the server's).
        log_path: Where stdout and stderr go, appended (None: a temporary file, read for the
            reason and deleted).
        grace_seconds: How long SIGTERM has before SIGKILL.
        on_start: Called once with the subprocess's pid (its process group id) to record.

    Returns:
        ``(returncode, reason)``: the exit code (negative: the signal that killed it, as in
        ``subprocess``) and one line: "" for exit 0, "exit code 1: <last log line>", "killed by
        signal 9 (SIGKILL): out of memory?", or "stopped: process group killed (SIGTERM)".
    """
    with _log_file(log_path) as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
        stopped = ""
        try:
            if on_start is not None:
                on_start(process.pid)
            stopped = _wait(process, on_tick, poll_seconds, grace_seconds)
        except BaseException:
            _stop(process, grace_seconds)
            raise
        finally:
            _kill_group(process.pid, signal.SIGKILL)  # what the command left behind
        return process.returncode, stopped or _reason(process.returncode, log)


def _log_file(log_path: Path | None) -> IO[bytes]:
    """The log, opened for appending and reading back its tail."""
    if log_path is None:
        return tempfile.TemporaryFile()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return open(log_path, "ab+")  # closed by the caller's with


def _wait(
    process: subprocess.Popen[bytes],
    on_tick: Callable[[], bool],
    poll_seconds: float,
    grace_seconds: float,
) -> str:
    """Waits for the end, ticking; "" when it ended by itself, else why it was stopped."""
    while True:
        try:
            process.wait(timeout=poll_seconds)
            return ""
        except subprocess.TimeoutExpired:
            pass
        if not on_tick():
            return f"stopped: process group killed ({_stop(process, grace_seconds)})"


def _stop(process: subprocess.Popen[bytes], grace_seconds: float) -> str:
    """Kills the process group: SIGTERM, then SIGKILL if the leader outlives the grace period.
    Returns the signal that ended it."""
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
        used = "SIGTERM"
    except subprocess.TimeoutExpired:
        used = f"SIGKILL after {grace_seconds:g} s"
    # The group may hold more than the leader (a child ignoring SIGTERM): kill it all.
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()
    return used


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    """Sends ``sig`` to the process group; an empty group is already gone."""
    # PermissionError: macOS answers EPERM for a group of only zombies.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reason(returncode: int, log: IO[bytes]) -> str:
    """One line on how the command ended ("" for success)."""
    if returncode == 0:
        return ""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        oom = ": out of memory?" if number == signal.SIGKILL else ""
        return f"killed by signal {number} ({name}){oom}"
    last = _last_line(log)
    return f"exit code {returncode}: {last}" if last else f"exit code {returncode}"


def _last_line(log: IO[bytes]) -> str:
    """The last non-empty line of the log (at most 300 characters)."""
    log.flush()
    size = log.seek(0, os.SEEK_END)
    log.seek(max(0, size - TAIL_BYTES))
    lines = log.read().decode("utf-8", "replace").splitlines()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last[:300]


PARENT_PID = "OVSS_PARENT_PID"
"""Set by the worker to the server's pid for the commands it starts."""


def die_with_parent() -> None:
    """Called first by ``python -m ovss_label``: when ``OVSS_PARENT_PID`` names this process's
    parent, asks Linux to SIGKILL it when that parent dies (``prctl(PR_SET_PDEATHSIG)``), and
    exits at once if the parent is already gone. A job's command runs in its own session, out
    of the server's process group, so a ``kill -9`` of the server would otherwise leave it
    training on; the job, re-queued after the restart, would then have two trainers writing
    one run folder. Done in the child itself: ``preexec_fn`` is unsafe in a threaded server.
    Elsewhere than Linux this is a no-op."""
    expected = os.environ.get(PARENT_PID, "")
    if not expected.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(expected):  # the parent died before the request took effect
        os._exit(1)
