"""Which labels an image shows, from CLIP's image embedding (an image-level class filter).

Used where a method's reference asks an outside oracle (PnP-OVSS asks GPT-4o): the image,
resized to CLIP's input (short side, bicubic, centre crop, as CLIP's own preprocessing), is
embedded once; each label scores the max over its synonyms of cos(image, "a photo of a {}.");
a softmax at CLIP's trained scale (100) gives probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from ovss_label.ontologies import Vocabulary

from ..models.clip import LoadedClip
from ..models.clip_text import TextEncoder

TEMPLATE = ("a photo of a {}.",)


class ClipPresence:
    """CLIP image-level label filter; thread-safe."""

    def __init__(self, clip: LoadedClip, text: TextEncoder) -> None:
        self.clip, self.text = clip, text

    @torch.no_grad()
    def embed(self, image: NDArray[Any]) -> torch.Tensor:
        """(D,) unit image embedding of (H, W, 3) uint8 RGB."""
        size = int(self.clip.model.visual.image_size[0])
        pil = Image.fromarray(image)
        scale = size / min(pil.size)
        width, height = max(size, round(pil.width * scale)), max(size, round(pil.height * scale))
        pil = pil.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (pil.width - size) // 2, (pil.height - size) // 2
        crop = np.array(pil.crop((left, top, left + size, top + size)))
        x = torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255
        mean = torch.tensor(self.clip.mean).view(3, 1, 1)
        std = torch.tensor(self.clip.std).view(3, 1, 1)
        embedding = self.clip.model.encode_image(((x - mean) / std).to(self.clip.device))
        return F.normalize(embedding[0].float(), dim=-1).cpu()

    def probabilities(self, embedding: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """(K,) softmax over labels of 100 x (max over synonyms of the cosine)."""
        text, idx = self.text.query_features(vocabulary.with_templates(TEMPLATE))
        cos = text @ embedding
        per_class = torch.stack([cos[torch.tensor(idx) == k].max() for k in range(len(vocabulary))])
        return torch.softmax(100 * per_class, dim=0)

    def present(
        self,
        embedding: torch.Tensor,
        vocabulary: Vocabulary,
        top_k: int = 0,
        threshold: float = 0.0,
    ) -> NDArray[Any]:
        """(K,) bool: the ``top_k`` most probable labels (0: all) with probability >= ``threshold``;
        never empty (the most probable label is always kept)."""
        probs = self.probabilities(embedding, vocabulary)
        keep = probs >= threshold
        if top_k > 0:
            best = torch.zeros_like(keep)
            best[torch.topk(probs, min(top_k, len(probs))).indices] = True
            keep &= best
        keep[int(probs.argmax())] = True
        result: NDArray[Any] = keep.numpy()
        return result
