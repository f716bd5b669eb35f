"""A training job from claim to promotion (backend/learning/worker.py), with the real
subprocesses (``python -m ovss_label train`` and ``eval``) on tiny twins; Label Studio is a
fake SDK client and the images are local files (``OVSS_LOCAL_FILES_ROOT``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ovss_label.backend.evaluation.calibration import Reliability
from ovss_label.backend.learning.gate import GateConfig
from ovss_label.backend.learning.jobs import JobStore
from ovss_label.backend.learning.versions import VersionStore
from ovss_label.backend.learning.worker import WorkerSettings, run_job
from ovss_label.backend.store import events_path
from ovss_label.converters import Instance
from ovss_label.converters.labelstudio import instances_to_results

H, W = 56, 84
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def _project(images) -> list[dict]:
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    result = instances_to_results([Instance(left, "cat"), Instance(~left, "dog")])
    tasks = []
    for i in range(10):
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[:, : W // 2], rgb[:, W // 2 :] = (200, 40, 40), (40, 40, 200)
        Image.fromarray(rgb).save(images / f"p{i}.png")
        tasks.append({"id": 100 + i, "data": {"image": f"/data/local-files/?d=p{i}.png"},
                      "annotations": [{"id": 500 + i, "result": result,
                                       "updated_at": "2026-12-01T00:00:00Z"}],
                      "predictions": [7]})  # fmt: skip
    return tasks


def _client(tasks):
    exports = SimpleNamespace(as_json=lambda project_id: tasks)
    projects = SimpleNamespace(get=lambda id: SimpleNamespace(label_config=CONFIG),
                               exports=exports)  # fmt: skip
    return SimpleNamespace(projects=projects)


def test_a_job_snapshots_trains_scores_and_promotes_a_version(tmp_path, monkeypatch):
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir()
    monkeypatch.setenv("OVSS_LOCAL_FILES_ROOT", str(images))
    monkeypatch.setenv("OVSS_CACHE_DIR", str(tmp_path / "cache"))  # the subprocesses' store
    jobs, versions = JobStore(events_path(data)), VersionStore(events_path(data), data)
    queued = jobs.enqueue(5, inputs={"trigger": "START_TRAINING"})
    job = jobs.claim("worker-1", lease_seconds=120)
    assert job is not None and job.id == queued.id
    settings = WorkerSettings(
        data, "http://127.0.0.1:9", "token", tiny=True, poll_seconds=0.2,
        train_options=("--epochs", "1", "--batch-size", "4", "--short-side", "112"),
        gate=GateConfig(min_held_out=1, compare_zero_shot=False),  # tiny twins learn nothing
    )  # fmt: skip
    finished = run_job(job, "worker-1", jobs, versions, settings, _client(_project(images)))
    assert finished.state.value == "done", (finished.reason, finished.result)
    assert finished.reason.startswith("promoted")
    active = versions.active(5)
    assert active is not None and active.job_id == job.id
    assert active.model_version.startswith("fmbseg·") and "head" in active.model_version
    assert versions.head_path(active).is_file()
    result = finished.result or {}
    assert result["held_out"] >= 1 and result["snapshot"] == active.snapshot
    # Every subprocess ran: the training run, the candidate's and the zero-shot method's scores.
    work = data / "runs" / f"job-{job.id}"
    assert (work / "run" / "head.safetensors").is_file()
    scored = json.loads((work / "eval-zero_shot.json").read_text())
    assert set(scored["methods"]) == {"naclip"}
    train_tasks = json.loads((work / "train.json").read_text())
    assert all("predictions" not in t for t in train_tasks)  # never trained on predictions
    # The job's report: loss curve, the gate's per-class comparison, calibration; agreement
    # needs Label Studio (unreachable here), so the report says it is missing.
    assert result["report"] == f"runs/job-{job.id}/report.json"
    report = json.loads((data / result["report"]).read_text())
    assert (report["job"], report["project"], report["state"]) == (job.id, 5, "done")
    assert report["loss"] and all(len(point) == 2 for point in report["loss"])
    assert set(report["held_out"]) == {"candidate", "zero_shot"}  # no active version yet
    assert set(report["held_out"]["candidate"]["per_class"]) == set(scored["classes"])
    assert report["agreement"] is None and report["notes"] == ["agreement could not be measured"]
    assert Image.open(work / "report.png").size[0] > 1000
    # The candidate's confidence map, fitted on the held-out pixels, travels with its head.
    calibration = report["calibration"]
    assert calibration["pixels"] == sum(
        c["pixels"] for c in json.loads((work / "eval-candidate.json").read_text())["methods"]
        ["fmbseg"]["per_class"].values()
    )  # fmt: skip
    from ovss_label.backend.models.pool import ModelPool
    from ovss_label.backend.proposers import method_plan
    from ovss_label.backend.proposers.confidence import Calibration

    installed = versions.head_path(active).parent
    proposer = method_plan("fmbseg", head=str(installed), tiny=True).build(ModelPool("cpu"), None)
    assert proposer.calibration == Calibration.from_json(calibration)
    # The zero-shot method's map, fitted on the same held-out pixels, is the project's: the
    # server applies it to that model's predictions while no version is active.
    zero_shot = scored["methods"]["naclip"]
    saved = json.loads((data / "calibration" / "5" / "naclip.json").read_text())
    assert (saved["model_version"], saved["job"]) == (zero_shot["model_version"], job.id)
    assert saved["pixels"] == sum(c["pixels"] for c in zero_shot["per_class"].values())
    expected = Reliability.from_json(zero_shot["reliability"]).fit()
    assert Calibration.from_json(saved) == expected


def test_a_projects_zero_shot_baseline_is_its_own_method_with_the_servers_head(tmp_path):
    from pathlib import Path

    from ovss_label.backend.learning.worker import _zero_shot_spec, zero_shot_method

    config = CONFIG.replace('toName="image">', 'toName="image" ovss_method="fmbseg+sam">')
    assert zero_shot_method(config, "naclip") == "fmbseg"  # the config's, without SAM
    assert zero_shot_method(CONFIG, "pnp_ovss+sam") == "pnp_ovss"  # else the server's
    assert zero_shot_method("<View>not a config", "naclip+sam") == "naclip"
    plain = WorkerSettings(tmp_path, "http://ls", "key")
    assert _zero_shot_spec("pnp_ovss", plain) == ("pnp_ovss", None)
    # fmbseg has no default head: scored with the server's, not at all without one (the
    # server could not serve such a project either).
    assert _zero_shot_spec("fmbseg", plain) is None
    served = WorkerSettings(tmp_path, "http://ls", "key", zero_shot_head="/heads/run")
    assert _zero_shot_spec("fmbseg", served) == ("fmbseg", Path("/heads/run"))
