"""One identity per model: the plan's (nothing loaded) equals the built proposer's, and every
place a version is shown or compared (``/setup``, predictions, ``predict``, ``predict
--project``, ``/versions``) carries the same string; it changes with the weight file, the SAM
variant, a tuned configuration and the settings, and with nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ovss_label.backend.models import identity as identity_module
from ovss_label.backend.models.fingerprints import file_sha256
from ovss_label.backend.models.identity import is_tiny_version
from ovss_label.backend.models.pool import ModelPool
from ovss_label.backend.predict import Output, predict_files
from ovss_label.backend.proposers import create_proposer, method_plan
from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app
from ovss_label.backend.server.batch import predict_project
from ovss_label.backend.store import tuned_path, weights_dir
from ovss_label.methods import METHODS
from ovss_label.ontologies import Vocabulary

LABELS = Vocabulary.from_labels("cat, dog")


def _config(method: str) -> str:
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image" ovss_method="{method}">'
        '<Label value="cat"/><Label value="dog"/></BrushLabels></View>'
    )


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "files" / "a.png"
    path.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _engine(tmp_path, root: Path | None = None, **settings) -> Engine:
    media = MediaPolicy(local_root=root) if root else MediaPolicy()
    return Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", media=media, **settings))


@pytest.mark.parametrize("method", METHODS)
def test_the_plan_and_the_built_proposer_agree(method, tiny_files):
    """Without loading, the plan names the files the build loads (twins and real files)."""
    pool = ModelPool()
    for options in ({}, {"checkpoint": tiny_files["clip"], "sam_checkpoint": tiny_files["sam"]}):
        if method.startswith(("pnp", "fmbseg")) and "checkpoint" in options:
            # A BLIP twin has no file; fmbseg's files are a DINOv2 and its head's CLIP (below).
            options = {"sam_checkpoint": tiny_files["sam"]}
        if "sam" not in method:
            options.pop("sam_checkpoint", None)
        plan = method_plan(method, tiny=True, **options)
        built = plan.build(pool, None)
        assert built.identity == plan.identity
        assert built.model_version == plan.identity.version
        assert built.model_version.startswith(method + "·") and is_tiny_version(
            built.model_version
        ) == ("checkpoint" not in options and "sam_checkpoint" not in options)


def test_version_is_short_readable_and_the_manifest_complete(tiny_files):
    plan = method_plan("naclip+sam", tiny=True, sam_checkpoint=tiny_files["sam"])
    version = plan.identity.version
    assert version.split("·")[:3] == ["naclip+sam", "b16", "samB"] and len(version) < 40
    manifest = plan.identity.manifest()
    assert manifest["model_version"] == version and manifest["method"] == "naclip+sam"
    sam = next(w for w in manifest["weights"] if w["role"] == "sam")
    sam_file = Path(tiny_files["sam"])
    assert sam == {"role": "sam", "name": "sam_vit_b", "fingerprint": file_sha256(sam_file)}
    assert manifest["settings"]["dense"]["gaussian_std"] == 5.0
    assert manifest["settings"]["refine"]["prompt"] == "box+point"
    assert json.loads(json.dumps(manifest)) == manifest


def test_the_version_changes_with_file_sam_variant_tuning_and_settings(tiny_files, monkeypatch):
    def version(method, **options):
        return method_plan(method, tiny=True, **options).identity.version

    base = version("naclip", checkpoint=tiny_files["clip"])
    assert version("naclip", checkpoint=tiny_files["clip"]) == base  # deterministic
    assert version("naclip", checkpoint=tiny_files["clip_other"]) != base  # another file
    assert version("naclip", checkpoint=tiny_files["clip"], pamr_steps=0) != base
    assert version("naclip", checkpoint=tiny_files["clip"], window_batch=2) == base  # speed only
    sam_b = version("naclip+sam", sam_checkpoint=tiny_files["sam"])
    assert version("naclip+sam", sam_checkpoint=tiny_files["sam_other"]) != sam_b
    sam_l = version("naclip+sam", sam_model="sam_vit_l", sam_checkpoint=tiny_files["sam"])
    assert sam_l != sam_b and "·samL·" in sam_l  # same file, another variant asked for
    assert version("clip_sam", sam_model="sam_vit_h") != version("clip_sam")
    tuned = tuned_path("mine")
    tuned.parent.mkdir(parents=True, exist_ok=True)
    record = {"name": "mine", "layer": 3, "head": 2, "threshold": 0.2, "blur_sigma": 0.04}
    tuned.write_text(json.dumps(record))
    first = version("pnp_ovss", tuned="mine")
    assert first != version("pnp_ovss") and "·tuned·" in first
    tuned.write_text(json.dumps({**record, "threshold": 0.3}))  # re-tuned under the same name
    assert version("pnp_ovss", tuned="mine") not in (first, version("pnp_ovss"))
    monkeypatch.setattr(identity_module, "__version__", "9.9.9")  # a release alone
    assert version("naclip", checkpoint=tiny_files["clip"]) == base
    assert method_plan("naclip", tiny=True).identity.manifest()["package"] == "9.9.9"


def test_the_servers_sam_model_reaches_every_sam_method_and_clicks(tmp_path):
    engine = _engine(tmp_path, sam_model="sam_vit_l")
    for method in ("naclip+sam", "clip_sam", "pnp_ovss+sam"):
        assert "·samL·" in engine.model_version(method)
    assert engine.proposer("naclip+sam").identity.weights[-1].name == "sam_vit_l"
    assert engine.sam() is engine.proposer("naclip+sam").sam  # type: ignore[attr-defined]
    assert dict(engine.pool.builds)["sam_vit_l"] == 1


def test_a_server_plan_loads_nothing_and_names_the_file_it_will_load(tiny_files, monkeypatch):
    """A file under the official name: ``/setup`` fingerprints it without loading, and the
    loaded proposer reports the same identity."""
    from ovss_label.backend.models import clip

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    shutil.copy(tiny_files["clip"], weights_dir() / "ViT-B-16.pt")
    real = clip._create_clip
    monkeypatch.setattr(clip, "_create_clip", no_model)
    plan = method_plan("naclip", tiny=False)
    (clip_weight,) = plan.identity.weights
    assert clip_weight.fingerprint == file_sha256(weights_dir() / "ViT-B-16.pt")
    monkeypatch.setattr(clip, "_create_clip", real)
    monkeypatch.setattr(clip, "_openai_cfg", lambda arch: clip.TINY_CLIP_CFG)
    assert plan.build(ModelPool(), None).identity == plan.identity
    (weights_dir() / "ViT-B-16.pt").unlink()


@pytest.mark.parametrize("method", METHODS)
def test_setup_predictions_predict_and_predict_project_carry_one_version(method, photo, tmp_path):
    root = photo.parent
    engine = _engine(tmp_path, root)
    client = TestClient(create_app(engine))
    setup = client.post("/setup", json={"schema": _config(method)}).json()["model_version"]
    task = {"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}
    body = {"tasks": [task], "label_config": _config(method)}
    (prediction,) = client.post("/predict", json=body).json()["results"]
    assert prediction["model_version"] == setup == engine.model_version(method)
    assert client.post("/setup", json={"schema": _config(method)}).json()["model_version"] == setup
    versions = client.get("/versions").json()
    assert setup in versions["versions"]
    assert {m["model_version"] for m in versions["models"]} == set(versions["versions"])
    # `predict` (files): its own proposer, the same identity.
    tasks, _ = predict_files(create_proposer(method, tiny=True), LABELS, [photo],
                             output=Output(), url_for=str)  # fmt: skip
    assert tasks[0]["predictions"][0]["model_version"] == setup
    # `predict --project`: skips a task carrying this version, posts the same version.
    posted = []
    fake = SimpleNamespace(
        projects=SimpleNamespace(get=lambda id: SimpleNamespace(label_config=_config(method))),
        predictions=SimpleNamespace(
            list=lambda project: [SimpleNamespace(task=1, model_version=setup)],
            create=lambda **kw: posted.append(kw),
        ),
        tasks=SimpleNamespace(list=lambda project, fields: [task, {**task, "id": 2}]),
    )
    report = predict_project(engine, fake, 3)
    assert report.skipped == 1 and [p["task"] for p in posted] == [2]
    assert posted[0]["model_version"] == setup


def test_one_sam_and_one_clip_b_in_a_server_answering_every_sam_method_and_a_click(photo, tmp_path):
    engine = _engine(tmp_path, photo.parent)
    client = TestClient(create_app(engine))
    task = {"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}
    for method in ("naclip", "naclip+sam", "clip_sam"):
        body = {"tasks": [task], "label_config": _config(method)}
        assert client.post("/predict", json=body).json()["results"][0]["model_version"]
    click = {"result": [{"type": "keypointlabels", "original_width": 60, "original_height": 40,
                         "value": {"x": 50, "y": 50, "keypointlabels": ["cat"]}}]}  # fmt: skip
    body = {"tasks": [task], "label_config": _config("naclip"), "params": {"context": click}}
    (answer,) = client.post("/predict", json=body).json()["results"]
    assert answer["result"] and answer["result"][0]["type"] == "brushlabels"
    assert dict(engine.pool.builds) == {"clip_vit_b16": 1, "sam_vit_b": 1, "clip_vit_l14": 1}
    assert engine.sam() is engine.proposer("naclip+sam").sam  # type: ignore[attr-defined]


def test_models_list_shows_the_versions_and_manifests_serve_reports(tmp_path):
    from click.testing import CliRunner

    from ovss_label.cli import cli

    result = CliRunner().invoke(cli, ["--tiny", "models", "list", "--manifest",
                                      "--sam-model", "sam_vit_h"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifests = json.loads(result.stdout)
    engine = _engine(tmp_path, sam_model="sam_vit_h")
    assert [m["method"] for m in manifests] == list(METHODS)
    assert [m["model_version"] for m in manifests] == [engine.model_version(m) for m in METHODS]
    assert all(w["fingerprint"] == "tiny" for m in manifests for w in m["weights"])


def test_a_method_that_cannot_be_planned_still_answers_setup_and_versions(
    photo, tmp_path, monkeypatch
):
    """``OVSS_PNP_TUNED`` naming nothing: ``/setup`` answers (no 500), tasks fail for now."""
    monkeypatch.setenv("OVSS_PNP_TUNED", "never-tuned")
    engine = _engine(tmp_path, photo.parent, method="pnp_ovss")
    client = TestClient(create_app(engine))
    setup = client.post("/setup", json={"schema": _config("pnp_ovss")})
    assert setup.status_code == 200 and setup.json()["model_version"] == "pnp_ovss·unavailable"
    body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
            "label_config": _config("pnp_ovss")}  # fmt: skip
    assert client.post("/predict", json=body).json()["results"] == [[]]  # asked again later
    versions = client.get("/versions").json()
    assert versions["versions"][0] == "pnp_ovss·unavailable"
    assert "never-tuned" in versions["models"][0]["error"]
    assert versions["models"][0]["method"] == "pnp_ovss"  # which method cannot be planned
    assert versions["models"][1]["model_version"] == engine.model_version("naclip")


def test_setup_never_waits_for_a_model_being_built(tmp_path, monkeypatch):
    """Loading real weights takes minutes; ``/setup`` has 3 s and must not queue behind it."""
    import threading

    from ovss_label.backend.models import pool as pool_module

    engine = _engine(tmp_path)
    release, started = threading.Event(), threading.Event()
    real_build = pool_module._build

    def slow_build(ref, device):
        started.set()
        release.wait(10)
        return real_build(ref, device)

    monkeypatch.setattr(pool_module, "_build", slow_build)
    worker = threading.Thread(target=engine.proposer, args=("naclip",))
    worker.start()
    try:
        assert started.wait(10)
        answered = threading.Event()
        threading.Thread(target=lambda: (engine.model_version("naclip"), answered.set())).start()
        assert answered.wait(5)  # while the build still waits
        assert worker.is_alive()
    finally:
        release.set()
        worker.join(10)
    assert engine.proposer("naclip").model_version == engine.model_version("naclip")
