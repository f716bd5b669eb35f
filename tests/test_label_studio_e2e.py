"""End to end against a real Label Studio 1.23.2 (its own virtual environment, SQLite, localhost).

The harness installs Label Studio into ``.e2e/ls-venv`` (its pins clash with ours; reused when
present; the first run downloads about 1 GB and shows pip's progress), starts it with a fixed
legacy token, starts ``ovss-label serve --tiny`` and drives both through the SDK and the HTTP
API: create a BrushLabels + PolygonLabels project, upload images, connect the backend, "Retrieve
predictions" twice, annotate a task. Both processes get a private home (``conftest.private_env``)
and the real one must be unchanged afterwards. Skip it locally with ``-m "not e2e"``; CI runs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REAL_ENV, REAL_HOME, private_env
from helpers import free_port, wait_for
from PIL import Image

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="cat"/><Label value="dog"/>
  </PolygonLabels>
</View>"""
WATCHED = (".cache/ovss-label", ".cache/huggingface", ".cache/torch", ".local/share/label-studio")
"""Where, in a home, the backend and Label Studio write by default."""


@contextlib.contextmanager
def _to_terminal(config: pytest.Config) -> Iterator[None]:
    """Output (ours and subprocesses') reaches the terminal while pytest captures, as in
    ``capsys.disabled()``, which a module-scoped fixture cannot request."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        yield


def _label_studio_venv(config: pytest.Config) -> Path:
    """``.e2e/ls-venv/bin/label-studio``, installed on the first run with pip's progress shown
    (about 1 GB: minutes of silence would look like a hang)."""
    venv = Path(os.environ.get("OVSS_E2E_DIR", ROOT / ".e2e")) / "ls-venv"
    binary = venv / "bin" / "label-studio"
    if binary.exists():
        return binary
    with _to_terminal(config):
        print(f"\ninstalling Label Studio {LS_VERSION} into {venv} (first run only, ~1 GB)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # The user's environment, for their pip configuration (an index mirror, a proxy); no
        # pip cache, so the install leaves no gigabyte in ~/.cache/pip.
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir",
               "--disable-pip-version-check", f"label-studio=={LS_VERSION}"]  # fmt: skip
        subprocess.run(pip, check=True, timeout=1800, env=REAL_ENV)
    return binary


def _home_files(home: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under the per-user folders the stack would write to."""
    found = {}
    for folder in WATCHED:
        for path in (home / folder).rglob("*"):
            with contextlib.suppress(OSError):  # removed while we looked
                stat = path.stat()
                if path.is_file():
                    found[str(path.relative_to(home))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _label_studio_env(work: Path) -> dict[str, str]:
    return {
        "LABEL_STUDIO_BASE_DATA_DIR": str(work / "ls"),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_USERNAME": "e2e@example.com",
        "LABEL_STUDIO_PASSWORD": "e2e-password-1",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "ML_BLOCK_LOCAL_IP": "false",  # the backend is on 127.0.0.1
        "SSRF_PROTECTION_ENABLED": "false",  # so is the webhook Label Studio creates
        "DJANGO_DB": "sqlite",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig):
    """(Label Studio URL, backend URL, backend data dir), both running with a private home
    (caches, weights, Label Studio's data); afterwards the real home must be unchanged."""
    work = tmp_path_factory.mktemp("e2e")
    env = private_env(os.environ, work / "home")
    before = _home_files(REAL_HOME)
    ls_port, ml_port = free_port(), free_port()
    ls_command = [str(_label_studio_venv(pytestconfig)), "start", "--no-browser", "--port"]
    ls = _start([*ls_command, str(ls_port)], {**env, **_label_studio_env(work)})
    ls_url, ml_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{ml_port}"
    data_dir = work / "ml-data"
    ml = _start(
        [str(Path(sys.executable).parent / "ovss-label"), "serve", "--tiny", "--port",
         str(ml_port), "--host", "127.0.0.1", "--data-dir", str(data_dir)],
        {**env, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "OVSS_OFFLINE": "1",
         "OVSS_ALLOWED_NETWORKS": "127.0.0.0/8"},  # the flaky image host below
    )  # fmt: skip
    try:
        wait_for(f"{ml_url}/health", 120, ml)
        # Label Studio migrates a new database first: 1-7 minutes measured on a busy machine.
        wait_for(f"{ls_url}/health", 600, ls)
        yield ls_url, ml_url, data_dir
    finally:
        for process in (ml, ls):
            process.terminate()
            process.wait(timeout=30)
    changed = set(_home_files(REAL_HOME).items()) ^ set(before.items())
    assert not changed, f"the end-to-end stack wrote into {REAL_HOME}: {sorted(changed)}"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_label_studio_stores_one_prediction_per_task_and_sends_webhooks(stack):
    from label_studio_sdk.client import LabelStudio

    ls_url, ml_url, data_dir = stack
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss e2e", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    files = [(f"file{i}", (f"img{i}.png", _png(i), "image/png")) for i in range(3)]
    http.post(f"/api/projects/{project.id}/import", files=files).raise_for_status()
    client.ml.create(project=project.id, url=ml_url, title="ovss-label", is_interactive=True)
    setup = httpx.post(f"{ml_url}/setup", json={"project": f"{project.id}.0", "schema": CONFIG})
    version = setup.json()["model_version"]
    for _ in range(2):  # a second retrieve must not duplicate predictions
        action = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}"
        http.post(action, json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    tasks = list(client.tasks.list(project=project.id, fields="all"))
    assert len(tasks) == 3
    for task in tasks:
        predictions = http.get("/api/predictions/", params={"task": task.id}).json()
        assert len(predictions) == 1, predictions
        assert predictions[0]["model_version"] == version
        assert predictions[0]["result"], "the tiny model draws something on random images"
    client.annotations.create(id=tasks[0].id, result=[], was_cancelled=False)
    events = data_dir / "events.sqlite"
    for _ in range(30):
        if events.exists():
            with sqlite3.connect(events) as db:
                rows = db.execute("SELECT action FROM events").fetchall()
            if ("ANNOTATION_CREATED",) in rows:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the ANNOTATION_CREATED webhook was not recorded")


def test_batch_job_writes_back_once_and_resumes(stack):
    from click.testing import CliRunner
    from label_studio_sdk.client import LabelStudio

    from ovss_label.backend.proposers import method_plan
    from ovss_label.cli import cli

    ls_url, _, _ = stack
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss batch", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    files = [(f"file{i}", (f"b{i}.png", _png(10 + i), "image/png")) for i in range(2)]
    http.post(f"/api/projects/{project.id}/import", files=files).raise_for_status()
    args = ["--tiny", "predict", "--project", str(project.id), "--url", ls_url, "--api-key", TOKEN]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "2 predicted" in first.output
    again = CliRunner().invoke(cli, args)  # a rerun (or a resumed run) adds nothing
    assert again.exit_code == 0 and "0 predicted" in again.output and "2 already" in again.output
    predictions = http.get("/api/predictions/", params={"project": project.id}).json()
    assert len(predictions) == 2 and len({p["task"] for p in predictions}) == 2
    expected = method_plan("naclip", tiny=True).identity.version  # stored as sent (UTF-8)
    assert {p["model_version"] for p in predictions} == {expected}


class _FlakyImages:
    """An image host: ``/flaky.png`` answers 503 the first time, then the image;
    ``/text.png`` is never an image. Counts requests per path."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.seen[self.path] += 1
                if self.path == "/flaky.png" and host.seen[self.path] == 1:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = _png(20) if self.path == "/flaky.png" else b"<html>no image</html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_transient_failure_is_asked_again_and_a_permanent_one_is_not(stack):
    """Label Studio stores nothing for a task whose image failed for now (a 503), so the next
    "Retrieve predictions" asks again and it gets one; an image that is not an image gets one
    empty prediction, and Label Studio does not ask for it again."""
    from label_studio_sdk.client import LabelStudio

    ls_url, ml_url, _ = stack
    images = _FlakyImages()
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss retry", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    tasks = [{"image": f"{images.url}/flaky.png"}, {"image": f"{images.url}/text.png"}]
    http.post(f"/api/projects/{project.id}/import", json=tasks).raise_for_status()
    client.ml.create(project=project.id, url=ml_url, title="ovss-label")
    action = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}"

    def predictions() -> dict[str, list[dict]]:
        found = {}
        for task in client.tasks.list(project=project.id, fields="all"):
            name = task.data["image"].rsplit("/", 1)[1]
            found[name] = http.get("/api/predictions/", params={"task": task.id}).json()
        return found

    http.post(action, json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    first = predictions()
    assert first["flaky.png"] == [] and len(first["text.png"]) == 1
    assert first["text.png"][0]["result"] == []
    http.post(action, json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    second = predictions()
    assert len(second["flaky.png"]) == 1 and second["flaky.png"][0]["result"]
    assert len(second["text.png"]) == 1  # stored once, not asked again
    assert images.seen == {"/flaky.png": 2, "/text.png": 1}
    images.server.shutdown()


def test_eval_scores_a_live_project_and_measures_how_much_annotators_changed(stack, tmp_path):
    """``eval --project`` reads the accepted labels and the images through Label Studio (the
    token, uploads); ``eval --agreement --project`` finds each annotation's parent prediction
    in the real export: one accepted as proposed, one cleared."""
    from click.testing import CliRunner
    from label_studio_sdk.client import LabelStudio

    from ovss_label.cli import cli

    ls_url, _, _ = stack
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss eval", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    files = [(f"file{i}", (f"e{i}.png", _png(20 + i), "image/png")) for i in range(2)]
    http.post(f"/api/projects/{project.id}/import", files=files).raise_for_status()
    live = ["--project", str(project.id), "--url", ls_url, "--api-key", TOKEN]
    predicted = CliRunner().invoke(cli, ["--tiny", "predict", *live])
    assert predicted.exit_code == 0, predicted.output
    predictions = http.get("/api/predictions/", params={"project": project.id}).json()
    assert len(predictions) == 2 and all(p["result"] for p in predictions)
    kept, cleared = sorted(predictions, key=lambda p: p["task"])
    coco = tmp_path / "predicted.json"  # the export lists prediction ids: read them via the API
    exported = CliRunner().invoke(
        cli, ["export", *live, "--include-predictions", "--coco", "-o", str(coco)]
    )
    assert exported.exit_code == 0, exported.output
    assert len(json.loads(coco.read_text())["annotations"]) >= 2
    for prediction, result in ((kept, kept["result"]), (cleared, [])):
        body = {"result": result, "parent_prediction": prediction["id"]}
        http.post(f"/api/tasks/{prediction['task']}/annotations/", json=body).raise_for_status()

    out = tmp_path / "agreement.json"
    agreed = CliRunner().invoke(cli, ["eval", "--agreement", *live, "--json", str(out)])
    assert agreed.exit_code == 0, agreed.output
    versions = json.loads(out.read_text())["versions"]
    assert list(versions) == [kept["model_version"]], agreed.output
    assert versions[kept["model_version"]]["annotations"] == 2
    assert versions[kept["model_version"]]["unchanged"] == 1

    # Label Studio's JSON export itself lists predictions by id: counted, said, not compared.
    export = tmp_path / "export.json"
    export.write_text(json.dumps(client.projects.exports.as_json(project.id)))
    from_file = CliRunner().invoke(cli, ["eval", "--agreement", "--ls-export", str(export)])
    assert from_file.exit_code == 0, from_file.output
    assert "2 predictions given as ids only" in " ".join(from_file.output.split())

    scores = tmp_path / "scores.json"
    scored = CliRunner().invoke(cli, ["eval", *live, "--method", "naclip", "--tiny",
                                      "--json", str(scores)])  # fmt: skip
    assert scored.exit_code == 0, scored.output
    method = json.loads(scores.read_text())["methods"]["naclip"]
    assert (method["images"], method["failed"]) == (2, 0)  # both images read through the API


@pytest.fixture(scope="module")
def learning_server(stack, tmp_path_factory):
    """A second backend, ``serve --learn``, on the same Label Studio: jobs train a tiny head in
    a subprocess (1 epoch, small inputs) and the gate promotes a project's first version
    (tiny twins learn nothing a margin could show)."""
    ls_url, _, _ = stack
    work = tmp_path_factory.mktemp("learn")
    port, data_dir = free_port(), work / "data"
    command = _learn_command(port, data_dir)
    env = {**private_env(os.environ, work / "home"), "LABEL_STUDIO_URL": ls_url,
           "LABEL_STUDIO_API_KEY": TOKEN, "OVSS_OFFLINE": "1"}  # fmt: skip
    process = _start(command, env)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120, process)
        yield f"http://127.0.0.1:{port}", data_dir
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_annotations_train_and_promote_a_version_that_label_studio_then_predicts_with(
    stack, learning_server
):
    from click.testing import CliRunner
    from label_studio_sdk.client import LabelStudio

    from ovss_label.cli import cli
    from ovss_label.converters import Instance
    from ovss_label.converters.labelstudio import instances_to_results

    ls_url, _, _ = stack
    learn_url, data_dir = learning_server
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss learn", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    files = [(f"file{i}", (f"l{i}.png", _png(40 + i), "image/png")) for i in range(6)]
    http.post(f"/api/projects/{project.id}/import", files=files).raise_for_status()
    ml = client.ml.create(project=project.id, url=learn_url, title="ovss-label learning")
    setup = {"project": f"{project.id}.1", "schema": CONFIG}
    zero_shot = httpx.post(f"{learn_url}/setup", json=setup).json()["model_version"]
    action = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}"
    everything = {"selectedItems": {"all": True, "excluded": []}}
    http.post(action, json=everything).raise_for_status()
    left = np.zeros((48, 64), bool)
    left[:, :32] = True
    result = instances_to_results([Instance(left, "cat"), Instance(~left, "dog")], "brush",
                                  brush_name="tag")  # fmt: skip
    for prediction in http.get("/api/predictions/", params={"project": project.id}).json():
        body = {"result": result, "parent_prediction": prediction["id"]}
        http.post(f"/api/tasks/{prediction['task']}/annotations/", json=body).raise_for_status()
    new = [(f"file{i}", (f"n{i}.png", _png(70 + i), "image/png")) for i in range(3)]
    http.post(f"/api/projects/{project.id}/import", files=new).raise_for_status()  # unlabelled
    # "Start training": Label Studio posts START_TRAINING to the backend's /webhook.
    http.post(f"/api/ml/{ml.id}/train").raise_for_status()
    job = _ended_job(learn_url, project.id)
    assert job["state"] == "done" and job["reason"].startswith("promoted"), job
    trained = httpx.post(f"{learn_url}/setup", json=setup).json()["model_version"]
    assert trained != zero_shot and trained.startswith("fmbseg·")
    _check_report(learn_url, job, zero_shot)
    http.post(action, json=everything).raise_for_status()  # Label Studio predicts again
    predictions = http.get("/api/predictions/", params={"project": project.id}).json()
    by_task: dict[int, list[str]] = {}
    for prediction in predictions:
        by_task.setdefault(prediction["task"], []).append(prediction["model_version"])
    assert len(by_task) == 9 and all(v.count(trained) == 1 for v in by_task.values())
    # Active learning: Label Studio serves the unlabelled task the new version is least sure of.
    ordered = CliRunner().invoke(cli, ["predict", "--project", str(project.id), "--tiny",
                                       "--data-dir", str(data_dir), "--url", ls_url, "--api-key",
                                       TOKEN, "--uncertainty-sampling"])  # fmt: skip
    assert ordered.exit_code == 0, ordered.output
    scores = {p["task"]: p["score"] for p in predictions if p["model_version"] == trained}
    assert all(0.0 <= v <= 1.0 for v in scores.values()) and len(set(scores.values())) > 1
    unlabelled = [t["id"] for t in _tasks(http, project.id) if not t["total_annotations"]]
    first = http.get(f"/api/projects/{project.id}/next").json()
    assert first["id"] == min(unlabelled, key=scores.__getitem__), (first["id"], scores)
    # A training subprocess SIGKILLed: the server stays up, the job is re-queued and run again;
    # the same data and seed give the same head, which the gate rejects (no gain): the active
    # version never changes.
    http.post(f"/api/ml/{ml.id}/train").raise_for_status()
    victim = _running_job_pid(learn_url, project.id, after=job["id"])
    os.kill(victim["pid"], signal.SIGKILL)
    again = _ended_job(learn_url, project.id, victim["id"])
    assert httpx.get(f"{learn_url}/health").status_code == 200
    assert again["attempts"] == 2 and again["state"] == "rejected", again
    assert httpx.post(f"{learn_url}/setup", json=setup).json()["model_version"] == trained
    # Rollback: the zero-shot method again, seen by the running server at once.
    rolled = CliRunner().invoke(cli, ["models", "activate", "--project", str(project.id),
                                      "--zero-shot", "--data-dir", str(data_dir)])  # fmt: skip
    assert rolled.exit_code == 0, rolled.output
    assert httpx.post(f"{learn_url}/setup", json=setup).json()["model_version"] == zero_shot
    # The zero-shot method's scores are now calibrated for this project: the jobs measured it.
    saved = data_dir / "calibration" / str(project.id) / "naclip.json"
    assert json.loads(saved.read_text())["model_version"] == zero_shot


def _check_report(learn_url: str, job: dict, zero_shot: str) -> None:
    """The job's report: the gate's comparison, the calibration fitted on held-out pixels (it
    went into the version, beside the head), and the agreement with the zero-shot version's
    proposals, which annotators replaced on every task."""
    report = httpx.get(f"{learn_url}/jobs/{job['id']}/report").json()
    assert job["result"]["report"] == f"runs/job-{job['id']}/report.json"
    assert {"candidate", "zero_shot"} <= set(report["held_out"]) and report["loss"]
    assert report["calibration"]["pixels"] > 0
    assert report["agreement"][zero_shot]["annotations"] == 6, report["agreement"]
    picture = httpx.get(f"{learn_url}/jobs/{job['id']}/report.png")
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")


def _tasks(http: httpx.Client, project: int) -> list[dict]:
    answer = http.get("/api/tasks/", params={"project": project, "page_size": 100}).json()
    return answer["tasks"] if isinstance(answer, dict) else answer


def _jobs(learn_url: str, project: int) -> list[dict]:
    jobs: list[dict] = httpx.get(f"{learn_url}/jobs", params={"project": project}).json()["jobs"]
    return jobs


def _ended_job(learn_url: str, project: int, job_id: int | None = None) -> dict:
    """The project's newest job (or ``job_id``) once it has ended; 10 minutes at most."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = [j for j in _jobs(learn_url, project) if job_id in (None, j["id"])]
        if jobs and jobs[0]["state"] in ("done", "rejected", "failed", "cancelled"):
            return jobs[0]
        time.sleep(1)
    raise AssertionError("the training job did not end within 10 minutes")


def _running_job_pid(learn_url: str, project: int, after: int) -> dict:
    """The project's next job once its training subprocess has started (its pid recorded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = [j for j in _jobs(learn_url, project) if j["id"] > after]
        if jobs and jobs[0]["state"] == "running" and jobs[0]["pid"]:
            return jobs[0]
        time.sleep(0.1)
    raise AssertionError("no training subprocess started within 2 minutes")


def _learn_command(port: int, data_dir: Path, lease: int | None = None) -> list[str]:
    """``serve --learn`` training a tiny head fast (1 epoch, small inputs); the gate promotes
    a project's first version (tiny twins learn nothing a margin could show). ``lease``: the
    job lease in seconds (a restarted server re-runs a dead one's job after it)."""
    command = [str(Path(sys.executable).parent / "ovss-label"), "serve", "--tiny", "--learn",
               "--port", str(port), "--host", "127.0.0.1", "--data-dir", str(data_dir),
               "--train-option=--epochs=1", "--train-option=--short-side=112",
               "--train-option=--batch-size=4", "--gate-min-held-out", "1",
               "--no-gate-zero-shot"]  # fmt: skip
    return command if lease is None else [*command, "--job-lease", str(lease)]


def test_a_server_killed_mid_job_reruns_it_after_a_restart_and_activates_only_whole_versions(
    stack, tmp_path
):
    from label_studio_sdk.client import LabelStudio

    from ovss_label.backend.learning.versions import VersionStore
    from ovss_label.backend.models.weights import sha256_file
    from ovss_label.backend.store import events_path
    from ovss_label.converters import Instance
    from ovss_label.converters.labelstudio import instances_to_results

    ls_url, _, _ = stack
    port, data_dir = free_port(), tmp_path / "data"
    env = {**private_env(os.environ, tmp_path / "home"), "LABEL_STUDIO_URL": ls_url,
           "LABEL_STUDIO_API_KEY": TOKEN, "OVSS_OFFLINE": "1"}  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    server = _start(_learn_command(port, data_dir, lease=5), env)
    wait_for(f"{url}/health", 120, server)
    client = LabelStudio(base_url=ls_url, api_key=TOKEN)
    project = client.projects.create(title="ovss crash", label_config=CONFIG)
    http = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    files = [(f"file{i}", (f"c{i}.png", _png(60 + i), "image/png")) for i in range(4)]
    http.post(f"/api/projects/{project.id}/import", files=files).raise_for_status()
    ml = client.ml.create(project=project.id, url=url, title="ovss-label crash")
    left = np.zeros((48, 64), bool)
    left[:, :32] = True
    result = instances_to_results([Instance(left, "cat")], "brush", brush_name="tag")
    for task in client.tasks.list(project=project.id):
        http.post(f"/api/tasks/{task.id}/annotations/", json={"result": result}).raise_for_status()
    try:
        http.post(f"/api/ml/{ml.id}/train").raise_for_status()
        running = _running_job_pid(url, project.id, after=0)
        server.kill()  # kill -9 of the whole server, mid-job
        server.wait()
        deadline = time.monotonic() + 10  # its training subprocess dies with it
        while time.monotonic() < deadline and os.path.exists(f"/proc/{running['pid']}"):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{running['pid']}") or _zombie(running["pid"])
        store = VersionStore(events_path(data_dir), data_dir)
        assert store.active(project.id) is None  # nothing half-done was activated
        server = _start(_learn_command(port, data_dir, lease=5), env)  # the same data directory
        wait_for(f"{url}/health", 120, server)
        job = _ended_job(url, project.id, running["id"])  # re-queued once its lease expired
        assert job["state"] == "done" and job["attempts"] == 2, job
        active = store.active(project.id)
        assert active is not None and active.job_id == running["id"]
        assert sha256_file(store.head_path(active)) == active.head_sha256  # whole, verified
        setup = {"project": f"{project.id}.1", "schema": CONFIG}
        assert httpx.post(f"{url}/setup", json=setup).json()["model_version"] == (
            active.model_version
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True
