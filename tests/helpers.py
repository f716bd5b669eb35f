"""Shared test helpers: synthetic masks and independent oracles (pycocotools, the LS SDK)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import httpx
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from pycocotools import mask as coco_mask

FIXTURES = Path(__file__).parent / "fixtures"
LS_EXPORT = FIXTURES / "ls_export.json"
LABEL_CONFIG = FIXTURES / "label_config.xml"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def coco_raster(rings: list[list[float]], h: int, w: int) -> np.ndarray:
    """pycocotools' own rasterisation of polygon rings (unioned)."""
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(rings, h, w))).astype(bool)


def sdk_alpha(rle: list[int], h: int, w: int) -> np.ndarray:
    """The SDK's decoding of brush RLE, alpha channel (as ``decode_from_annotation``)."""
    return decode_rle(rle).reshape(h, w, 4)[:, :, 3]


def source_mask(result: dict) -> np.ndarray:
    """A Label Studio result's mask, decoded with the SDK / pycocotools only."""
    w, h = result["original_width"], result["original_height"]
    value = result["value"]
    if result["type"] == "brushlabels":
        return sdk_alpha(value["rle"], h, w) > 0
    if result["type"] == "polygonlabels":
        ring = [c for x, y in value["points"] for c in (x * w / 100, y * h / 100)]
        return coco_raster([ring], h, w)
    raise ValueError(result["type"])


def load_export() -> list[dict]:
    return json.loads(LS_EXPORT.read_text(encoding="utf-8"))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (flood fill of the outside from a padded corner)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(padded, None, (0, 0), 2)
    return (padded != 2)[1:-1, 1:-1]


def png_bytes(seed: int, h: int = 8, w: int = 8) -> bytes:
    """A random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Host:
    """A real HTTP server on one loopback address: ``/a.png`` (its own image), ``/to?url=``
    (a 302 there), ``/trickle`` (one byte every 50 ms). Records the paths it was asked for."""

    def __init__(self, address: str, seed: int) -> None:
        self.body, self.seen = png_bytes(seed), []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.seen.append(self.path)
                if self.path.startswith("/to?url="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?url=") :])
                    self.end_headers()
                elif self.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(host.body)))
                    self.end_headers()
                    self.wfile.write(host.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{address}:{self.server.server_port}"
        serve = lambda: self.server.serve_forever(poll_interval=0.05)  # noqa: E731
        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def half_and_half(proposer, image, vocabulary, cache):
    """Stands in for ``propose``: a proposal with known scores whatever the model would say,
    the left half label 0 at 0.9, the right half label 1 at 0.2."""
    from ovss_label.backend.proposers import Proposal

    h, w = image.shape[:2]
    scores = np.zeros((len(vocabulary.names), h, w), np.float32)
    assignment = np.zeros((h, w), np.int16)
    assignment[:, w // 2 :] = 1
    scores[0][assignment == 0], scores[1][assignment == 1] = 0.9, 0.2
    return Proposal(tuple(vocabulary.names), scores, assignment)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server started next takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float, process: subprocess.Popen) -> None:
    """Until ``url`` answers 200; raises if ``process`` exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")
