"""The training jobs as a server and a command show them: ``GET /jobs``, ``ovss-label jobs``."""

from __future__ import annotations

from click.testing import CliRunner
from fastapi.testclient import TestClient

from ovss_label.backend.server import Engine, ServerSettings, create_app
from ovss_label.cli import cli


def test_get_jobs_lists_the_table_newest_first_and_by_project(tmp_path):
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    client = TestClient(create_app(engine))
    assert client.get("/jobs").json() == {"jobs": []}
    first = engine.jobs.enqueue(3, inputs={"trigger": "START_TRAINING"})
    engine.jobs.enqueue(4)
    claimed = engine.jobs.claim("worker-1", lease_seconds=60)
    assert claimed is not None and claimed.id == first.id
    engine.jobs.heartbeat(first.id, "worker-1", progress=0.25)
    jobs = client.get("/jobs").json()["jobs"]
    assert [(j["project"], j["state"]) for j in jobs] == [(4, "queued"), (3, "running")]
    assert jobs[1]["progress"] == 0.25 and jobs[1]["inputs"] == {"trigger": "START_TRAINING"}
    only = client.get("/jobs", params={"project": 3}).json()["jobs"]
    assert [j["id"] for j in only] == [first.id]


def test_the_jobs_command_reads_a_data_directory(tmp_path):
    missing = CliRunner().invoke(cli, ["jobs", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no server data" in missing.output
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    job = engine.jobs.enqueue(7)
    engine.jobs.cancel(job.id)
    shown = CliRunner().invoke(cli, ["jobs", "--data-dir", str(tmp_path), "--project", "7"])
    assert shown.exit_code == 0, shown.output
    assert "cancelled" in shown.output and "0/3" in shown.output
    empty = CliRunner().invoke(cli, ["jobs", "--data-dir", str(tmp_path), "--project", "8"])
    assert "no training jobs" in empty.output


def test_a_jobs_report_is_served_from_the_data_directory_and_nothing_else(tmp_path):
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    client = TestClient(create_app(engine))
    done = engine.jobs.enqueue(3)
    engine.jobs.claim("worker-1", lease_seconds=60)
    work = tmp_path / "runs" / f"job-{done.id}"
    work.mkdir(parents=True)
    (work / "report.json").write_text('{"job": 1, "state": "done"}')
    (work / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    engine.jobs.finish(
        done.id, "worker-1", "done", result={"report": f"runs/job-{done.id}/report.json"}
    )
    answer = client.get(f"/jobs/{done.id}/report")
    assert answer.status_code == 200 and answer.json() == {"job": 1, "state": "done"}
    picture = client.get(f"/jobs/{done.id}/report.png")
    assert picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")
    assert (
        _not_found(client, f"/jobs/{done.id}/log") == "a job has report and report.png, not 'log'"
    )
    assert _not_found(client, "/jobs/99/report") == "no training job 99"
    queued = engine.jobs.enqueue(4)
    assert _not_found(client, f"/jobs/{queued.id}/report") == (
        f"training job {queued.id} has no report (queued)"
    )
    (work / "report.png").unlink()
    assert _not_found(client, f"/jobs/{done.id}/report.png") == (
        f"training job {done.id}: its report file is gone"
    )
    # A result naming a file outside the data directory is never read.
    (tmp_path.parent / "secret.json").write_text("{}")
    engine.jobs.claim("worker-1", lease_seconds=60)
    engine.jobs.finish(queued.id, "worker-1", "rejected", result={"report": "../secret.json"})
    assert _not_found(client, f"/jobs/{queued.id}/report") == (
        f"training job {queued.id}: its report file is gone"
    )


def _not_found(client: TestClient, url: str) -> str:
    """The detail of a 404 answer (any other status fails)."""
    answer = client.get(url)
    assert answer.status_code == 404, (url, answer.status_code)
    detail: str = answer.json()["detail"]
    return detail


def test_the_jobs_command_shows_the_gates_numbers_and_the_report(tmp_path):
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    job = engine.jobs.enqueue(3)
    engine.jobs.claim("worker-1", lease_seconds=60)
    result = {"miou": {"candidate": 0.5125, "active": 0.43, "zero_shot": 0.2},
              "report": f"runs/job-{job.id}/report.json"}  # fmt: skip
    engine.jobs.finish(job.id, "worker-1", "done", result=result, reason="promoted")
    shown = CliRunner().invoke(cli, ["jobs", "--data-dir", str(tmp_path)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "0.512 vs active 0.430" in shown.output
    assert f"runs/job-{job.id}/report.png" in " ".join(shown.output.split())
