"""The durable jobs table (claim, heartbeat, stale re-queue, attempts, cancel) and the runner
that kills a training subprocess's whole process group."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from ovss_label.backend.learning.jobs import Job, JobError, JobState, JobStore, UnknownJobError
from ovss_label.backend.learning.runner import run_in_subprocess

LEASE = 30.0


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "events.sqlite"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> JobStore:
    return JobStore(db_path, clock=clock)


def _expire(store: JobStore, clock: FakeClock) -> list[Job]:
    clock.advance(LEASE + 1)
    return store.recover_stale()


# ---- enqueue ---------------------------------------------------------------------------------
def test_enqueue_makes_a_queued_job(store: JobStore, clock: FakeClock) -> None:
    job = store.enqueue(7, inputs={"tasks": [1, 2], "epochs": 3})
    assert job.state is JobState.QUEUED and job.project == 7 and job.kind == "train"
    assert (job.attempts, job.max_attempts, job.reason) == (0, 3, "")
    assert job.inputs == {"tasks": [1, 2], "epochs": 3} and job.result is None
    assert job.created_at == job.updated_at == clock.now
    assert job.lease_owner is None and job.lease_expires_at is None and job.progress is None
    assert store.get(job.id) == job


def test_enqueue_keeps_one_active_job_per_project_and_kind(store: JobStore) -> None:
    first = store.enqueue(1, inputs={"n": 1})
    assert store.enqueue(1, inputs={"n": 2}) == first  # the queued one, inputs unchanged
    other = store.enqueue(2)
    assert other.id != first.id
    assert store.enqueue(1, kind="eval").id not in (first.id, other.id)
    claimed = store.claim("w", LEASE)
    assert claimed is not None and claimed.id == first.id
    assert store.enqueue(1).id == first.id  # running counts as active too
    store.finish(first.id, "w", "done")
    fresh = store.enqueue(1)
    assert fresh.id > first.id and fresh.state is JobState.QUEUED


def test_the_unique_index_holds_across_two_stores(db_path: Path, clock: FakeClock) -> None:
    one, two = JobStore(db_path, clock=clock), JobStore(db_path, clock=clock)
    assert one.enqueue(5).id == two.enqueue(5).id
    with sqlite3.connect(db_path) as raw, pytest.raises(sqlite3.IntegrityError):
        raw.execute(
            "INSERT INTO jobs (project, kind, state, max_attempts, inputs, created_at,"
            " updated_at) VALUES (5, 'train', 'queued', 3, '{}', 0, 0)"
        )


def test_racing_enqueues_insert_once(db_path: Path, clock: FakeClock) -> None:
    stores = [JobStore(db_path, clock=clock), JobStore(db_path, clock=clock)]
    ids: list[int] = []
    barrier = threading.Barrier(8)

    def enqueue(i: int) -> None:
        barrier.wait()
        ids.append(stores[i % 2].enqueue(9, inputs={"by": i}).id)

    threads = [threading.Thread(target=enqueue, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(stores[0].list(project=9)) == 1


@pytest.mark.parametrize("inputs", [[1, 2], {"x": {1, 2}}, {"x": math.nan}, {"p": Path("a")}])
def test_inputs_must_be_a_json_object(store: JobStore, inputs: object) -> None:
    with pytest.raises(JobError, match="inputs must be"):
        store.enqueue(1, inputs=inputs)  # type: ignore[arg-type]
    assert store.list() == []


@pytest.mark.parametrize("project", [True, "7", 1.5])
def test_project_must_be_an_integer(store: JobStore, project: object) -> None:
    with pytest.raises(JobError):
        store.enqueue(project)  # type: ignore[arg-type]


# ---- claim -----------------------------------------------------------------------------------
def test_claim_takes_the_oldest_queued_job(store: JobStore, clock: FakeClock) -> None:
    ids = []
    for project in (3, 1, 2):
        ids.append(store.enqueue(project).id)
        clock.advance(1)
    claimed = [store.claim(f"w{i}", LEASE) for i in range(3)]
    assert [job.id for job in claimed if job] == ids
    assert store.claim("w", LEASE) is None
    job = claimed[0]
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
    assert job.lease_owner == "w0" and job.lease_seconds == LEASE
    assert job.heartbeat_at == clock.now and job.lease_expires_at == clock.now + LEASE


def test_claim_by_kind(store: JobStore) -> None:
    train, evaluate = store.enqueue(1), store.enqueue(1, kind="eval")
    assert store.claim("w", LEASE, kind="eval") == store.get(evaluate.id)
    assert store.claim("w", LEASE, kind="eval") is None
    assert store.claim("w", LEASE) == store.get(train.id)


def test_claim_keeps_at_most_max_running_jobs_under_live_leases(
    store: JobStore, clock: FakeClock
) -> None:
    """Replicas on one data directory train one job at a time (``serve --max-training-jobs``):
    a second project's job waits while the first runs, not after its worker died."""
    first, second = store.enqueue(1), store.enqueue(2)
    assert store.claim("replica-a", LEASE, max_running=1) == store.get(first.id)
    assert store.claim("replica-b", LEASE, max_running=1) is None
    assert store.claim("replica-b", LEASE, max_running=2) == store.get(second.id)  # 2 allowed
    assert store.finish(first.id, "replica-a", "done").state is JobState.DONE
    assert store.claim("replica-b", LEASE, max_running=1) is None  # the second still runs
    clock.advance(LEASE + 1)  # its worker died: a lapsed lease does not block the others
    third = store.enqueue(3)
    assert store.claim("replica-b", LEASE, max_running=1) == store.get(third.id)


def test_claim_needs_an_owner_and_a_lease(store: JobStore) -> None:
    store.enqueue(1)
    for owner, lease in (("", LEASE), ("w", 0.0)):
        with pytest.raises(JobError):
            store.claim(owner, lease)
    assert store.list()[0].state is JobState.QUEUED


def test_concurrent_claims_take_each_job_once(db_path: Path, clock: FakeClock) -> None:
    stores = [JobStore(db_path, clock=clock), JobStore(db_path, clock=clock)]
    expected = {stores[0].enqueue(project).id for project in range(24)}
    claimed: list[int] = []

    def work(i: int) -> None:
        while (job := stores[i % 2].claim(f"worker-{i}", LEASE)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(expected)
    assert all(job.attempts == 1 for job in stores[1].list())


# ---- heartbeat -------------------------------------------------------------------------------
def test_heartbeat_extends_the_lease_and_records_progress(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    clock.advance(20)
    assert store.heartbeat(job.id, "w", progress=0.5, pid=4321)
    clock.advance(20)
    assert store.heartbeat(job.id, "w")  # progress and pid are kept
    now = store.get(job.id)
    assert now is not None and (now.progress, now.pid) == (0.5, 4321)
    assert now.heartbeat_at == clock.now and now.lease_expires_at == clock.now + LEASE
    assert store.recover_stale() == []  # 40 s after the claim, yet heartbeated


def test_heartbeat_by_another_owner_is_refused(store: JobStore) -> None:
    job = store.enqueue(1)
    assert not store.heartbeat(job.id, "w")  # queued: nobody holds it
    store.claim("w", LEASE)
    before = store.get(job.id)
    assert not store.heartbeat(job.id, "intruder", progress=0.9)
    assert store.get(job.id) == before
    assert not store.heartbeat(999, "w")
    with pytest.raises(JobError, match="progress"):
        store.heartbeat(job.id, "w", progress=1.5)


def test_a_late_heartbeat_keeps_a_lease_nobody_took(store: JobStore, clock: FakeClock) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    clock.advance(LEASE + 5)
    assert store.heartbeat(job.id, "w")
    assert store.recover_stale() == []


# ---- stale leases and attempts ---------------------------------------------------------------
def test_an_expired_lease_is_requeued_with_its_attempts(store: JobStore, clock: FakeClock) -> None:
    job = store.enqueue(1)
    store.claim("w1", LEASE)
    clock.advance(LEASE - 1)
    assert store.recover_stale() == []  # not expired yet
    [requeued] = _expire(store, clock)
    assert requeued.id == job.id and requeued.state is JobState.QUEUED
    assert requeued.attempts == 1 and requeued.reason == "lease expired"
    assert requeued.lease_owner is None and requeued.lease_expires_at is None
    assert not store.heartbeat(job.id, "w1")  # the old worker must stop
    with pytest.raises(JobError, match="only its lease holder"):
        store.finish(job.id, "w1", "done")
    again = store.claim("w2", LEASE)
    assert again is not None and again.id == job.id and again.attempts == 2


def test_the_third_expiry_fails_the_job(store: JobStore, clock: FakeClock) -> None:
    job = store.enqueue(1)
    for attempt in (1, 2, 3):
        claimed = store.claim(f"w{attempt}", LEASE)
        assert claimed is not None and claimed.attempts == attempt
        [after] = _expire(store, clock)
    assert after.state is JobState.FAILED
    assert after.reason == "gave up after 3 attempts: lease expired"
    assert store.claim("w", LEASE) is None
    assert store.enqueue(1).id != job.id  # a failed job no longer blocks its project


def test_release_requeues_then_gives_up_with_the_last_reason(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    released = store.release(job.id, "w", "killed by signal 9 (SIGKILL): out of memory?")
    assert released.state is JobState.QUEUED and "out of memory" in released.reason
    store.claim("w", LEASE)
    _expire(store, clock)
    store.claim("w", LEASE)
    failed = store.release(job.id, "w", "exit code 1:\n Traceback")
    assert failed.state is JobState.FAILED
    assert failed.reason == "gave up after 3 attempts: exit code 1: Traceback"


def test_a_smaller_attempt_budget(db_path: Path, clock: FakeClock) -> None:
    store = JobStore(db_path, clock=clock, max_attempts=1)
    store.enqueue(1)
    store.claim("w", LEASE)
    [failed] = _expire(store, clock)
    assert failed.state is JobState.FAILED and failed.max_attempts == 1
    with pytest.raises(JobError):
        JobStore(db_path, max_attempts=0)


# ---- finish and cancel -----------------------------------------------------------------------
@pytest.mark.parametrize("state", ["done", "failed", "rejected", JobState.CANCELLED])
def test_the_holder_finishes(store: JobStore, clock: FakeClock, state: str) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    clock.advance(5)
    done = store.finish(job.id, "w", state, result={"miou": 0.41}, reason="scored")
    assert done.state is JobState(state) and done.result == {"miou": 0.41}
    assert done.reason == "scored" and done.updated_at == clock.now
    assert done.lease_expires_at is None
    assert not store.heartbeat(job.id, "w")
    with pytest.raises(JobError):
        store.finish(job.id, "w", "done")  # final: no second finish
    assert _expire(store, clock) == []


def test_finish_is_refused_to_others_and_to_odd_states(store: JobStore) -> None:
    job = store.enqueue(1)
    with pytest.raises(JobError, match="is queued"):
        store.finish(job.id, "w", "done")
    store.claim("w", LEASE)
    with pytest.raises(JobError, match="only its lease holder"):
        store.finish(job.id, "intruder", "done")
    for state in ("queued", "running", "bogus"):
        with pytest.raises(JobError, match="finishes"):
            store.finish(job.id, "w", state)
    with pytest.raises(JobError, match="result must be"):
        store.finish(job.id, "w", "done", result={"loss": math.inf})
    with pytest.raises(UnknownJobError):
        store.finish(999, "w", "done")
    assert store.list()[0].state is JobState.RUNNING


def test_cancel_a_queued_job_at_once(store: JobStore) -> None:
    job = store.enqueue(1)
    cancelled = store.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.reason == "cancelled before it ran"
    assert store.claim("w", LEASE) is None
    with pytest.raises(JobError, match="already cancelled"):
        store.cancel(job.id)
    with pytest.raises(UnknownJobError):
        store.cancel(999)


def test_cancel_a_running_job_through_its_worker(store: JobStore, clock: FakeClock) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    requested = store.cancel(job.id)
    assert requested.state is JobState.RUNNING and requested.cancel_requested
    assert store.cancel(job.id).cancel_requested  # twice is once
    clock.advance(10)
    assert not store.heartbeat(job.id, "w")  # stop: kill the process group ...
    extended = store.get(job.id)
    assert extended is not None and extended.lease_expires_at == clock.now + LEASE
    cancelled = store.finish(job.id, "w", "cancelled", reason="cancelled by the user")
    assert cancelled.state is JobState.CANCELLED  # ... then finish as cancelled


def test_a_cancelled_job_whose_worker_died_is_not_requeued(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.enqueue(1)
    store.claim("w", LEASE)
    store.cancel(job.id)
    [after] = _expire(store, clock)
    assert after.state is JobState.CANCELLED and after.attempts == 1
    assert store.claim("w", LEASE) is None


# ---- restarts and listing --------------------------------------------------------------------
def test_a_restart_keeps_everything(db_path: Path, clock: FakeClock) -> None:
    before = JobStore(db_path, clock=clock)
    running = before.enqueue(1, inputs={"snapshot": "s1"})
    before.claim("old-server", LEASE)
    before.heartbeat(running.id, "old-server", progress=0.25, pid=99)
    finished = before.enqueue(2)
    before.claim("old-server", LEASE)
    before.finish(finished.id, "old-server", "rejected", result={"gate": "worse"})
    queued = before.enqueue(3)
    jobs = before.list()
    del before

    after = JobStore(db_path, clock=clock)  # the server starts again
    assert after.list() == jobs
    [recovered] = _expire(after, clock)
    assert recovered.id == running.id and recovered.state is JobState.QUEUED
    assert recovered.inputs == {"snapshot": "s1"} and recovered.progress == 0.25
    assert [job.id for job in (after.claim("new", LEASE), after.claim("new", LEASE))] == [
        running.id,
        queued.id,
    ]


def test_list_newest_first_and_by_project(store: JobStore, clock: FakeClock) -> None:
    a = store.enqueue(1)
    clock.advance(1)
    b = store.enqueue(2)
    store.cancel(a.id)
    clock.advance(1)
    c = store.enqueue(1)
    assert [job.id for job in store.list()] == [c.id, b.id, a.id]
    assert [job.id for job in store.list(project=1)] == [c.id, a.id]
    assert [job.id for job in store.list(limit=1)] == [c.id]
    assert store.list(project=42) == []
    record = store.list()[0].to_dict()
    assert record["state"] == "queued" and json.loads(json.dumps(record)) == record


# ---- the subprocess runner -------------------------------------------------------------------
def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """The process is gone or a zombie (killed, not yet reaped by whoever adopted it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_runner_normal_exit(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "job.log"
    ticks: list[int] = []
    code = "import time; print('epoch 1', flush=True); time.sleep(0.3)"
    returncode, reason = run_in_subprocess(
        _python(code), on_tick=lambda: ticks.append(1) or True, poll_seconds=0.05, log_path=log
    )
    assert (returncode, reason) == (0, "")
    assert ticks and "epoch 1" in log.read_text()


def test_runner_crash_names_the_last_log_line(tmp_path: Path) -> None:
    code = "print('loading'); import sys; sys.exit('boom: no annotations')"
    for log in (tmp_path / "job.log", None):
        returncode, reason = run_in_subprocess(_python(code), on_tick=lambda: True, log_path=log)
        assert (returncode, reason) == (1, "exit code 1: boom: no annotations")


def test_runner_names_the_signal_that_killed_the_child() -> None:
    pids: list[int] = []

    def kill_it() -> bool:
        os.kill(pids[0], signal.SIGKILL)  # the kernel's OOM killer, say
        return True

    returncode, reason = run_in_subprocess(
        _python("import time; time.sleep(30)"),
        on_tick=kill_it,
        poll_seconds=0.05,
        on_start=pids.append,
    )
    assert returncode == -signal.SIGKILL
    assert reason == "killed by signal 9 (SIGKILL): out of memory?"


def test_runner_cancel_terminates_the_child() -> None:
    started = time.monotonic()
    returncode, reason = run_in_subprocess(
        _python("import time; time.sleep(30)"), on_tick=lambda: False, poll_seconds=0.05
    )
    assert returncode == -signal.SIGTERM
    assert reason == "stopped: process group killed (SIGTERM)"
    assert time.monotonic() - started < 5


SPAWNER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def mark(name):
    path = os.path.join(sys.argv[1], name)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
if len(sys.argv) > 2:  # the grandchild
    mark("grandchild.pid")
    time.sleep(60)
else:
    subprocess.Popen([sys.executable, __file__, sys.argv[1], "grandchild"])
    while not os.path.exists(os.path.join(sys.argv[1], "grandchild.pid")):
        time.sleep(0.01)
    mark("child.pid")  # after the grandchild's mark: both started
    time.sleep(float(os.environ.get("CHILD_SLEEP", "60")))
"""


def _spawner(tmp_path: Path) -> list[str]:
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    return [sys.executable, str(script), str(tmp_path)]


def _both_started(tmp_path: Path) -> bool:
    return (tmp_path / "child.pid").exists()


def _pids(tmp_path: Path) -> list[int]:
    return [int((tmp_path / name).read_text()) for name in ("child.pid", "grandchild.pid")]


def test_runner_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    returncode, reason = run_in_subprocess(
        _spawner(tmp_path),
        on_tick=lambda: not _both_started(tmp_path),
        poll_seconds=0.05,
        grace_seconds=0.3,
    )
    assert returncode == -signal.SIGKILL  # both ignore SIGTERM
    assert reason == "stopped: process group killed (SIGKILL after 0.3 s)"
    assert all(_gone(pid) for pid in _pids(tmp_path))


def test_runner_kills_what_a_finished_command_left_behind(tmp_path: Path) -> None:
    def wait_for_both() -> bool:
        while not _both_started(tmp_path):
            time.sleep(0.02)
        return True

    returncode, _ = run_in_subprocess(
        _spawner(tmp_path),
        on_tick=wait_for_both,
        poll_seconds=0.05,
        env={**os.environ, "CHILD_SLEEP": "0.5"},
    )
    assert returncode == 0
    assert _gone(_pids(tmp_path)[1])  # the sleeping grandchild did not outlive the job


def test_runner_kills_the_group_when_on_tick_raises(tmp_path: Path) -> None:
    pids: list[int] = []

    def broken() -> bool:
        raise RuntimeError("the database is gone")

    with pytest.raises(RuntimeError, match="database"):
        run_in_subprocess(
            _python("import time; time.sleep(30)"),
            on_tick=broken,
            poll_seconds=0.05,
            on_start=pids.append,
        )
    assert _gone(pids[0])


def test_a_job_command_dies_with_a_killed_server(tmp_path: Path) -> None:
    """``kill -9`` of the server (here a stand-in parent process) takes its job's command
    with it, although the command runs in its own session (``runner.die_with_parent``)."""
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text(
        "from ovss_label.backend.learning.runner import die_with_parent\n"
        "import time\ndie_with_parent()\ntime.sleep(60)\n"
    )
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import os, sys, time\n"
        "from ovss_label.backend.learning.runner import PARENT_PID, run_in_subprocess\n"
        "env = {**os.environ, PARENT_PID: str(os.getpid())}\n"
        f"run_in_subprocess([sys.executable, {str(child)!r}], on_tick=lambda: True,\n"
        "                  env=env, on_start=lambda pid: print(pid, flush=True))\n"
    )
    server = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    job_pid = int(server.stdout.readline())
    time.sleep(1.0)  # the command has asked for its parent-death signal
    server.kill()
    server.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(job_pid):
        time.sleep(0.05)
    assert not _alive(job_pid), "the job's command outlived the killed server"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False
