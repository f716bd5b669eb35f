"""``ovss-label tune``: PnP-OVSS's CLIP-reward random search (paper §3.4, Eq. 4-5).

No pixel labels are needed, only the names of the classes in each image (what an annotation
team has). For a candidate (layer, head, threshold, blur σ) and an image with classes k:

- mask_k: the first-round GradCAM of class k at (layer, head), min-max normalised, ``>
  threshold``, resized to CLIP's input (bicubic), blurred (σ = blur x side), min-max, ``>
  threshold`` again;
- the CLIP-preprocessed image times mask_k, and an all-zero image, are embedded by CLIP
  ViT-L/14-336; similarities with the raw class names / 0.01, softmax over the image's classes;
- reward += 1 when P(masked_k -> k) > P(zero -> k).

The search is random over the grid (reference: ``RandomAnnealingOptimizer``, 34 iterations,
seed 1164005944; here plain random sampling without replacement from the same grid, seeded),
follows letitiabanana/PnP-OVSS @e439962 ``Search()``. Deviations: min-max normalisation before
the first threshold (the reference thresholds raw GradCAM, whose scale depends on the layer) and
torch bicubic instead of skimage's order-3 resize. Every evaluation is appended to a JSON state
file, so an interrupted search resumes.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .jobs import JobReport, NoProgress, Progress
from .models.blip import encode_caption, itm_gradcam_layers
from .proposers import pnp
from .store import tuned_path, tuned_state_path

REFERENCE_SEED = 1164005944


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    layer: int
    head: int
    threshold: float
    blur_sigma: float


def search_space(layers: Sequence[int], heads: int) -> list[Candidate]:
    """The grid: layers x heads x threshold {0.05..0.45} x blur σ {0.01..0.11}."""
    thresholds = [round(t, 2) for t in np.arange(0.05, 0.5, 0.1)]
    blurs = [round(b, 2) for b in np.arange(0.01, 0.12, 0.02)]
    return [Candidate(*c) for c in itertools.product(layers, range(heads), thresholds, blurs)]


def reward_masks(cams: torch.Tensor, threshold: float, blur: float, size: int) -> torch.Tensor:
    """(K, size, size) float 0/1 masks from (K, P, P) class GradCAMs (module docstring)."""
    flat = cams.flatten(1)
    low, high = flat.min(dim=1).values[:, None, None], flat.max(dim=1).values[:, None, None]
    first = ((cams - low) / (high - low).clamp(min=1e-12) > threshold).float()
    resized = F.interpolate(first[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    out = []
    for channel in resized.numpy():
        blurred = gaussian_filter(channel.astype(np.float64), sigma=blur * size)
        span = blurred.max() - blurred.min()
        normalised = (blurred - blurred.min()) / span if span > 0 else np.zeros_like(blurred)
        out.append(normalised > threshold)
    return torch.from_numpy(np.stack(out)).float()


def clip_reward(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
) -> int:
    """Eq. 4-5 for one image: how many classes' masked images beat the empty image.

    Args:
        encode_image: (N, 3, S, S) CLIP-normalised -> (N, D) embeddings.
        image: (3, S, S) CLIP-normalised image.
        masks: (K, S, S) 0/1, one per class of the image.
        text: (K, D) unit text features of those classes.
    """
    batch = torch.cat([image[None] * masks[:, None], torch.zeros_like(image)[None]])
    with torch.no_grad():
        embeddings = F.normalize(encode_image(batch).float(), dim=-1)
    probs = torch.softmax(embeddings @ text.T / 0.01, dim=-1)
    k = masks.shape[0]
    return int((probs[torch.arange(k), torch.arange(k)] > probs[k]).sum())


@dataclass(frozen=True)
class Sample:
    """One tuning image: BLIP input, CLIP input and the names of its classes."""

    blip_pixels: torch.Tensor
    clip_pixels: torch.Tensor
    names: tuple[str, ...]


def sample_cams(blip: Any, sample: Sample, layers: list[int]) -> dict[int, torch.Tensor]:
    """Layer -> (heads, K, P, P) first-round class GradCAMs of one image."""
    caption, sizes = pnp.caption_words(blip.tokenizer, sample.names)
    ids, mask = encode_caption(blip.tokenizer, caption)
    tokens = blip.tokenizer.convert_ids_to_tokens(ids[0])[1:]
    maps = itm_gradcam_layers(blip.model, sample.blip_pixels, ids, mask, layers)
    return {
        layer: torch.stack(
            [pnp.class_token_maps(tokens, m[0, h, 1:], sizes=sizes) for h in range(m.shape[1])]
        )
        for layer, m in maps.items()
    }


def load_state(path: Path) -> dict[str, float]:
    """Evaluated candidates (JSON key -> total reward) from an earlier, maybe interrupted run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(path: Path, state: dict[str, float]) -> None:
    """Writes the state atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def key(candidate: Candidate) -> str:
    """The candidate as a stable JSON key."""
    return json.dumps(asdict(candidate), sort_keys=True)


def evaluate(
    candidate: Candidate,
    cams: list[dict[int, torch.Tensor]],
    samples: list[Sample],
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    texts: list[torch.Tensor],
) -> float:
    """Total reward of ``candidate`` over the samples."""
    total = 0
    for sample_cams, sample, text in zip(cams, samples, texts, strict=True):
        class_cams = sample_cams[candidate.layer][candidate.head]
        size = sample.clip_pixels.shape[-1]
        masks = reward_masks(class_cams, candidate.threshold, candidate.blur_sigma, size)
        total += clip_reward(encode_image, sample.clip_pixels, masks, text)
    return float(total)


def random_order(space: list[Candidate], iterations: int, seed: int) -> list[Candidate]:
    """``iterations`` distinct candidates in a seeded random order (the same on every rerun)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(space), size=min(iterations, len(space)), replace=False)
    return [space[int(i)] for i in picks]


def _samples(
    folder: Path, mapping: dict[str, list[str]], max_images: int, blip_size: int, clip_size: int
) -> list[Sample]:
    from ovss_label.images import load_rgb

    from .proposers.pnp_ovss import square_pixels

    samples = []
    for file, names in sorted(mapping.items())[:max_images]:
        path = folder / file
        if not path.is_file():
            continue
        pixels = square_pixels(load_rgb(path), blip_size)
        clip = F.interpolate(pixels, size=(clip_size, clip_size), mode="bicubic")
        samples.append(Sample(pixels, clip[0], tuple(names)))
    if not samples:
        raise ValueError(f"none of the {len(mapping)} labelled images is in {folder}")
    return samples


@dataclass(frozen=True)
class SearchModels:
    """The models a search reads, loaded and checked before any image is scored.

    Attributes:
        blip: ``LoadedBlip`` whose cross-attention GradCAMs are searched.
        clip: ``LoadedClip`` (ViT-L/14-336) that computes the reward.
        layers: The layers to search, each inside ``blip`` (all of them when none were given).
    """

    blip: Any
    clip: Any
    layers: list[int]


def load_models(layers: list[int] | None = None, *, tiny: bool = False) -> SearchModels:
    """Loads BLIP and the reward CLIP and checks ``layers`` against the BLIP, so a range past
    its layers is a one-line ValueError naming the allowed range, before any search."""
    from .models.blip import attention_grid, check_layer_head
    from .models.clip import tiny_requested
    from .models.pool import ModelPool, WeightRef

    tiny = tiny or tiny_requested()
    pool = ModelPool()
    blip = pool.load(WeightRef("blip_itm_large_flickr", None, tiny))
    n_layers, _ = attention_grid(blip.model)
    layers = layers or list(range(n_layers))
    check_layer_head(blip.model, layers, [], blip.name)  # every head is searched: none to check
    return SearchModels(blip, pool.load(WeightRef("clip_vit_l14_336", None, tiny)), layers)


def run_search(
    folder: Path,
    mapping: dict[str, list[str]],
    name: str,
    *,
    iterations: int = 34,
    layers: list[int] | None = None,
    seed: int = REFERENCE_SEED,
    max_images: int = 50,
    tiny: bool = False,
    image_size: int = 336,
    progress: Progress | None = None,
    models: SearchModels | None = None,
) -> JobReport:
    """The ``tune`` job (module docstring; ``jobs.py``). Its state is the search state file
    beside the result (``store.tuned_state_path``): candidates scored by an earlier run are
    ``skipped``, the others ``done``. The report's ``outputs["tuned"]`` is the configuration
    written and ``result`` the candidates, best first, as ``(reward, Candidate)``.

    ``models`` (:func:`load_models`) are loaded here when not given, with ``layers`` and
    ``tiny``; a caller that loads them first reports a bad range before showing progress.
    """
    from .models.blip import attention_grid
    from .models.clip_text import TextEncoder

    models = models or load_models(layers, tiny=tiny)
    blip, clip, layers = models.blip, models.clip, models.layers
    _, heads = attention_grid(blip.model)
    clip_size = int(clip.model.visual.image_size[0])
    samples = _samples(folder, mapping, max_images, image_size, clip_size)
    encoder = TextEncoder(clip)
    texts = [F.normalize(encoder.prompt_embeddings(list(s.names)), dim=-1) for s in samples]
    cams = [sample_cams(blip, s, layers) for s in samples]
    out, state_path = tuned_path(name), tuned_state_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = load_state(state_path)
    report, progress = JobReport(f"tune {name}"), progress or NoProgress()
    candidates = random_order(search_space(layers, heads), iterations, seed)
    progress.total(len(candidates))
    for candidate in candidates:
        if key(candidate) in state:
            report.skipped += 1
        else:
            state[key(candidate)] = evaluate(
                candidate, cams, samples, clip.model.encode_image, texts
            )
            save_state(state_path, state)
            report.done += 1
        progress.advance(key(candidate))
    ranked = sorted(
        ((r, Candidate(**json.loads(k))) for k, r in state.items()), key=lambda x: -x[0]
    )
    best_reward, best = ranked[0]
    record = {"name": name, **asdict(best), "reward": best_reward, "images": len(samples)}
    save_state(out, record)
    report.outputs["tuned"], report.result = out, ranked
    report.counts["images"] = len(samples)
    return report
