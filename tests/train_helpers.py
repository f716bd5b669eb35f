"""A synthetic, separable training problem for the alignment module (tests only): images of
three colours whose 14-px patches a fixed random "backbone" turns into tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ovss_label.backend.evaluation.groundtruth import GroundTruth, Sample
from ovss_label.ontologies import Vocabulary

CLASSES = ("red thing", "green thing", "blue thing")
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
PATCH, DIM = 14, 16


def synthetic_truth(count: int = 12, seed: int = 0) -> GroundTruth:
    """``count`` 56x84 images: a 28x42 rectangle of one colour on another, on the 14-px patch
    grid, plus noise."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        a, b = rng.choice(3, 2, replace=False)
        labels = np.full((56, 84), a, np.uint8)
        y, x = 14 * rng.integers(0, 3), 14 * rng.integers(0, 4)  # on the patch grid
        labels[y : y + 28, x : x + 42] = b
        labels[0, :] = 255  # an unlabelled row
        image = COLOURS[np.where(labels == 255, a, labels)]
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        samples.append(Sample(f"img{i:02d}", lambda im=image: im, lambda lb=labels: lb))
    vocabulary = Vocabulary.from_labels(list(CLASSES))
    return GroundTruth("synthetic", CLASSES, vocabulary, samples)


class FakeFeatures:
    """The feature-builder interface ``build_training_set`` uses, on a fixed random linear
    "backbone" of each patch's mean colour (separable by construction)."""

    backbone, short_side = "fake-backbone", 56

    def __init__(self) -> None:
        self.projection = torch.randn(3, DIM, generator=torch.Generator().manual_seed(7))
        self.stored: dict[str, torch.Tensor] = {}
        self.computed = 0

    def tokens_of(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
        cells = image[: h * PATCH, : w * PATCH].reshape(h, PATCH, w, PATCH, 3).mean(axis=(1, 3))
        return torch.from_numpy(cells / 255.0).float() @ self.projection

    def ensure(self, image: np.ndarray) -> tuple[str, tuple[int, int]]:
        key = hashlib.sha1(image.tobytes()).hexdigest()
        if key not in self.stored:
            self.stored[key] = self.tokens_of(image)
            self.computed += 1
        tokens = self.stored[key]
        return key, (int(tokens.shape[0]), int(tokens.shape[1]))

    def has(self, key: str) -> bool:
        return key in self.stored

    def load(self, key: str) -> torch.Tensor:
        return self.stored[key]


def prototypes(dim: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.nn.functional.normalize(
        torch.randn(len(CLASSES), dim, generator=generator), dim=-1
    )


def run_inputs(dataset, features: FakeFeatures):
    from ovss_label.backend.training.model import AlignmentConfig
    from ovss_label.backend.training.train import RunInputs

    return RunInputs(
        dataset=dataset,
        tokens=lambda item: features.load(item.feature_key),
        prototypes=prototypes(),
        fingerprints={"backbone": "fake", "text": "fake"},
        module=AlignmentConfig(in_dim=DIM, out_dim=8, heads=2),
    )


def build(tmp: Path, count: int = 12):
    from ovss_label.backend.training.data import build_training_set

    features = FakeFeatures()
    dataset, _ = build_training_set(synthetic_truth(count), tmp / "set", features)
    return dataset, features
