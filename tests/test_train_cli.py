"""``ovss-label train`` and ``--method fmbseg`` end to end on tiny twins: pseudo-labels and a
Label Studio export as data, a SIGKILLed run resumed to the same head, predictions Label
Studio accepts, ``eval`` with ``fmbseg`` beside ``naclip``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ovss_label.backend.training.head import load_head
from ovss_label.cli import cli

H, W = 60, 80


def _cli(*argv: str):
    result = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        rgb[:, : W // 2] = [200, 40, 40] if i % 2 else [40, 40, 200]  # some structure
        Image.fromarray(rgb).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "pseudo"
    _cli("train", "--pseudo", str(images), "--labels", "cat, dog", "--tiny", "-o", str(run),
         "--epochs", "2", "--batch-size", "2", "--held-out", "0.25",
         "--short-side", "112")  # fmt: skip
    return run


def test_training_on_pseudo_labels_writes_the_run(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["checkpoint.safetensors", "data", "head.safetensors", "metrics.jsonl",
                     "pseudo", "report.json", "report.png"]  # fmt: skip
    assert len(list((trained / "pseudo").glob("*.png"))) == 8  # stage 1, saved
    report = json.loads((trained / "report.json").read_text())
    assert report["steps"] == 2 * 3  # 2 epochs of 5 training images in batches of 2
    assert sorted(report["held_out_images"]) == ["p0", "p2", "p7"]  # by id hash: sticky
    head = load_head(trained)
    assert head.meta["fingerprints"]["backbone_weight"] == "dinov2_vitl14"
    assert head.meta["classes"] == ["cat", "dog"]


def test_a_rerun_reuses_the_features_and_pseudo_labels(trained, images):
    before = {p: p.stat().st_mtime_ns for p in (trained / "pseudo").rglob("*.png")}
    argv = ["train", "--pseudo", str(images), "--labels", "cat, dog", "--tiny", "-o",
            str(trained), "--epochs", "2", "--batch-size", "2", "--held-out", "0.25",
            "--short-side", "112"]  # fmt: skip
    result = _cli(*argv)
    assert "done before" in result.output  # features and steps: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in (trained / "pseudo").rglob("*.png")} == before


def test_fmbseg_predictions_validate_in_label_studio_and_eval_runs_it_beside_naclip(
    trained, images, tmp_path
):
    out = tmp_path / "tasks.json"
    _cli("predict", str(images), "--method", "fmbseg", "--head", str(trained), "--tiny",
         "--labels", "cat, dog, tree", "-o", str(out), "--document-root", str(images))  # fmt: skip
    tasks = json.loads(out.read_text())
    config = out.with_name("tasks.label_config.xml").read_text()
    interface = LabelInterface(config)
    assert len(tasks) == 8
    for task in tasks:
        (prediction,) = task["predictions"]
        assert (
            prediction["model_version"].startswith("fmbseg·")
            and "head" in prediction["model_version"]
        )
        assert interface.validate_prediction(prediction)
    # eval: fmbseg beside naclip on the stage-1 labels as ground truth (a COCO file would do).
    truth = tmp_path / "export.json"
    export = [{"id": i + 1, "data": {"image": f"/data/local-files/?d=p{i}.png"},
               "annotations": [{"id": i + 1, "result": t["predictions"][0]["result"]}]}
              for i, t in enumerate(tasks)]  # fmt: skip
    truth.write_text(json.dumps(export))
    scores = tmp_path / "scores.json"
    _cli("eval", "--ls-export", str(truth), "--image-dir", str(images), "--label-config",
         str(out.with_name("tasks.label_config.xml")), "--method", "naclip,fmbseg", "--head",
         str(trained), "--tiny", "--json", str(scores))  # fmt: skip
    methods = json.loads(scores.read_text())["methods"]
    assert set(methods) == {"naclip", "fmbseg"}
    # Its own predictions as ground truth: every pixel but the parts `predict` drops as
    # smaller than --min-area (eval scores the raw decision).
    assert methods["fmbseg"]["aAcc"] > 0.95 and methods["naclip"]["images"] == 8  # 0.98


def test_fmbseg_without_a_head_or_with_another_backbones_head_says_so(
    trained, images, monkeypatch, tmp_path
):
    monkeypatch.delenv("OVSS_FMBSEG_HEAD")
    argv = ["predict", str(images), "--method", "fmbseg", "--tiny", "--labels", "cat", "-o",
            str(tmp_path / "t.json"), "--document-root", str(images)]  # fmt: skip
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code != 0 and "fmbseg needs a trained head" in result.output
    from ovss_label.backend.proposers import create_proposer
    from ovss_label.backend.training.head import save_head

    head = load_head(trained)
    meta = {**head.meta, "fingerprints": {**head.meta["fingerprints"],
                                          "backbone_fingerprint": "0" * 32}}  # fmt: skip
    other = tmp_path / "other" / "head.safetensors"
    save_head(other, head.module, meta)
    with pytest.raises(ValueError, match="trained on another backbone's features"):
        create_proposer("fmbseg", tiny=True, head=str(other))


@pytest.fixture(scope="module")
def export(images, tmp_path_factory) -> Path:
    """A Label Studio export labelling each photo's left half cat, the right half dog."""
    from ovss_label.converters import Instance
    from ovss_label.converters.labelstudio import instances_to_results

    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    result = instances_to_results([Instance(left, "cat"), Instance(~left, "dog")])
    tasks = [{"id": i + 1, "data": {"image": f"/data/local-files/?d=p{i}.png"},
              "annotations": [{"id": i + 1, "result": result}]} for i in range(8)]  # fmt: skip
    path = tmp_path_factory.mktemp("export") / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def _train_command(export: Path, images: Path, run: Path) -> list[str]:
    exe = str(Path(sys.executable).parent / "ovss-label")
    return [exe, "train", "--ls-export", str(export), "--image-dir", str(images), "--tiny",
            "-o", str(run), "--epochs", "30", "--batch-size", "2", "--held-out", "0.25",
            "--checkpoint-every", "3", "--seed", "5", "--short-side", "112"]  # fmt: skip


def test_a_sigkilled_run_resumes_and_ends_on_the_uninterrupted_runs_head(export, images, tmp_path):
    env = {**os.environ, "OVSS_CACHE_DIR": str(tmp_path / "cache")}  # one feature store
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_train_command(export, images, whole), env=env, check=True,
                   capture_output=True)  # fmt: skip
    process = subprocess.Popen(_train_command(export, images, cut), env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once training is well under way, mid-epoch
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 10:
            break
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = len(metrics.read_text().splitlines())
    assert 10 <= killed_at < 90, "the run was killed mid-way"
    assert not (cut / "head.safetensors").exists()
    resumed = subprocess.run(_train_command(export, images, cut), env=env, check=True,
                             capture_output=True, text=True)  # fmt: skip
    assert "done before" in " ".join(resumed.stderr.split())  # it resumed, not restarted
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 91))  # 30 epochs x 3 batches, each step once
    a, b = load_head(whole), load_head(cut)
    assert a.digest == b.digest  # the same head, bit for bit


def test_training_on_a_dataset_split(voc_root, tmp_path):
    run = tmp_path / "voc"
    _cli("train", "--dataset", "voc", "--root", str(voc_root), "--split", "val", "--tiny",
         "-o", str(run), "--epochs", "1", "--batch-size", "2", "--held-out", "0.25",
         "--short-side", "112")  # fmt: skip
    head = load_head(run)
    assert (
        head.meta["classes"][:2] == ["background", "aeroplane"] and len(head.meta["classes"]) == 21
    )
    report = json.loads((run / "report.json").read_text())
    assert len(report["held_out_images"]) == 1 and report["after"]["images"] == 1


def test_the_server_runs_fmbseg_with_its_configured_head(trained, tmp_path, monkeypatch):
    from ovss_label.backend.server import Engine, ServerSettings

    monkeypatch.delenv("OVSS_FMBSEG_HEAD")
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path, fmbseg_head=str(trained)))
    version = engine.model_version("fmbseg")
    assert version.startswith("fmbseg·") and "head" in version
    assert engine.model_version("fmbseg+sam").startswith("fmbseg+sam·")
    bare = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "2"))
    assert bare.model_version("fmbseg") == "fmbseg·unavailable"  # no head: said, not a crash


def test_train_queue_hands_a_project_to_the_servers_job_table(tmp_path):
    from ovss_label.backend.learning.jobs import JobStore
    from ovss_label.backend.store import events_path

    data = tmp_path / "data"
    missing = CliRunner().invoke(
        cli, ["train", "--project", "7", "--queue", "--data-dir", str(data)]
    )
    assert missing.exit_code != 0 and "no server data" in missing.output  # a typo makes nothing
    jobs = JobStore(events_path(data))
    argv = ["train", "--project", "7", "--queue", "--data-dir", str(data)]
    queued = CliRunner().invoke(cli, argv)
    assert queued.exit_code == 0, queued.output
    [job] = jobs.list(7)
    assert (job.state.value, job.inputs) == ("queued", {"trigger": "command line"})
    assert f"queued training job {job.id} for project 7" in queued.output
    again = CliRunner().invoke(cli, argv)
    assert f"already has training job {job.id} (queued)" in again.output and len(jobs.list()) == 1
    settings = CliRunner().invoke(cli, [*argv, "--epochs", "3"])
    assert (
        settings.exit_code == 2 and "--train-option settings apply, not --epochs" in settings.output
    )
    alone = CliRunner().invoke(cli, ["train", "--queue", "--data-dir", str(data)])
    assert alone.exit_code == 2 and "--queue needs --project" in alone.output
    no_run = CliRunner().invoke(cli, ["train", "--project", "7"])
    assert no_run.exit_code == 2 and "-o RUN_DIR is needed" in no_run.output
