"""Server under load: 8 clients x 50 ``/predict``, slow image hosts, webhooks during the load, and
the click latency of smart keypoints (``click_latency.py``).

Run ``.venv/bin/python bench/server_load.py`` (about 3 minutes on 2 cores; ``--quick`` for a
smoke run). The server is ``ovss-label serve --tiny`` in its own process, as a Label Studio
admin runs it, so its RSS is the server's alone. Images come from an HTTP server on loopback
(allowed with ``OVSS_ALLOWED_NETWORKS``): most answer at once, one in ten waits 1.5 s before
its first byte, one in twenty trickles a byte every 10 ms (the download budget cuts it), one in
twenty-five answers 503 (to be retried by Label Studio). Each request carries one task, shaped
like Label Studio 1.23's. While the clients run, 20 webhooks are sent one by one; their latency
is Label Studio's concern (it gives a webhook 1 s). Nothing here asserts a time: the table
reports, the reader judges.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
<PolygonLabels name="outline" toName="image"><Label value="cat"/><Label value="dog"/>
</PolygonLabels></View>"""


def _photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ImageHost:
    """Loopback image server: ``/ok/<n>.jpg``, ``/late/<n>.jpg`` (1.5 s before answering),
    ``/trickle/<n>.jpg`` (a byte every 10 ms), ``/busy/<n>.jpg`` (503)."""

    def __init__(self) -> None:
        photos = [_photo(i) for i in range(8)]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kind, name = self.path.strip("/").split("/")
                body = photos[int(name.split(".")[0]) % len(photos)]
                if kind == "busy":
                    self.send_response(503)
                    self.end_headers()
                    return
                if kind == "late":
                    time.sleep(1.5)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = 1 if kind == "trickle" else len(body)
                try:
                    for start in range(0, len(body), step):
                        self.wfile.write(body[start : start + step])
                        if kind == "trickle":
                            time.sleep(0.01)
                except OSError:
                    pass  # the backend gave up at its download budget: as it should

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _kind(i: int) -> str:
    if i % 25 == 7:
        return "busy"
    if i % 20 == 3:
        return "trickle"
    return "late" if i % 10 == 5 else "ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(data_dir: Path, download_timeout: float) -> tuple[subprocess.Popen, str]:
    """``ovss-label serve --tiny`` on a free port; waits for /health."""
    port = _free_port()
    env = {**os.environ, "OVSS_TINY": "1", "OVSS_OFFLINE": "1", "OVSS_CACHE_DIR": str(data_dir),
           "OVSS_ALLOWED_NETWORKS": "127.0.0.0/8",
           "OVSS_DOWNLOAD_TIMEOUT": str(download_timeout)}  # fmt: skip
    command = [str(Path(sys.executable).parent / "ovss-label"), "serve", "--tiny", "--port",
               str(port), "--host", "127.0.0.1", "--data-dir", str(data_dir / "data"),
               "--log-level", "error"]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def _client(url: str, images: str, offset: int, n: int, out: list[tuple[float, str]]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(offset, offset + n):
            task = {"id": i, "data": {"image": f"{images}/{_kind(i)}/{i}.jpg"}, "project": 1}
            body = {"tasks": [task], "project": "1.0", "label_config": CONFIG,
                    "params": {"context": None}}  # fmt: skip
            start = time.monotonic()
            try:
                response = http.post("/predict", json=body)
                entry = response.json()["results"][0] if response.status_code == 200 else None
                outcome = "error" if entry is None else "retry" if entry == [] else "answered"
            except (httpx.HTTPError, ValueError, KeyError):
                outcome = "error"
            out.append((time.monotonic() - start, outcome))


def _webhooks(url: str, stop: threading.Event, out: list[float]) -> None:
    project = {"id": 1, "title": "load", "label_config": CONFIG}
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(20):
            event = {"action": "ANNOTATION_CREATED", "project": project, "task": {"id": i},
                     "annotation": {"id": 1000 + i, "result": []}}  # fmt: skip
            start = time.monotonic()
            status = http.post("/webhook", json=event).status_code
            out.append(time.monotonic() - start if status == 201 else float("inf"))
            stop.wait(1.0)


def measure_load(clients: int = 8, per_client: int = 50) -> dict[str, Any]:
    """Runs the load (module docstring) and returns its figures."""
    host = ImageHost()
    with tempfile.TemporaryDirectory() as scratch:
        process, url = start_server(Path(scratch), download_timeout=5.0)
        try:
            _client(url, host.url, 10_000, 4, [])  # warm-up: the models load once
            rss_before = _rss_mb(process.pid)
            results: list[tuple[float, str]] = []
            hooks: list[float] = []
            stop = threading.Event()
            threads = [
                threading.Thread(target=_client, args=(url, host.url, c * per_client,
                                                       per_client, results))
                for c in range(clients)
            ]  # fmt: skip
            hook_thread = threading.Thread(target=_webhooks, args=(url, stop, hooks))
            start = time.monotonic()
            for thread in [*threads, hook_thread]:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - start
            stop.set()
            hook_thread.join()
            rss_after = _rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    latencies = sorted(t for t, _ in results)
    return {
        "requests": len(results),
        "outcomes": Counter(o for _, o in results),
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "max_s": latencies[-1],
        "wall_s": wall,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "webhooks": len(hooks),
        "webhook_max_s": max(hooks),
        "webhook_median_s": statistics.median(hooks),
    }


def load_table(f: dict[str, Any], clients: int, per_client: int) -> Table:
    table = Table(title=f"ovss-label serve --tiny: {clients} clients x {per_client} /predict")
    for column in ("figure", "value", "note"):
        table.add_column(column)
    outcomes = f["outcomes"]
    table.add_row("requests", str(f["requests"]), f"in {f['wall_s']:.0f} s")
    table.add_row("HTTP errors", str(outcomes["error"]), "target 0")
    table.add_row("answered | to retry (503, budget)", f"{outcomes['answered']} | "
                  f"{outcomes['retry']}", "retry = nothing stored, asked again")  # fmt: skip
    table.add_row("/predict p50 | p95 | max", f"{f['p50_s']:.2f} | {f['p95_s']:.2f} | "
                  f"{f['max_s']:.2f} s", "2 task workers")  # fmt: skip
    table.add_row("webhooks during the load", str(f["webhooks"]), "")
    table.add_row("webhook median | max", f"{f['webhook_median_s'] * 1000:.0f} | "
                  f"{f['webhook_max_s'] * 1000:.0f} ms", "target: every one < 1 s")  # fmt: skip
    growth = f["rss_after_mb"] - f["rss_before_mb"]
    table.add_row("server RSS before | after", f"{f['rss_before_mb']:.0f} | "
                  f"{f['rss_after_mb']:.0f} MB", f"{growth:+.0f} MB")  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 clients x 10, 20 clicks")
    args = parser.parse_args()
    clients, per_client, clicks = (2, 10, 20) if args.quick else (8, 50, 100)
    console = Console()
    console.print(load_table(measure_load(clients, per_client), clients, per_client))
    sys.path.insert(0, str(Path(__file__).parent))
    from click_latency import measure_clicks, tables

    for table in tables(measure_clicks(clicks)):
        console.print(table)


if __name__ == "__main__":
    main()
