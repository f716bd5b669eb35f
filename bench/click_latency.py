"""Click latency: smart-keypoint clicks through the real server, SAM ViT-B, embedding cached.

Run ``.venv/bin/python bench/click_latency.py [--clicks 100]``: under a minute on 2 cores (half
of it the one image-encoder pass of the warm-up click). SAM ViT-B is the real architecture with
random weights (``_create_sam(SAM_ARCHS["sam_vit_b"])``, the same compute as the released
model), served by ``create_app(Engine(ServerSettings(...)))`` under uvicorn on loopback. The
task's image is a 512x512 PNG of the astronaut under a local-files root
(``/data/local-files/?d=photo.png``). One click warms the embedding cache; then ``--clicks``
single positive clicks at seeded positions, each a ``POST /predict`` shaped like Label Studio
1.23's (``params.context.result`` with one ``keypointlabels`` region).

Latency is the client's wall time per request (body read). The stages are measured in the same
requests by timing wrappers around the functions that do them (:class:`StageClock`); what the
wrappers do not cover (HTTP, routing, thread hops, parsing the prompt) is "the rest". The machine
is shared: the share of CPU other processes used during the clicks is printed with the figures.
Nothing here asserts a time: the table reports, the reader judges. ``measure_clicks`` and
``tables`` are what ``server_load.py`` imports.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import socket
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import fastapi.routing
import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data

import ovss_label.backend.server.interactive as interactive
import ovss_label.converters.labelstudio as labelstudio
from ovss_label.backend.models.pool import WeightRef
from ovss_label.backend.models.sam import SAM_ARCHS, LoadedSam, _create_sam
from ovss_label.backend.predict import Output
from ovss_label.backend.proposers import sam_prompts
from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Dog"/></RectangleLabels>
</View>"""
SIDE = 512
STAGES = (  # (row, stage measured inclusive, nested stages subtracted from it)
    ("fetch + decode (MediaFetcher.image)", "fetch", ()),
    ("hash + cache lookup (FeatureCache.features)", "cache", ()),
    ("SAM prompt encoder + mask decoder", "decode", ("upsample",)),
    ("mask upsampling to 512x512", "upsample", ()),
    ("mask -> brush RLE", "rle", ()),
    ("result items (Instance, region id)", "results", ("rle",)),
    ("JSON (FastAPI response serialisation)", "json", ()),
)


class StageClock:
    """Seconds per stage of the current request, from wrappers put around functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        """Times every call of ``owner.name`` (sync or async) into ``stage``."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        setattr(owner, name, timed_async if inspect.iscoroutinefunction(original) else timed)
        self._undo.append((owner, name, original))

    def take(self) -> dict[str, float]:
        """The stages' seconds since the last call, and a fresh start."""
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken

    def restore(self) -> None:
        """Puts every wrapped function back."""
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def _instrument(clock: StageClock, engine: Engine) -> None:
    """Wrappers for :data:`STAGES`; each name is looked up where the serving code calls it."""
    clock.wrap(engine.media, "image", "fetch")
    clock.wrap(engine.cache, "features", "cache")
    clock.wrap(interactive, "decode", "decode")
    clock.wrap(sam_prompts, "upscale_masks", "upsample")
    clock.wrap(labelstudio, "brush_rle_bytes", "rle")
    clock.wrap(Output, "results", "results")
    clock.wrap(fastapi.routing, "serialize_response", "json")


def sam_vit_b() -> LoadedSam:
    """SAM ViT-B, the real architecture with random weights (no weight file needed)."""
    return LoadedSam(_create_sam(SAM_ARCHS["sam_vit_b"]), "sam_vit_b", False)


def photo(root: Path) -> str:
    """Writes the astronaut, area-resized to a 512x512 PNG, under ``root``; returns its Label
    Studio local-files URL."""
    image = cv2.resize(data.astronaut(), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    Image.fromarray(image).save(root / "photo.png")
    return "/data/local-files/?d=photo.png"


def click_body(url: str, x: float, y: float, n: int) -> dict[str, Any]:
    """A ``/predict`` body as Label Studio 1.23 posts it for one smart keypoint at (x, y) %."""
    task = {"id": 1, "data": {"image": url}, "annotations": [], "predictions": [], "meta": {},
            "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z",
            "is_labeled": False, "overlap": 1, "inner_id": 1, "total_annotations": 0,
            "cancelled_annotations": 0, "total_predictions": 0, "project": 3,
            "file_upload": None}  # fmt: skip
    value = {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Cat"], "labels": ["Cat"]}
    region = {"id": f"click{n}", "type": "keypointlabels", "value": value, "origin": "manual",
              "original_width": SIDE, "original_height": SIDE, "image_rotation": 0,
              "from_name": "kp", "to_name": "image", "is_positive": True}  # fmt: skip
    params = {"login": None, "password": None, "context": {"result": [region]}}
    return {"tasks": [task], "project": "3.1763719200", "label_config": CONFIG, "params": params}


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds of all processes, of this one) so far; (0, 0) where /proc is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # not idle, iowait
    own = time.process_time()
    return busy / ticks, own


def _post(client: httpx.Client, body: dict[str, Any]) -> tuple[float, bool]:
    """(seconds, answered with one brush region) of one click."""
    start = time.perf_counter()
    response = client.post("/predict", json=body)
    seconds = time.perf_counter() - start
    result = response.json()["results"][0]["result"]
    return seconds, len(result) == 1 and result[0]["type"] == "brushlabels"


def measure_clicks(n: int = 100, sam: LoadedSam | None = None, seed: int = 0) -> dict[str, Any]:
    """Latencies of ``n`` clicks after a warm-up click, and the stages of the same requests.

    Returns:
        ``latencies_ms`` (n,), ``median_ms``, ``p95_ms``, ``mean_ms``, ``first10_ms`` and
        ``last10_ms`` (means), ``answered`` (clicks answered with one brush mask),
        ``warmup_s`` (the first click: image encoder), ``stages_ms`` (row -> median ms, plus
        "the rest"), ``threads`` (torch intra-op threads), ``others_cores`` (CPU cores other
        processes kept busy during the clicks, on average: a noisy machine shows here).
    """
    sam = sam or sam_vit_b()
    positions = np.random.default_rng(seed).uniform(5, 95, (n, 2))
    clock = StageClock()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            url = photo(Path(tmp))
            policy = MediaPolicy(local_root=Path(tmp))
            settings = ServerSettings(data_dir=Path(tmp) / "data", media=policy)
            engine = Engine(settings)
            # Engine.sam() takes the pool's SAM: this one, whatever file it came from.
            engine.pool.add(WeightRef(settings.sam_model, None, settings.tiny), sam)
            _instrument(clock, engine)
            try:
                return _click_through(engine, clock, url, positions)
            finally:
                engine.close()
    finally:
        clock.restore()


def _click_through(
    engine: Engine, clock: StageClock, url: str, positions: np.ndarray
) -> dict[str, Any]:
    """Serves ``engine``, warms its embedding cache with one click, then clicks at
    ``positions`` ((n, 2) percent) one after the other; :func:`measure_clicks`' figures."""
    with serving(create_app(engine)) as base, httpx.Client(base_url=base, timeout=600) as client:
        warmup, _ = _post(client, click_body(url, 50.0, 50.0, 0))
        clock.take()
        busy_before, own_before = _busy_seconds()
        start = time.perf_counter()
        runs = [_timed_click(client, clock, click_body(url, x, y, i + 1))
                for i, (x, y) in enumerate(positions)]  # fmt: skip
        wall = time.perf_counter() - start
        busy_after, own_after = _busy_seconds()
    others = (busy_after - busy_before) - (own_after - own_before)
    return {**_figures(runs, warmup), "others_cores": max(others, 0.0) / wall}


def _timed_click(
    client: httpx.Client, clock: StageClock, body: dict[str, Any]
) -> tuple[float, bool, dict[str, float]]:
    seconds, answered = _post(client, body)
    return seconds, answered, clock.take()


def _figures(runs: list[tuple[float, bool, dict[str, float]]], warmup: float) -> dict[str, Any]:
    ms = [s * 1e3 for s, _, _ in runs]
    stages: dict[str, list[float]] = defaultdict(list)
    for seconds, _, taken in runs:
        covered = 0.0
        for row, stage, nested in STAGES:
            own = taken.get(stage, 0.0) - sum(taken.get(s, 0.0) for s in nested)
            stages[row].append(own * 1e3)
            covered += own
        stages["the rest (HTTP, routing, thread hops, prompt parsing)"].append(
            (seconds - covered) * 1e3
        )
    return {
        "latencies_ms": ms,
        "median_ms": statistics.median(ms),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": statistics.fmean(ms),
        "first10_ms": statistics.fmean(ms[:10]),
        "last10_ms": statistics.fmean(ms[-10:]),
        "answered": sum(ok for _, ok, _ in runs),
        "warmup_s": warmup,
        "stages_ms": {row: statistics.median(values) for row, values in stages.items()},
        "threads": torch.get_num_threads(),
    }


def tables(figures: dict[str, Any]) -> list[Table]:
    """The latency table and the per-stage table of :func:`measure_clicks`' figures."""
    n = len(figures["latencies_ms"])
    latency = Table(title=f"{n} smart-keypoint clicks, SAM ViT-B, 512x512 photo, embedding cached")
    for column in ("figure", "value", "note"):
        latency.add_column(column, justify="left" if column == "figure" else "right")
    verdict = "[green]PASS[/]" if figures["median_ms"] < 150 else "[red]FAIL[/]"
    latency.add_row("median", f"{figures['median_ms']:.1f} ms", f"target < 150 ms: {verdict}")
    latency.add_row("p95", f"{figures['p95_ms']:.1f} ms", "")
    latency.add_row("mean", f"{figures['mean_ms']:.1f} ms", "")
    steady = f"{figures['first10_ms']:.1f} | {figures['last10_ms']:.1f} ms"
    latency.add_row("mean of the first 10 | last 10", steady, "steady?")
    latency.add_row("answered with one brush mask", f"{figures['answered']}/{n}", "")
    latency.add_row("warm-up click (image encoder)", f"{figures['warmup_s']:.1f} s", "excluded")
    others = f"{figures['others_cores']:.2f} cores"
    latency.add_row("other processes during the clicks", others, "noise")
    stages = Table(title="Per-stage medians over the same clicks (exclusive of nested stages)")
    stages.add_column("stage")
    stages.add_column("median", justify="right")
    for row, value in figures["stages_ms"].items():
        stages.add_row(row, f"{value:.1f} ms")
    return [latency, stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=100, help="timed clicks after the warm-up")
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console.width = 120  # logs and pipes: do not wrap the tables at 80 columns
    figures = measure_clicks(args.clicks)
    console.print(f"CPU, fp32, {figures['threads']} torch threads, uvicorn on loopback")
    for table in tables(figures):
        console.print(table)


if __name__ == "__main__":
    main()
