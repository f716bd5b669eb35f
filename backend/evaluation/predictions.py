"""Label maps to score: from a method, from a folder of PNGs, and saved for a rerun.

Prediction file format (what ``--predictions DIR`` reads and ``--save-predictions DIR``
writes, so any external model can be scored): ``<image id>.png``, single channel (8-bit
grayscale, or a palette image whose indices are read), the image's size, holding class indices
in the ground truth's class order and 255 where there is no prediction. Ids with ``/`` are
sub-folders. A saved folder holds one sub-folder per method with a ``predictions.json``
manifest (method, ``model_version``, dataset, classes): a rerun reuses files whose manifest
matches and refuses a folder made by another model or for other classes (nothing is
overwritten by mistake).

A method's proposal becomes a label map as the product draws it: the method's own per-pixel
decision (NACLIP's argmax with ``prob_thd``), else argmax over classes where the best score
reaches ``threshold``; instances a method drew itself (SAM) keep contested pixels by score.
No ``min_area`` filter: a benchmark scores the raw decision.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ovss_label.converters import write_bytes_atomic

from ..models.pool import ModelPool
from ..proposers import FeatureCache, Proposal, Proposer, method_plan, propose
from ..proposers.postprocess import assignment_of, resolve_overlaps
from .groundtruth import GroundTruth, Sample
from .metrics import IGNORE_INDEX
from .protocols import protocol_options

MANIFEST = "predictions.json"


class Predictor(Protocol):
    """Gives one sample's label map."""

    name: str
    model_version: str

    def needs_image(self, sample: Sample) -> bool:
        """Whether :meth:`predict` reads the image (a saved or external prediction does not)."""
        ...

    def predict(self, sample: Sample, image: NDArray[Any] | None) -> NDArray[np.uint8]:
        """(H, W) uint8 class indices, 255 = no prediction."""
        ...


def proposal_assignment(proposal: Proposal, threshold: float = 0.5) -> NDArray[np.int16]:
    """(H, W) int16 vocabulary index per pixel, -1 for none (module docstring)."""
    if proposal.instances is None:
        return assignment_of(proposal, threshold).astype(np.int16, copy=False)
    index = {name: k for k, name in enumerate(proposal.labels)}
    out = np.full(proposal.scores.shape[1:], -1, np.int16)
    for inst in resolve_overlaps(proposal.instances, 1):  # disjoint masks after this
        out[inst.mask] = index[inst.label]
    return out


class MethodPredictor:
    """A proposer asked for the ground truth's vocabulary."""

    def __init__(
        self,
        name: str,
        proposer: Proposer,
        truth: GroundTruth,
        cache: FeatureCache | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.name, self.proposer, self.truth = name, proposer, truth
        self.cache, self.threshold = cache, threshold
        self.model_version = proposer.model_version
        self.last_confidence: NDArray[Any] | None = None
        """(H, W) the last predicted image's per-pixel confidence (``run.py`` counts it into
        the method's reliability histogram, ``calibration.py``); None after a failure."""

    def needs_image(self, sample: Sample) -> bool:
        return True

    def predict(self, sample: Sample, image: NDArray[Any] | None) -> NDArray[np.uint8]:
        assert image is not None, "a method needs the image"
        self.last_confidence = None
        proposal = propose(self.proposer, image, self.truth.vocabulary, self.cache)
        labels = self.truth.to_labels(proposal_assignment(proposal, self.threshold))
        self.last_confidence = proposal.top_confidence()
        return labels


def method_predictors(
    methods: Sequence[str],
    truth: GroundTruth,
    *,
    protocol: str = "naclip",
    device: str = "cpu",
    options: dict[str, Any] | None = None,
) -> list[MethodPredictor]:
    """One predictor per method, under ``protocol``'s settings for ``truth``'s dataset, with
    ``options`` (``tiny``, ``sam_model``, ...) on top; all share one model pool (``naclip``
    and ``naclip+sam`` load one CLIP) and one feature cache (an image is encoded once per
    distinct encoder).

    Raises:
        ValueError: Unknown method or option (nothing loaded yet).
    """
    plans = []
    for method in methods:
        settings = {**protocol_options(protocol, truth.protocol, method), **(options or {})}
        if "sam" not in method:
            settings = {k: v for k, v in settings.items() if not k.startswith("sam_")}
        if not method.startswith("fmbseg"):
            settings.pop("head", None)
        plans.append(method_plan(method, **settings))
    # Methods run one after another on each image: the cache needs only the current image.
    pool, cache = ModelPool(device), FeatureCache(256 << 20)
    return [MethodPredictor(p.method, p.build(pool, cache), truth, cache) for p in plans]


class FolderPredictor:
    """``<folder>/<id>.png`` files (module docstring); a missing file is an error for that
    image (the caller scores it as no prediction). A folder with a manifest made for other
    ``classes`` is refused (its indices would mean other classes)."""

    def __init__(
        self, folder: Path, classes: Sequence[str] | None = None, name: str | None = None
    ) -> None:
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder of predictions")
        manifest = read_manifest(folder)
        made_for = manifest.get("classes")
        if classes is not None and made_for is not None and list(made_for) != list(classes):
            raise ValueError(
                f"{folder} holds predictions for other classes ({_short(made_for)}; this "
                f"ground truth: {_short(list(classes))})"
            )
        self.folder = folder
        self.name = name or str(manifest.get("method") or folder.name)
        self.model_version = str(manifest.get("model_version") or f"files:{folder.name}")

    def needs_image(self, sample: Sample) -> bool:
        return False

    def predict(self, sample: Sample, image: NDArray[Any] | None) -> NDArray[np.uint8]:
        return read_label_png(prediction_path(self.folder, sample.id))


class SavingPredictor:
    """Wraps a predictor: reuses ``<folder>/<id>.png`` when present, else predicts and saves
    it (written whole or not at all, so an interrupted run resumes cleanly)."""

    def __init__(self, inner: Predictor, folder: Path, truth: GroundTruth) -> None:
        self.inner, self.folder = inner, folder
        self.name, self.model_version = inner.name, inner.model_version
        claim_folder(folder, inner.name, inner.model_version, truth)

    def needs_image(self, sample: Sample) -> bool:
        return not prediction_path(self.folder, sample.id).is_file()

    def predict(self, sample: Sample, image: NDArray[Any] | None) -> NDArray[np.uint8]:
        path = prediction_path(self.folder, sample.id)
        if path.is_file():
            return read_label_png(path)
        labels = self.inner.predict(sample, image)
        write_label_png(path, labels)
        return labels


def prediction_path(folder: Path, image_id: str) -> Path:
    """``<folder>/<id>.png``; refuses ids that would leave the folder."""
    parts = Path(image_id).parts
    if not parts or Path(image_id).is_absolute() or ".." in parts:
        raise ValueError(f"image id {image_id!r} cannot name a file under {folder}")
    return folder.joinpath(*parts[:-1], parts[-1] + ".png")


def read_label_png(path: Path) -> NDArray[np.uint8]:
    """A single-channel PNG's values (palette indices for a palette image).

    Raises:
        ValueError: No such file, or not a single-channel 8-bit image.
    """
    if not path.is_file():
        raise ValueError(f"no prediction file {path}")
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(
                f"{path}: a prediction must be a single-channel 8-bit PNG (mode L or P), "
                f"got mode {image.mode}"
            )
        return np.array(image, dtype=np.uint8)


def write_label_png(path: Path, labels: NDArray[np.uint8]) -> None:
    """Writes (H, W) uint8 labels as a grayscale PNG, whole or not at all."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, np.uint8), mode="L").save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue(), fsync=False)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from err
    return data if isinstance(data, dict) else {}


def claim_folder(folder: Path, method: str, version: str, truth: GroundTruth) -> None:
    """Writes the manifest, or checks that the folder's files were made by this model for
    these classes (then they are reused).

    Raises:
        ValueError: The folder holds another model's or another class list's predictions.
    """
    mine = {"method": method, "model_version": version, "dataset": truth.name,
            "classes": list(truth.classes), "no_prediction": IGNORE_INDEX}  # fmt: skip
    found = read_manifest(folder)
    if found:
        for key in ("model_version", "classes"):
            if found.get(key) != mine[key]:
                raise ValueError(
                    f"{folder} holds predictions with another {key.replace('_', ' ')} "
                    f"({_short(found.get(key))}, this run: {_short(mine[key])}); use another "
                    "--save-predictions folder or delete that one"
                )
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(mine, indent=1) + "\n", encoding="utf-8")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
