"""``--ray`` (``backend/scale``) on a local Ray of 2 CPUs started here: ``predict`` over files
writes the files a single-process run writes and resumes after a kill without redoing finished
images, ``predict --project`` posts what the server's engine posts, ``train`` fills the same
feature store, and without Ray installed ``--ray`` says how to install it.

Equal outputs need equal torch thread counts: a reduction split over 2 threads rounds
differently from 1 (COCO scores differ in their last bits between two single-process runs
too), so the runs without Ray here use 1 thread, as each Ray actor does on 2 CPUs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from click.testing import CliRunner
from PIL import Image

from ovss_label.backend.scale.cluster import RayOptions, plan_pool
from ovss_label.cli import cli

pytestmark = pytest.mark.ray

OUTPUTS = ("tasks.json", "tasks.label_config.xml", "coco.json")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray for the module: 2 CPUs, as this machine and CI have."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Torch on 1 thread in this process (module docstring), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five images (two with one stem: their overlays get hashed names), an EXIF-rotated
    JPEG and a broken file."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg", "b.png", "c.png", "d.png"):
        pixels = rng.integers(0, 255, (48, 64, 3), np.uint8)
        pixels[:, :32] = (200, 40, 40)  # some structure: the tiny model finds instances
        Image.fromarray(pixels).save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: stored 80x48, shown 48x80
    Image.new("RGB", (80, 48), (30, 200, 30)).save(folder / "rotated.jpg", exif=exif)
    (folder / "zz-broken.jpg").write_bytes(b"not a jpeg")
    return folder


def _predict(photos: Path, out: Path, *ray_args: str) -> str:
    out.mkdir(exist_ok=True)
    argv = ["--tiny", "predict", str(photos), "--labels", "cat, dog", "--format", "both",
            "-o", str(out / "tasks.json"), "--coco", str(out / "coco.json"),
            "--overlays", str(out / "overlays"), "--document-root", str(photos),
            "--background", "none", *ray_args]  # fmt: skip
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def single(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outputs of a run without Ray (1 torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single")
        _predict(photos, out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def on_ray(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outputs of a run on Ray with 2 actors."""
    out = tmp_path_factory.mktemp("on-ray")
    _predict(photos, out, "--ray", "--ray-actors", "2")
    return out


def _same_files(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    overlays = sorted(p.name for p in (a / "overlays").iterdir())
    assert overlays == sorted(p.name for p in (b / "overlays").iterdir())
    for name in overlays:
        assert (a / "overlays" / name).read_bytes() == (b / "overlays" / name).read_bytes(), name


def test_predict_on_ray_writes_the_files_of_a_single_process_run(single, on_ray):
    _same_files(single, on_ray)
    tasks = json.loads((on_ray / "tasks.json").read_text())
    assert len(tasks) == 6  # the broken file is skipped, as without Ray
    assert any(t["predictions"][0]["result"] for t in tasks)  # something to compare
    assert len(list((on_ray / "overlays").iterdir())) == 6  # a.png and a.jpg: two overlays


def test_a_rerun_after_a_kill_predicts_only_the_images_without_a_record(photos, single, on_ray):
    (records,) = (on_ray / "tasks.json.parts").iterdir()
    before = {p: p.stat().st_mtime_ns for p in records.iterdir()}
    assert len(before) == 7  # six images and the broken file (a failure for good)
    lost = sorted(before)[:2]  # killed before these two images were recorded...
    for path in lost:
        path.unlink()
    (records / ".abc.json.tmp").write_bytes(b'{"format": ')  # ...mid-write of a third
    overlays = {p: p.stat().st_mtime_ns for p in (on_ray / "overlays").iterdir()}
    output = _predict(photos, on_ray, "--ray", "--ray-actors", "2")
    after = {p: p.stat().st_mtime_ns for p in records.iterdir() if p.suffix == ".json"}
    assert set(after) == set(before)
    assert sorted(p for p in before if after[p] != before[p]) == lost  # only those redone
    redone = [p for p in overlays if p.stat().st_mtime_ns != overlays[p]]
    assert len(redone) <= 2  # at most the lost images' overlays (the broken file has none)
    assert "done before" in output
    _same_files(single, on_ray)


def test_a_rerun_of_a_finished_run_starts_no_ray_work(photos, on_ray, monkeypatch):
    from ovss_label.backend.scale import cluster

    def no_pipeline(*args, **kwargs):
        raise AssertionError("every image has a record: nothing to run")

    monkeypatch.setattr(cluster, "run_pipeline", no_pipeline)
    _predict(photos, on_ray, "--ray")


CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" '
    'ovss_method="clip_sam"><Label value="cat"/><Label value="dog"/></BrushLabels></View>'
)


def _fake_label_studio(photos: Path, version: str | None) -> SimpleNamespace:
    """Label Studio as the SDK shows it: six tasks (one already predicted by ``version``,
    one whose image cannot be decoded, one without an image), posts recorded."""
    names = ["a.png", "b.png", "c.png", "rotated.jpg", "zz-broken.jpg"]
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d={n}"}}
             for i, n in enumerate(names, 1)]  # fmt: skip
    tasks.append({"id": 6, "data": {}})
    posted: list[dict] = []
    done = [SimpleNamespace(task=1, model_version=version)]
    return SimpleNamespace(
        posted=posted,
        projects=SimpleNamespace(get=lambda id: SimpleNamespace(label_config=CONFIG)),
        predictions=SimpleNamespace(list=lambda project: done, create=lambda **p: posted.append(p)),
        tasks=SimpleNamespace(list=lambda project, fields: tasks),
    )


def _predict_project(fake: SimpleNamespace, monkeypatch, *ray_args: str) -> list[dict]:
    import ovss_label.commands.predict_project as command

    monkeypatch.setattr(command, "make_client", lambda url, key: fake)
    argv = ["--tiny", "predict", "--project", "3", "--url", "http://ls.test", "--api-key", "k",
            *ray_args]  # fmt: skip
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return sorted(fake.posted, key=lambda p: p["task"])


def test_project_on_ray_posts_what_the_engine_posts(photos, tmp_path, monkeypatch, one_thread):
    from ovss_label.backend.learning.calibrations import zero_shot_path
    from ovss_label.backend.proposers import method_plan
    from ovss_label.backend.proposers.confidence import Calibration

    monkeypatch.setenv("OVSS_LOCAL_FILES_ROOT", str(photos))
    version = method_plan("clip_sam", tiny=True).identity.version
    # The project's zero-shot map (what a training job saves): every pixel 0.625 likely right.
    data = tmp_path / "data"
    saved = zero_shot_path(data, 3, "clip_sam")
    saved.parent.mkdir(parents=True)
    flat = {**Calibration((0.0, 1.0), (0.625, 0.625)).to_json(), "model_version": version}
    saved.write_text(json.dumps(flat), encoding="utf-8")
    options = ("--data-dir", str(data))
    without = _predict_project(_fake_label_studio(photos, version), monkeypatch, *options)
    with_ray = _predict_project(_fake_label_studio(photos, version), monkeypatch, "--ray",
                                *options)  # fmt: skip
    assert with_ray == without
    assert [p["task"] for p in with_ray] == [2, 3, 4, 5, 6]  # task 1 had this version
    assert {p["model_version"] for p in with_ray} == {version}
    assert [bool(p["result"]) for p in with_ray] == [True, True, True, False, False]
    assert [p["score"] for p in with_ray] == [0.625, 0.625, 0.625, 0.0, 0.0]  # failed: 0


def test_train_on_ray_fills_the_same_feature_store(photos, tmp_path, one_thread):
    """The same files with the same metadata and fp16 tokens (not the same bytes:
    safetensors writes its metadata in an order that changes from process to process)."""

    def train(name: str, *ray_args: str) -> dict[str, tuple[dict, bytes]]:
        store = tmp_path / name / "features"
        argv = ["train", "--pseudo", str(photos), "--labels", "cat, dog", "--tiny",
                "-o", str(tmp_path / name / "run"), "--features", str(store), "--epochs", "1",
                "--batch-size", "2", "--short-side", "56", *ray_args]  # fmt: skip
        result = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return {str(p.relative_to(store)): _features(p) for p in store.rglob("*.safetensors")}

    without = train("without")
    assert len(without) == 6  # the six readable images
    assert train("with-ray", "--ray") == without


def _features(path: Path) -> tuple[dict, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), f.get_tensor("tokens").numpy().tobytes()


@pytest.mark.parametrize("command", ["predict", "train"])
def test_without_ray_the_flag_says_how_to_install_it(command, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = {
        "predict": ["predict", str(photos), "--labels", "cat", "-o", str(tmp_path / "t.json")],
        "train": ["train", "--pseudo", str(photos), "--labels", "cat", "-o", str(tmp_path)],
    }[command]
    result = CliRunner().invoke(cli, ["--tiny", *argv, "--ray"])
    assert result.exit_code == 1, result.output
    assert 'pip install "ovss-label[ray]"' in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_ray_actors_needs_ray(photos, tmp_path):
    argv = [
        "predict",
        str(photos),
        "--labels",
        "cat",
        "-o",
        str(tmp_path / "t"),
        "--ray-actors",
        "2",
    ]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and "--ray-actors needs --ray" in result.output


@pytest.mark.parametrize(
    ("cluster", "options", "expected"),
    [
        # 2 CPUs: one actor by default; the actors leave one CPU to the tasks.
        ({"CPU": 2.0}, RayOptions(), (1, 1, "cpu", {"num_cpus": 1.0})),
        ({"CPU": 2.0}, RayOptions(actors=2), (2, 1, "cpu", {"num_cpus": 0.5})),
        ({"CPU": 32.0}, RayOptions(), (8, 3, "cpu", {"num_cpus": 3.0})),
        (
            {"CPU": 16.0, "GPU": 4.0},
            RayOptions(gpu=True),
            (4, 3, "cuda", {"num_cpus": 3.0, "num_gpus": 1.0}),
        ),
    ],
)
def test_the_pool_fits_the_cluster(cluster, options, expected):
    pool = plan_pool(cluster, options)
    assert (pool.actors, pool.threads, pool.device, pool.resources) == expected


def test_gpus_on_a_cluster_without_any_is_an_error():
    with pytest.raises(ValueError, match="no GPU"):
        plan_pool({"CPU": 8.0}, RayOptions(gpu=True))
