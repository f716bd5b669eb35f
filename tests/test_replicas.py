"""Two ``serve --learn`` replicas on one data directory (docker/compose.replicas.yml): a
webhook reaching either lands in the shared tables, a project gets one training job however
many replicas are asked, and its attempts are counted once across them (a claim is one SQLite
transaction: tests/test_learning_jobs.py races claims directly)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import private_env
from helpers import free_port, wait_for

from ovss_label.backend.learning.jobs import JobStore
from ovss_label.backend.store import events_path


@pytest.fixture()
def replicas(tmp_path):
    data = tmp_path / "data"
    # Label Studio is a closed port: every job fails its snapshot at once and is tried again,
    # so claims keep happening on both replicas while the test watches.
    env = {**private_env(os.environ, tmp_path / "home"), "OVSS_OFFLINE": "1",
           "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "token"}  # fmt: skip
    processes, urls = [], []
    for _ in range(2):
        port = free_port()
        command = [str(Path(sys.executable).parent / "ovss-label"), "serve", "--tiny", "--learn",
                   "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
                   "--job-lease", "5"]  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, process in zip(urls, processes, strict=True):
            wait_for(f"{url}/health", 120, process)
        yield urls, data
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def test_replicas_share_one_queue_and_one_job_per_project(replicas):
    urls, data = replicas
    start = {"action": "START_TRAINING", "project": {"id": 5}}
    for url in urls:  # "Start training" clicked twice, the load balancer alternating
        assert httpx.post(f"{url}/webhook", json=start).status_code == 201
    jobs = JobStore(events_path(data))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        found = jobs.list(5)
        assert len(found) == 1  # one job for the project, whoever was asked
        job = found[0]
        if job.state.value == "failed":
            break
        time.sleep(0.05)
    assert job.state.value == "failed" and job.attempts == 3, job  # 3 claims, then given up
    assert job.reason.startswith("gave up after 3 attempts") and "cannot reach Label" in job.reason
    both = [httpx.get(f"{url}/jobs", params={"project": 5}).json()["jobs"] for url in urls]
    assert both[0] == both[1] and both[0][0]["id"] == job.id  # one table, seen by both
    for url in urls:
        assert httpx.get(f"{url}/health").status_code == 200
