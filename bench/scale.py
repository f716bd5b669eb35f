"""Scaling benchmark: ``predict`` over files in one process against ``predict --ray`` with 1
and 2 actors, and the CPU time Ray adds per image.

Run ``.venv/bin/python bench/scale.py [--images N] [--repeat R]`` (about 6 minutes on 2 cores
with the defaults, 32 images and 2 repeats). The workload is CPU-bound: the tiny NACLIP twin (a
random CLIP ViT of toy width; PAMR and post-processing dominate) on N 480x640 photos, 4
labels, tasks with brush and polygons, and COCO, as ``predict`` writes them. Torch runs 1
thread in every process (the single one, each half of the pair, each actor): 2 cores, one per
model, so the rows compare the same per-image work.

Everything is measured in this one run, the rows interleaved ``--repeat`` times; each row shows
its best repeat (the machine may be shared). A local Ray of 2 CPUs is started once (not timed:
a cluster serves many runs); each Ray run starts its actors and loads their models (timed: a
user waits for that). Rows:

- **1 process**: ``predict_files``, the model built beforehand;
- **2 processes, no Ray**: two such processes, half the images each: what 2 cores give this
  workload without Ray (the machine's ceiling; memory and caches are shared);
- **Ray, 1 and 2 actors**: ``predict_files_ray``; the decoding and post-processing tasks run
  beside the actors, so even 1 actor uses both cores.

Columns: **whole run** (images over the seconds from the call to the outputs written),
**steady** (the second half of the images, from the middle image's record to the last: the
pipeline full, start-up excluded), **speed-up** (steady, against 1 process), **start-up**
(seconds to the first record: actors started, models loaded, first block done), **CPU/image**
(CPU seconds of the benchmark's own processes per image over the steady part, from ``/proc``;
other work on a shared machine is not counted, though it slows every row: the load average is
printed) and **Ray adds** (CPU/image over the 1-process row's: the stages, serialization, the
object store, Ray's scheduler and Ray Data's own actors; pipelining cannot hide it).

Target: 2 actors at least 1.6x the single process (steady). Each Ray run's tasks JSON is
checked equal to the single process's.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data

from ovss_label.backend.predict import predict_files
from ovss_label.backend.scale import ProposerSpec, RayOptions, predict_files_ray
from ovss_label.converters import CocoWriter, ResultTargets
from ovss_label.ontologies import Vocabulary

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")
SPEC = ProposerSpec("naclip", {"tiny": True, "background": "none"})
LABELS = Vocabulary.from_labels("person, cat, cup, rocket")
TARGET = 1.6
Result = tuple[
    float, float, float | None, float
]  # whole s, steady s/image, start-up s, CPU s/image


class CpuMeter:
    """CPU seconds used by this benchmark's processes over time: this one and its descendants
    (the process pair, Ray's daemons, workers and actors), not the rest of a shared machine.
    Sampled from ``/proc`` every 0.25 s; a process that exits keeps its last count."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.last: dict[int, float] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            parents, cpu = {}, {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat", encoding="ascii") as stat:
                            fields = stat.read().rsplit(")", 1)[1].split()
                    except OSError:  # exited meanwhile
                        continue
                    pid = int(entry.name)
                    parents[pid] = int(fields[1])
                    cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick
            for pid in cpu:
                if self._descends(pid, parents):
                    self.last[pid] = cpu[pid]
            self.samples.append((time.time(), sum(self.last.values())))
            time.sleep(0.25)

    @staticmethod
    def _descends(pid: int, parents: dict[int, int]) -> bool:
        me = os.getpid()
        while pid > 1:
            if pid == me:
                return True
            pid = parents.get(pid, 0)
        return False

    def busy(self, start: float, end: float) -> float:
        """CPU seconds spent between two ``time.time()`` values (interpolated)."""
        times, busy = np.array(self.samples).T
        return float(np.interp(end, times, busy) - np.interp(start, times, busy))


def make_photos(folder: Path, count: int) -> list[Path]:
    """``count`` 480x640 RGB photos (scikit-image's, shifted so none repeats)."""
    paths = []
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        image = Image.fromarray(np.roll(photo, 37 * i, axis=1)).convert("RGB").resize((640, 480))
        paths.append(folder / f"p{i:03d}.png")
        image.save(paths[-1])
    return paths


def single(paths: list[Path]) -> tuple[float, float, list[dict]]:
    """(start, end) ``time.time()`` of ``predict_files`` over ``paths`` (the model built and
    warmed up before), and its tasks."""
    torch.set_num_threads(1)
    proposer = SPEC("cpu")
    predict_files(proposer, LABELS, paths[:1], output=ResultTargets("both"), url_for=str)
    start = time.time()
    tasks, _ = predict_files(proposer, LABELS, paths, output=ResultTargets("both"), url_for=str,
                             coco=CocoWriter(LABELS.names))  # fmt: skip
    return start, time.time(), tasks


def one_process(paths: list[Path], meter: CpuMeter) -> tuple[Result, list[dict]]:
    start, end, tasks = single(paths)
    per_image = (end - start) / len(paths)
    return (end - start, per_image, None, meter.busy(start, end) / len(paths)), tasks


def two_processes(paths: list[Path], meter: CpuMeter, pool: multiprocessing.pool.Pool) -> Result:
    halves = pool.map(single, [paths[::2], paths[1::2]])
    start, end = min(h[0] for h in halves), max(h[1] for h in halves)
    per_image = (end - start) / len(paths)
    return end - start, per_image, None, meter.busy(start, end) / len(paths)


def on_ray(paths: list[Path], actors: int, work: Path, meter: CpuMeter) -> tuple[Result, list]:
    """A ``predict_files_ray`` run (module docstring) and its tasks."""
    start = time.time()
    tasks, report = predict_files_ray(SPEC, LABELS, paths, output=ResultTargets("both"),
                                      records_for=work / "tasks.json", url_for=str,
                                      coco=CocoWriter(LABELS.names),
                                      options=RayOptions(actors=actors, threads=1))  # fmt: skip
    whole = time.time() - start
    done = sorted(p.stat().st_mtime for p in report.outputs["records"].glob("*.json"))
    middle = len(done) // 2
    steady = (done[-1] - done[middle]) / (len(done) - 1 - middle)
    cpu = meter.busy(done[middle], done[-1]) / (len(done) - 1 - middle)
    return (whole, steady, done[0] - start, cpu), tasks


def measure(count: int, repeat: int) -> tuple[dict[str, Result], bool]:
    """Every row's best repeat (by steady rate), and whether Ray's tasks equalled the 1-process
    tasks every time."""
    meter, best, same = CpuMeter(), {}, True
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, spawn.Pool(2) as pool:
        paths = make_photos(Path(tmp), count)
        pool.map(single, [paths[:1], paths[:1]])  # the pair's imports, outside the timing
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        time.sleep(10)  # Ray's own processes finish starting: they would compete for the cores
        for trial in range(repeat):
            result, expected = one_process(paths, meter)
            runs = {"1 process": result, "2 processes, no Ray": two_processes(paths, meter, pool)}
            for actors in (1, 2):
                work = Path(tmp) / f"ray-{trial}-{actors}"
                runs[f"Ray, {actors} actor{'s' * (actors > 1)}"], tasks = on_ray(
                    paths, actors, work, meter
                )
                same = same and json.dumps(tasks) == json.dumps(expected)
            for name, run in runs.items():
                if name not in best or run[1] < best[name][1]:
                    best[name] = run
        ray.shutdown()
    return best, same


def show(best: dict[str, Result], count: int, same: bool) -> None:
    base = best["1 process"]
    table = Table(title=f"predict, {count} photos 480x640, tiny NACLIP on CPU, torch 1 thread "
                  f"per process or actor (best of repeats)")  # fmt: skip
    for column in ("run", "whole run", "steady", "speed-up", "start-up", "CPU/image",
                   "Ray adds"):  # fmt: skip
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, (whole, steady, startup, cpu) in best.items():
        speedup = base[1] / steady
        mark = " ✓" if name == "Ray, 2 actors" and speedup >= TARGET else ""
        adds = f"{(cpu - base[3]) * 1e3:+.0f} ms" if name.startswith("Ray") else ""
        table.add_row(name, f"{count / whole:.2f} img/s", f"{1 / steady:.2f} img/s",
                      f"{speedup:.2f}x{mark}", "" if startup is None else f"{startup:.1f} s",
                      f"{cpu * 1e3:.0f} ms", adds)  # fmt: skip
    Console().print(table)
    print(
        f"target: Ray with 2 actors >= {TARGET}x 1 process (steady); Ray's tasks JSON "
        f"{'equals' if same else 'DIFFERS from'} the 1-process run's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="photos per run (default 32)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats (default 2)")
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data logs every run at INFO
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, load "
          f"average {os.getloadavg()[0]:.2f}")  # fmt: skip
    best, same = measure(args.images, args.repeat)
    show(best, args.images, same)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (this run included)")


if __name__ == "__main__":
    main()
