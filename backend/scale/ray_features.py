"""``ovss-label train --ray``: the DINOv2 feature store filled by a Ray Data pipeline.

Training reads each image's frozen DINOv2 patch tokens from the feature store
(``training/features.py``); encoding them is most of a run's compute. Before training, this
pipeline encodes every image the store lacks: CPU tasks decode the images (each sample's own
loader, pickled to the task) → actors, one DINOv2 each, write the missing files. Training then
finds every image encoded and only reads (``build_training_set`` skips an image whose file
exists: the store is keyed by image content, backbone and scale, so the files are the ones a
single-process run writes).

What the workers need:

- the **store path** visible to every worker and to the driver (a shared filesystem: NFS, a
  mounted bucket with POSIX renames); files are written atomically, so two workers writing the
  same image cannot leave a broken file;
- the **same weights** at the same paths as the driver (``OVSS_*`` variables travel with the
  work, ``cluster.py``): an actor whose DINOv2 has another fingerprint refuses to start (its
  files would land in another backbone's folder, and training would encode them again);
- the **images** where the samples' loaders look (an export's ``--image-dir``, a dataset
  root, the ``--pseudo`` folder): the same paths on every node. A live ``--project``'s images
  are fetched by the driver's media client, which does not travel: use an export and
  ``--image-dir`` for ``--ray``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..evaluation.groundtruth import GroundTruth
from ..jobs import JobReport
from ..models.pool import ModelPool, WeightRef
from ..training.features import FeatureStore
from ..training.job import Backbones
from .cluster import (
    Pool,
    RayOptions,
    cluster_pool,
    connected,
    import_ray,
    run_pipeline,
    set_threads,
)
from .stages import Decode

FEATURE_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)
"""What ``build_training_set`` leaves an image out for (it retries it, and reports it)."""


@dataclass(frozen=True)
class SampleErrors:
    """An image that cannot be read or encoded is left to ``build_training_set``."""

    catches: tuple[type[Exception], ...] = FEATURE_ERRORS

    def describe(self, exc: Exception, item: str) -> tuple[str, bool]:
        """``(reason, transient)``: the training pass tries again either way."""
        return str(exc) or type(exc).__name__, True


def load_sample(row: dict[str, Any]) -> NDArray[np.uint8]:
    """The decode task's loader: the sample's own ``load_image``, pickled by the driver."""
    ray = import_ray()
    image: NDArray[np.uint8] = ray.cloudpickle.loads(row["load"])()
    return image


class EncodeActor:
    """One DINOv2 per actor; encodes and stores the tokens an image lacks.

    Args:
        models: The backbone, its weights and short side (as the run's ``Backbones``).
        root: The feature store (module docstring: visible to every worker).
        fingerprint: The driver's backbone fingerprint: another one refuses to start.
        pool: The pool's device and threads.
    """

    def __init__(self, models: Backbones, root: Path, fingerprint: str, pool: Pool) -> None:
        set_threads(pool)
        ref = WeightRef(models.backbone, models.checkpoint, models.tiny)
        self.loaded = ModelPool(pool.device).load(ref)
        if self.loaded.backbone_fingerprint != fingerprint:
            raise RuntimeError(
                f"this Ray worker's {models.backbone} has fingerprint "
                f"{self.loaded.backbone_fingerprint[:16]}, the driver's {fingerprint[:16]}: "
                "every node needs the same weight files at the same paths"
            )
        self.features = FeatureStore(root).bind(self.loaded, models.short_side)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        status, error = "failed", row["error"]
        if not error:
            try:
                key = self.features.store.key(row["image"], self.loaded, self.features.short_side)
                status = "present" if self.features.has(key) else "encoded"
                if status == "encoded":
                    self.features.ensure(row["image"])
            except FEATURE_ERRORS as exc:
                status, error = "failed", str(exc) or type(exc).__name__
        return {"item": row["item"], "status": status, "error": error}


def fill_feature_store(
    truth: GroundTruth,
    root: Path,
    models: Backbones,
    pool: ModelPool,
    *,
    options: RayOptions | None = None,
) -> JobReport:
    """Encodes on Ray every image of ``truth`` that the store at ``root`` lacks (module
    docstring). The driver's DINOv2 is loaded into ``pool`` (training uses it next) for its
    fingerprint. The report counts ``done`` (encoded now), ``skipped`` (already stored) and
    ``failed`` images (training tries those again and reports them).

    Raises:
        RayUnavailableError: Ray is not installed.
        ValueError: A sample's image loader cannot travel to a worker (a live project).
        RayRunError: The pipeline failed; a rerun resumes (stored files stay).
    """
    ray = import_ray()
    dinov2 = pool.load(WeightRef(models.backbone, models.checkpoint, models.tiny))
    report = JobReport(f"features {truth.name} on Ray", dinov2.backbone_fingerprint[:16])
    items = [{"item": s.id, "load": _pickled(ray, s.load_image)} for s in truth.samples]
    if not items:
        return report
    errors = SampleErrors()
    with connected():
        cluster = cluster_pool(ray, options or RayOptions())
        actor_args = (models, root, dinov2.backbone_fingerprint, cluster)
        for row in run_pipeline(items, Decode(load_sample, errors), EncodeActor, actor_args,
                                None, cluster):  # fmt: skip
            if row["status"] == "failed":
                report.failed.append((row["item"], row["error"]))
            elif row["status"] == "present":
                report.skipped += 1
            else:
                report.done += 1
    report.outputs["feature store"] = root
    return report


def _pickled(ray: Any, load: Any) -> bytes:
    """``load`` as bytes for a decode task (cloudpickle: closures and lambdas too)."""
    try:
        data: bytes = ray.cloudpickle.dumps(load)
    except Exception as exc:  # a lock, a socket: a live project's media client
        raise ValueError(
            f"--ray: the images cannot be read on the workers ({type(exc).__name__}: {exc}); "
            "give the images as files (--ls-export with --image-dir, --dataset, --coco, "
            "--pseudo)"
        ) from exc
    return data
