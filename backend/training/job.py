"""The ``train`` job (``jobs.py`` shape): a ground truth in, a trained head out.

1. **Data**: any ``evaluation`` ground truth (a Label Studio export or project, a dataset
   split) or stage-1 pseudo-labels (:func:`pseudo_ground_truth`: ``clip_sam`` run once over a
   folder, its label maps saved and reused).
2. **Features**: frozen DINOv2 patch tokens, computed once per image into the feature store
   (``features.py``), and the training set written beside the run (``data.py``).
3. **Text prototypes**: CLIP ViT-L/14 embeddings of "a photo of a {}." per class [paper]; a
   ``background`` class gets NACLIP's background line (the prototype ``fmbseg`` uses for its
   hidden background too).
4. **Training** (``train.py``), resumable; the head records the backbone, input size and text
   model it needs (``head_fingerprints``).

Under torchrun (``distributed.py``) rank 0 loads the models (downloading what is missing) and
writes the features and the training set while the other ranks wait; they then load the same
files and read the training set rank 0 wrote, and every rank uses rank 0's text prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

from ..evaluation.groundtruth import GroundTruth, Sample
from ..evaluation.predictions import MethodPredictor, SavingPredictor
from ..jobs import JobReport, Progress
from ..models.pool import ModelPool, WeightRef
from ..proposers import method_plan
from ..proposers.base import with_background_names
from ..store import cache_dir
from .data import TrainingSet, build_training_set, class_prototypes
from .distributed import World
from .features import FeatureStore
from .model import AlignmentConfig
from .train import RunInputs, TrainConfig, train

TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Backbones:
    """Which frozen models a run uses (table names; explicit files optional)."""

    backbone: str = "dinov2_vitl14"
    text: str = "clip_vit_l14"
    short_side: int = 448
    tiny: bool = False
    checkpoint: str | None = None
    text_checkpoint: str | None = None


def features_root(features_dir: Path | None = None) -> Path:
    """The feature store's folder: ``features_dir``, else ``<cache>/features`` (``store.py``);
    ``train --ray`` fills the same one."""
    return features_dir or cache_dir() / "features"


def run_training(
    truth: GroundTruth,
    run_dir: Path,
    config: TrainConfig,
    *,
    models: Backbones,
    pool: ModelPool,
    features_dir: Path | None = None,
    progress: tuple[Progress, Progress] | None = None,
    world: World | None = None,
) -> tuple[JobReport, JobReport]:
    """Features then training (module docstring): the two jobs' reports (on rank 0; the
    others' feature report is empty).

    ``progress``: one for the feature pass, one for the training steps. ``world``: the
    torchrun processes and the device to train on (``distributed.setup``); None: one process
    training on the CPU.
    """
    prepare, steps = progress if progress is not None else (None, None)
    world = world or World()
    with world.main_first():  # rank 0 downloads and encodes; the others find the files ready
        dinov2 = pool.load(WeightRef(models.backbone, models.checkpoint, models.tiny))
        clip = pool.load(WeightRef(models.text, models.text_checkpoint, models.tiny))
        root = features_root(features_dir)
        store = FeatureStore(root).bind(dinov2, models.short_side)
        if world.is_main:
            dataset, built = build_training_set(truth, run_dir / "data", store, progress=prepare)
        else:  # rank 0's set exactly, even if an image failed there for a passing reason
            dataset, built = TrainingSet.read(run_dir / "data"), JobReport("features")
    prototypes = class_prototypes(pool.text_encoder(clip), prompt_vocabulary(truth))
    prototypes = world.broadcast(prototypes)  # one loss on every rank, whatever its GPU
    inputs = RunInputs(
        dataset=dataset,
        tokens=lambda item: store.load(item.feature_key),
        prototypes=prototypes,
        fingerprints=head_fingerprints(dinov2, clip, models),
        module=module_config(dinov2.embed_dim, int(prototypes.shape[1])),
    )
    return built, train(inputs, config, run_dir, progress=steps, world=world)


def module_config(in_dim: int, out_dim: int) -> AlignmentConfig:
    """The alignment module for a backbone width: 64 channels per head (16 heads on ViT-L)."""
    return AlignmentConfig(in_dim=in_dim, out_dim=out_dim, heads=max(1, in_dim // 64))


def head_fingerprints(dinov2: Any, clip: Any, models: Backbones) -> dict[str, str]:
    """What a head depends on, recorded in it and checked when ``fmbseg`` loads it."""
    return {
        "backbone_weight": models.backbone,
        "backbone_fingerprint": dinov2.backbone_fingerprint,
        "short_side": str(models.short_side),
        "text_weight": models.text,
        "text": clip.text_fingerprint,
        "template": TEMPLATE,
    }


def prompt_vocabulary(truth: GroundTruth) -> Vocabulary:
    """The classes of ``truth`` in its class order, each with its synonyms and the paper's one
    template; a background class (added by ``--unlabeled background`` or the dataset's own)
    known only by its name gets NACLIP's background line, as ``fmbseg`` scores it."""
    synonyms = dict(zip(truth.vocabulary.names, truth.vocabulary.synonyms, strict=True))
    rows = tuple(synonyms.get(name, (name,)) for name in truth.classes)
    return with_background_names(Vocabulary(truth.classes, rows, (TEMPLATE,), truth.name))


def pseudo_ground_truth(
    images: list[Path],
    vocabulary: Vocabulary,
    folder: Path,
    *,
    pool: ModelPool,
    tiny: bool = False,
    sam_model: str = "sam_vit_b",
) -> GroundTruth:
    """FMbSeg's annotation-free data: ``clip_sam`` (stage 1) label maps of ``images`` for
    ``vocabulary``, written once under ``folder`` (the evaluation's prediction format) and
    read back on later runs. Pixels stage 1 leaves unassigned are not trained on."""
    from ..predict import overlay_names

    names = overlay_names(images)  # unique ids from file stems
    stub = GroundTruth("pseudo", vocabulary.names, vocabulary, [])
    plan = method_plan("clip_sam", tiny=tiny, sam_model=sam_model)
    labeller = SavingPredictor(
        MethodPredictor("clip_sam", plan.build(pool, None), stub), folder, stub
    )
    samples = [_pseudo_sample(labeller, path, names[path][: -len(".png")]) for path in images]
    notes = (f"stage-1 pseudo-labels by {labeller.model_version} in {folder}",)
    return replace(stub, samples=samples, notes=notes)


def _pseudo_sample(labeller: SavingPredictor, path: Path, sample_id: str) -> Sample:
    """A sample whose label map is ``labeller``'s saved prediction, made on first use."""
    from ovss_label.images import load_rgb

    image = partial(load_rgb, path)

    def labels() -> NDArray[np.uint8]:
        probe = Sample(sample_id, image, _no_labels)
        return labeller.predict(probe, image() if labeller.needs_image(probe) else None)

    return Sample(sample_id, image, labels)


def _no_labels() -> NDArray[np.uint8]:
    raise AssertionError("pseudo-labels are being made")
