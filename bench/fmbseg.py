"""FMbSeg stage 2 benchmark: the DINOv2-L encoder's GFLOP/s against a matmul, a training step
on cached features, and ``fmbseg`` scoring on cached features against NACLIP's.

Run ``.venv/bin/python bench/fmbseg.py [--quick]`` (about 2 minutes on 2 cores; ``--quick``
times one repeat of smaller inputs). Models are the real architectures with random weights
(DINOv2 ViT-L/14 through timm, the alignment module at width 1024 → 768, CLIP ViT-B/16 for
NACLIP), which cost what the released weights cost. Everything is measured in this one run with
torch's default thread count, and the ratios compare rows measured side by side.

1. DINOv2-L on a 448x448 input (32x32 patches): FLOPs counted by ``FlopCounterMode``, timed
   without it, as a share of a 2048² fp32 matmul's FLOP/s (target ≥ 50%).
2. One training step (module forward, loss, backward, SGD) on a batch of 5 images' cached
   tokens at short side 448 (5 x 32x43 patches; at most 4096 labelled patches in the loss).
3. Scoring one 480x640 image for 21 classes from cached features: ``fmbseg`` (module, cosine
   with the prototypes, bilinear to the image, softmax) against NACLIP (window logits, PAMR,
   softmax), text embeddings already computed for both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from proposers import build_clip_b16, count_flops, matmul_limit, photo  # bench/ is on sys.path
from rich.console import Console
from rich.table import Table

from ovss_label.backend.models.dinov2 import DINOV2_ARCHS, _create_dinov2
from ovss_label.backend.proposers import naclip
from ovss_label.backend.training.head import Head
from ovss_label.backend.training.loss import contrastive_loss
from ovss_label.backend.training.model import AlignmentConfig, AlignmentModule
from ovss_label.ontologies import load


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def encoder_rows(side: int, repeat: int) -> list[tuple[str, ...]]:
    seconds, limit = matmul_limit(2048)
    model = _create_dinov2(DINOV2_ARCHS["dinov2_vitl14"], seed=0)
    image = torch.randn(1, 3, side, side)
    flops = count_flops(lambda: model.forward_features(image))
    with torch.inference_mode():
        model.forward_features(image)  # warm-up
        took = best(lambda: model.forward_features(image), repeat)
    rate = flops / took
    share = f"{rate / limit:.0%}" + (" ✓" if rate / limit >= 0.5 else " (target 50%)")
    matmul = ("matmul 2048² fp32", f"{2 * 2048**3 / 1e9:.1f}", f"{seconds * 1e3:.0f}",
              f"{limit / 1e9:.0f}", "100%")  # fmt: skip
    encoder = (f"DINOv2-L {side}x{side}", f"{flops / 1e9:.1f}", f"{took * 1e3:.0f}",
               f"{rate / 1e9:.0f}", share)  # fmt: skip
    return [matmul, encoder]


def training_row(grid: tuple[int, int], repeat: int) -> tuple[str, ...]:
    torch.manual_seed(0)
    module = AlignmentModule(AlignmentConfig())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    tokens = torch.randn(5, grid[0] * grid[1], 1024)
    labels = torch.randint(0, 20, (5 * grid[0] * grid[1],))
    prototypes = torch.nn.functional.normalize(torch.randn(20, 768), dim=-1)

    def step() -> None:
        z = module(tokens).flatten(0, 1)
        pick = torch.randperm(len(labels))[:4096]
        loss = contrastive_loss(z[pick], labels[pick], prototypes)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()

    step()  # warm-up (the first optimiser step imports torch._dynamo)
    took = best(step, repeat)
    patches = 5 * grid[0] * grid[1]
    return ("training step, 5 images cached", f"{patches} patches", f"{took * 1e3:.0f} ms",
            f"{5 / took:.1f} images/s")  # fmt: skip


def scoring_rows(repeat: int) -> list[tuple[str, ...]]:
    vocab = load("voc20")
    image = photo(0)  # 480x640
    clip = build_clip_b16()
    from ovss_label.backend.models.clip_text import TextEncoder

    text = TextEncoder(clip)
    config = naclip.NaclipConfig()
    nac = naclip.NaclipProposer(clip, config, text)
    features = nac.encode(image)
    nac.score(features, vocab)  # text embeddings computed, kernels warm
    naclip_s = best(lambda: nac.score(features, vocab), repeat)
    torch.manual_seed(0)
    head = Head(AlignmentModule(AlignmentConfig()).eval(), {"tau": 0.1}, "bench")
    tokens = torch.randn(34, 45, 1024)  # 480x640 at short side 448 -> 476x630 -> 34x45
    prototypes = torch.nn.functional.normalize(torch.randn(21, 768), dim=-1)

    def fmbseg_score() -> None:
        head.probabilities(head.similarities(tokens, prototypes), (480, 640)).argmax(dim=0)

    fmbseg_score()
    fmbseg_s = best(fmbseg_score, repeat)
    return [
        ("NACLIP score (cached features)", f"{naclip_s * 1e3:.0f} ms", "1.00"),
        ("fmbseg score (cached tokens)", f"{fmbseg_s * 1e3:.0f} ms", f"{fmbseg_s / naclip_s:.2f}"),
    ]


def show(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one repeat")
    quick = parser.parse_args().quick
    repeat = 1 if quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    show("DINOv2-L encoder, fp32", ("what", "GFLOP", "ms", "GFLOP/s", "of matmul"),
         encoder_rows(224 if quick else 448, repeat))  # fmt: skip
    grid = (16, 21) if quick else (32, 43)
    show("Training on cached features", ("what", "size", "time", "rate"),
         [training_row(grid, repeat)])  # fmt: skip
    show("Scoring one 480x640 image, 21 classes", ("what", "time", "vs NACLIP"),
         scoring_rows(repeat))  # fmt: skip


if __name__ == "__main__":
    main()
