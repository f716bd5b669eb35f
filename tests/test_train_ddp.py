"""``ovss-label train`` under torchrun (DDP; gloo on the CPU, 2 processes): the per-step losses
and the head of one process with the same global batch, a DDP run killed after a checkpoint
and rerun resumes on both ranks to the same head, and the seeded patch sample (max_patches)
and a rank with no image of a batch give one process's update too.

Tolerance: float32 (eps 1.2e-7). Two processes sum each weight gradient in another order than
one does (two partial matmuls and an all-reduce instead of one matmul over the batch), so each
step differs by an ulp or two, which SGD with momentum carries forward. Measured here: weights
differ by less than 1e-6 of their tensor's largest value, losses by 2e-7 relative (most steps'
losses are equal). The asserts allow 1e-5 for both, 10x headroom or more, and are still far
below a real error (measured: a gather without gradient, i.e. ∂L/∂θ / 2, makes the losses
differ by 6e-4 at step 2 and the weights by 8.4).

Run as a script (``python -m torch.distributed.run ... tests/test_train_ddp.py OUT``), this
file is the worker of ``test_the_patch_sample_and_an_idle_rank_give_one_process_update``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from safetensors.torch import load_file

from ovss_label.backend.training.checkpoint import read_checkpoint

SIZES = [(60, 80), (56, 98), (70, 84), (60, 80), (84, 70), (56, 112), (63, 77), (60, 80)]
"""(H, W) of the 8 images: unequal patch counts, so the ranks' shares differ in size."""
ARGS = ["--tiny", "--epochs", "20", "--batch-size", "4", "--held-out", "0.25",
        "--checkpoint-every", "4", "--seed", "3", "--short-side", "56"]  # fmt: skip
"""5 training images: batches of 4 and 1, so rank 1 has no image in every second step."""
STEPS = 20 * 2


def _torchrun(*argv: str) -> list[str]:
    """2 processes on this machine, on a free port (each test its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *argv]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(export, images, env): a Label Studio export of 8 photos of different sizes, each split
    into a cat part and a dog part, and the environment every run of this module shares (one
    feature store)."""
    from PIL import Image

    from ovss_label.converters import Instance
    from ovss_label.converters.labelstudio import instances_to_results

    root = tmp_path_factory.mktemp("ddp")
    images = root / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    tasks = []
    for i, (h, w) in enumerate(SIZES):
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cat = np.zeros((h, w), bool)
        cat[:, : w // (2 + i % 3)] = True
        rgb[cat] = [200, 40, 40]
        Image.fromarray(rgb).save(images / f"p{i}.png")
        result = instances_to_results([Instance(cat, "cat"), Instance(~cat, "dog")])
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d=p{i}.png"},
                      "annotations": [{"id": i + 1, "result": result}]})  # fmt: skip
    export = root / "export.json"
    export.write_text(json.dumps(tasks))
    return export, images, _env(root, OVSS_CACHE_DIR=str(root / "cache"))


def _env(root: Path, **extra: str) -> dict[str, str]:
    """The test session's private environment (conftest.py), with temporary files (torchrun's
    logs) under ``root`` too."""
    (root / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(root / "tmp"), **extra}


def _train_argv(data: tuple[Path, Path, dict[str, str]], run: Path) -> list[str]:
    export, images, _ = data
    return ["-m", "ovss_label", "train", "--ls-export", str(export), "--image-dir", str(images),
            "-o", str(run), *ARGS]  # fmt: skip


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """The same command run by one process and by torchrun with 2 processes."""
    from click.testing import CliRunner

    from ovss_label.cli import cli

    root, env = tmp_path_factory.mktemp("runs"), data[2]
    single, ddp = root / "single", root / "ddp"
    with pytest.MonkeyPatch.context() as patch:  # in this process: no second torch import
        patch.setenv("OVSS_CACHE_DIR", env["OVSS_CACHE_DIR"])
        result = CliRunner().invoke(cli, _train_argv(data, single)[2:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    done = subprocess.run(_torchrun(*_train_argv(data, ddp)), env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"single": single, "ddp": ddp}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]


def _assert_same_head(a: Path, b: Path, tolerance: float) -> None:
    """Every tensor of the two heads within ``tolerance`` of its largest |value| (0: equal)."""
    first, second = load_file(str(a / "head.safetensors")), load_file(str(b / "head.safetensors"))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        difference = float((second[name] - tensor).abs().max())
        assert difference <= tolerance * float(tensor.abs().max()), (name, difference)


def test_two_processes_train_the_head_one_process_trains(runs):
    single, ddp = runs["single"], runs["ddp"]
    assert len(json.loads((ddp / "report.json").read_text())["held_out_images"]) == 3  # ARGS
    lines = [json.loads(line) for line in (ddp / "metrics.jsonl").open()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))  # written once, by rank 0
    assert [x["patches"] for x in lines] == [
        json.loads(line)["patches"] for line in (single / "metrics.jsonl").open()
    ]
    np.testing.assert_allclose(_losses(ddp), _losses(single), rtol=1e-5)
    _assert_same_head(single, ddp, 1e-5)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not list(ddp.rglob("*.tmp"))  # no write left half-done


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def test_a_killed_ddp_run_resumes_on_both_ranks_and_ends_on_the_same_head(runs, data, tmp_path):
    cut, env = tmp_path / "cut", data[2]
    agent = subprocess.Popen(_torchrun(*_train_argv(data, cut)), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics, deadline = cut / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline:  # past the checkpoint of step 4, long before the end
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.002)
    for pid in [*_descendants(agent.pid), agent.pid]:  # kill -9 everything, workers first
        os.kill(pid, signal.SIGKILL)
    agent.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 5 <= killed_at < STEPS and not (cut / "head.safetensors").exists()
    saved = read_checkpoint(cut)[0]["step"]  # by rank 0, at each epoch's end (2 steps)
    assert 4 <= saved <= killed_at
    resumed = subprocess.run(_torchrun(*_train_argv(data, cut)), env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 0's report: steps done, done before, failed. Every rank checks that all resume from
    # the same step (World.check_same): a rank starting over would have failed the run.
    row = resumed.stderr.split("train cut")[1]
    assert [int(n) for n in re.findall(r"│\s*(\d+)", row)[:3]] == [STEPS - saved, saved, 0]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    _assert_same_head(runs["ddp"], cut, 0)  # the uninterrupted DDP run's, bit for bit
    assert _losses(cut) == _losses(runs["ddp"])


def test_the_patch_sample_and_an_idle_rank_give_one_process_update(tmp_path):
    """``train()`` itself under torchrun (this file as the worker): batches of 4, 4 and 1
    images (rank 1 idle on the third), more labelled patches than ``max_patches``."""
    from train_helpers import build, run_inputs

    from ovss_label.backend.training.train import train

    dataset, features = build(tmp_path / "single", count=12)
    train(run_inputs(dataset, features), _worker_config(), tmp_path / "single" / "run")
    worker = [str(Path(__file__)), str(tmp_path / "ddp")]
    done = subprocess.run(_torchrun(*worker), env=_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = tmp_path / "single" / "run", tmp_path / "ddp" / "run"
    assert {json.loads(line)["patches"] for line in (ddp / "metrics.jsonl").open()} == {40, 24}
    np.testing.assert_allclose(_losses(ddp), _losses(single), rtol=1e-5)
    _assert_same_head(single, ddp, 1e-5)


def _worker_config():
    from ovss_label.backend.training.train import TrainConfig

    # 9 training images: batches of 4, 4, 1; 24 labelled patches an image, 40 kept of 96.
    return TrainConfig(epochs=4, batch_size=4, lr=0.1, held_out=0.2, checkpoint_every=5,
                       max_patches=40)  # fmt: skip


def _worker(out: Path) -> None:
    from train_helpers import build, run_inputs

    from ovss_label.backend.training import distributed
    from ovss_label.backend.training.train import train

    with distributed.session("cpu") as world:
        assert world.size == 2
        # The synthetic set is in memory (a fixed random "backbone"): each rank builds its own.
        dataset, features = build(out / f"rank{world.rank}", count=12)
        train(run_inputs(dataset, features), _worker_config(), out / "run", world=world)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
