"""Proposer benchmark: NACLIP cold vs cached latency, CLIP text encoding, encoder GFLOP/s, SAM.

Run ``.venv/bin/python bench/proposers.py [--quick]``: about 7 minutes on 2 cores (2 of them in
SAM's automatic mask generator), or about 2 minutes with ``--quick`` (a smoke test: fewer
templates, smaller subsets and batches, an 8x8 mask-generator grid). Models are the real
architectures (CLIP ViT-B/16 and ViT-L/14 with QuickGELU, SAM ViT-B) with random weights, which
cost the same compute as the released ones. Everything is measured in this one run with torch's
default thread count, and ratios compare rows measured side by side. Disk caches live in a
temporary directory (``OVSS_CACHE_DIR``); nothing is downloaded (``OVSS_OFFLINE=1``).

1. NACLIP on a 480x640 photo: a warm-up ``propose`` on another image (one-time costs: lazy
   imports, Ω, kernel selection), then cold (empty FeatureCache, text embeddings already on
   disk) and cached (same image, another pre-cached vocabulary: scoring only), and the scoring
   steps timed one by one.
2. COCO-Stuff prompts: ``encode_text`` on the full 77-token context against ``TextEncoder``
   (trimmed context, length-sorted batches) on one random subset, then the whole prompt set
   through the disk cache (fill, then lookup).
3. GFLOP/s of the encoders (``FlopCounterMode`` counts, timed without it) against a matmul.
4. SAM ViT-B: encoder latency and GFLOP/s, refinement with 1 vs 20 classes (``sam_rows.py``).
5. PnP-OVSS with BLIP ITM large: per-image latency (``pnp_rows.py``).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pnp_rows import pnp_rows  # bench/*.py: the script's folder is on sys.path
from rich.console import Console
from rich.table import Table
from sam_rows import sam_rows
from skimage import data
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ovss_label.backend.models.clip import LoadedClip, _create_clip, _openai_cfg, text_fingerprint
from ovss_label.backend.models.clip_text import TextEncoder, encode_tokens_trimmed
from ovss_label.backend.models.naclip_vit import naclip_tokens
from ovss_label.backend.models.weights import OPENAI_MEAN, OPENAI_STD
from ovss_label.backend.proposers import FeatureCache, Features, naclip, pamr, propose
from ovss_label.ontologies import Vocabulary, load

Row = tuple[str, ...]


@dataclass(frozen=True)
class Sizes:
    templates: int | None  # templates per vocabulary in part 1 (None: all 80)
    subset: int  # prompts timed by both text methods
    full: int | None  # prompts through the disk cache (None: all 171 x 80)
    vision_batch: int
    text_batch: int
    matmul: int


DEFAULT = Sizes(templates=None, subset=2048, full=None, vision_batch=8, text_batch=256, matmul=4096)
QUICK = Sizes(templates=4, subset=32, full=256, vision_batch=2, text_batch=64, matmul=2048)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    return min(timed(fn)[1] for _ in range(repeat))


def peak_mb() -> str:
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB"


def verdict(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]FAIL[/]"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def build_clip_b16() -> LoadedClip:
    model = _create_clip(_openai_cfg("ViT-B-16"))
    fingerprint = text_fingerprint(model)
    return LoadedClip(model, "clip_vit_b16", False, OPENAI_MEAN, OPENAI_STD, 16, fingerprint)


def photo(seed: int | None = None) -> np.ndarray:
    """480x640 RGB: the astronaut resized, or random pixels (the warm-up image)."""
    if seed is not None:
        return np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    return cv2.resize(data.astronaut(), (640, 480), interpolation=cv2.INTER_AREA)


def naclip_rows(
    clip: LoadedClip, sizes: Sizes, cache_dir: Path, config: naclip.NaclipConfig
) -> tuple[list[Row], list[Row]]:
    text = TextEncoder(clip, cache=cache_dir)
    proposer = naclip.NaclipProposer(clip, config, text, FeatureCache(1 << 30))
    cold_vocab, new_vocab = _trim(load("voc21"), sizes), _trim(load("context60"), sizes)
    plus_one = Vocabulary(
        (*cold_vocab.names, "giraffe"), (*cold_vocab.synonyms, ("giraffe",)), cold_vocab.templates
    )
    warm = Vocabulary.from_labels("cat, dog", templates=["a photo of a {}."])
    for vocab in (cold_vocab, plus_one, new_vocab):  # text on disk beforehand, not in memory
        proposer.text.query_features(proposer._with_background(vocab)[0])
    image, cache = photo(), FeatureCache()
    stages = [
        ("warm-up: other image (excluded)", photo(seed=1), warm, "cat, dog"),
        ("cold: encode + score", image, cold_vocab, "voc21"),
        ("cached image, a label added", image, plus_one, "voc21 + giraffe: 1 new"),
        ("cached image, new vocabulary", image, new_vocab, "context60: all new"),
    ]
    rows, seconds = [], []
    for name, img, vocab, label in stages:
        if vocab is new_vocab:  # forget refined maps: every query is refined again
            proposer.map_cache = FeatureCache(1 << 30)
        feature_cache = cache if img is image else FeatureCache()
        _, s = timed(lambda: propose(proposer, img, vocab, feature_cache))  # noqa: B023
        queries = len(proposer._with_background(vocab)[0].queries()[0])
        rows.append((name, f"{label} ({queries} queries)", _ms(s), peak_mb()))
        seconds.append(s)
    for i, what in ((2, "label added"), (3, "new vocabulary")):
        ratio = seconds[i] / seconds[1]
        rows.append((f"{what} / cold, target <= 10%", verdict(ratio <= 0.10), f"{ratio:.1%}", ""))
    rows.append(("images/s (1 / cold)", "", f"{1 / seconds[1]:.2f}", ""))
    assert cache.hits == 2, "the cached proposes did not hit the feature cache"
    if not config.pamr_steps:
        return rows, []
    features = cache.features(proposer, image)
    return rows, score_profile(proposer, features, new_vocab, seconds[3])


def _trim(vocab: Vocabulary, sizes: Sizes) -> Vocabulary:
    return vocab.with_templates(vocab.templates[: sizes.templates]) if sizes.templates else vocab


def score_profile(
    proposer: naclip.NaclipProposer, features: Features, vocabulary: Vocabulary, total: float
) -> list[Row]:
    """``NaclipProposer.score``'s steps, the same calls in the same order, timed one by one."""
    c, frames = proposer.config, features.meta["frames"]
    steps: list[tuple[str, float]] = []

    def step(name: str, fn: Callable[[], Any]) -> Any:
        out, seconds = timed(fn)
        steps.append((name, seconds))
        return out

    vocab, _ = proposer._with_background(vocabulary)
    text, idx = step(
        "text.query_features (disk cache)", lambda: proposer.text.query_features(vocab)
    )
    slide = step("_slide_logits", lambda: proposer._slide_logits(features, text, frames.network))
    logits = step(f"to_work {frames.network} -> {frames.work}", lambda: frames.to_work(slide))
    affinity = features.tensors["affinity"]
    logits = step(
        f"pamr_propagate ({c.pamr_steps} steps, {len(idx)} maps)",
        lambda: pamr.pamr_propagate(affinity, logits, c.pamr_dilations, c.pamr_steps),
    )
    bg = naclip._background_index(vocab)
    probs, pred = step(
        "_postprocess (softmax, argmax, renormalise)",
        lambda: proposer._postprocess(logits, idx, proposer._threshold(bg), bg),
    )
    step("to_original + clamp + numpy", lambda: frames.to_original(probs).clamp_(0, 1).numpy())
    step("assignment (_nearest)", lambda: naclip._nearest(pred, frames.original).numpy())
    summed = sum(s for _, s in steps)
    rows = [(name, _ms(s), f"{s / summed:.0%}") for name, s in steps]
    rows.append(("sum of steps | measured cached propose", _ms(summed), _ms(total)))
    whole = lambda: pamr._propagate(affinity, logits, c.pamr_dilations, c.pamr_steps)  # noqa: E731
    return [*rows, ("for comparison: PAMR unchunked (pamr._propagate)", _ms(timed(whole)[1]), "")]


def coco_prompts() -> list[str]:
    vocab = load("coco_stuff")
    queries, _ = vocab.queries()
    return [t.format(q) for q in queries for t in vocab.templates]


@torch.no_grad()
def encode_naive(clip: LoadedClip, tokens: torch.Tensor, batch: int = 256) -> torch.Tensor:
    parts = [clip.model.encode_text(tokens[i : i + batch]) for i in range(0, len(tokens), batch)]
    return torch.cat(parts)


def text_rows(clip: LoadedClip, sizes: Sizes, cache_dir: Path) -> tuple[list[Row], float]:
    """The text table's rows and the naive seconds per 256 prompts (for the FLOP table)."""
    prompts = coco_prompts()
    pick = np.random.default_rng(0).choice(len(prompts), sizes.subset, replace=False)
    subset = [prompts[i] for i in sorted(pick)]
    full = prompts if sizes.full is None else prompts[: sizes.full]
    encoder = TextEncoder(clip, cache=False)  # both timings include tokenising
    naive, t_naive = timed(lambda: encode_naive(clip, encoder.tokenizer(subset)))
    trimmed, t_trim = timed(lambda: encoder.prompt_embeddings(subset))
    diff, scale, speedup = (naive - trimmed).abs().max(), naive.abs().max(), t_naive / t_trim
    filling, lookup = TextEncoder(clip, cache=cache_dir), TextEncoder(clip, cache=cache_dir)
    _, t_fill = timed(lambda: filling.prompt_embeddings(full))
    _, t_hit = timed(lambda: lookup.prompt_embeddings(full))
    n, t_all = f"{len(subset):,} (random subset)", t_naive * len(prompts) / len(subset)
    m = f"{len(full):,}" + (" (all)" if sizes.full is None else " (first)")

    def rate(name: str, what: str, count: int, seconds: float, note: str = "") -> Row:
        return (name, what, _ms(seconds), f"{count / seconds:,.0f}", note)

    return [
        rate("encode_text, 77 tokens, batch 256", n, len(subset), t_naive, f"all: ~{t_all:.0f} s"),
        rate("TextEncoder, trimmed + length-sorted", n, len(subset), t_trim),
        ("speed-up, target >= 3x", verdict(speedup >= 3), f"{speedup:.1f}x", "", ""),
        ("max |naive - trimmed|", n, f"{diff:.1e}", "", f"max |x| {scale:.2f}"),
        rate("TextEncoder, trimmed, fills disk cache", m, len(full), t_fill),
        rate("TextEncoder, disk-cache lookup", m, len(full), t_hit, f"{t_fill / t_hit:,.0f}x fill"),
    ], t_naive * 256 / len(subset)


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return sdpa_flop_count(q, k, v)  # FlopCounterMode has no formula for the CPU SDPA kernel


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn``, with the MHA fast path off: its fused kernel is not counted either."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return counter.get_total_flops()


def matmul_limit(n: int) -> tuple[float, float]:
    """(seconds, FLOP/s) of the best of 3 fp32 n x n matmuls: the CPU's practical limit."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = best_seconds(lambda: a @ b, 3)
    return seconds, 2 * n**3 / seconds


def flop_rows(clip: LoadedClip, sizes: Sizes, naive_batch_seconds: float) -> list[Row]:
    n = sizes.matmul
    seconds, limit = matmul_limit(n)
    rows = [(f"matmul {n}x{n} @ {n}x{n}, best of 3", f"{2 * n**3 / 1e9:.1f}", _ms(seconds))]
    rows[0] += (f"{limit / 1e9:.0f}", "100%")

    def add(name: str, flops: float, seconds: float) -> None:
        rate = flops / seconds
        row = (name, f"{flops / 1e9:.1f}", _ms(seconds), f"{rate / 1e9:.0f}", f"{rate / limit:.0%}")
        rows.append(row)

    images = torch.randn(sizes.vision_batch, 3, 224, 224)
    vision = lambda: naclip_tokens(clip.model.visual, images)  # noqa: E731
    add(f"NACLIP vision tower, {len(images)}x224x224", count_flops(vision), best_seconds(vision, 2))
    prompts = coco_prompts()
    tokens = TextEncoder(clip, cache=False).tokenizer(prompts[:: len(prompts) // sizes.text_batch])
    tokens = tokens[: sizes.text_batch]
    length = int(tokens.argmax(dim=-1).max()) + 1
    trimmed = lambda: encode_tokens_trimmed(clip.model, tokens)  # noqa: E731
    name = f"text, trimmed, {len(tokens)}x{length} tokens"
    add(name, count_flops(trimmed), best_seconds(trimmed, 2))
    per_prompt = count_flops(lambda: clip.model.encode_text(tokens[:2])) / 2
    add("text, encode_text, 256x77 tokens (part 2)", per_prompt * 256, naive_batch_seconds)
    return rows


def table(title: str, columns: tuple[str, ...], rows: list[Row]) -> Table:
    out = Table(title=title)
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under a minute")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    console = Console()
    if not console.is_terminal:
        console.width = 120  # logs and pipes: do not wrap the tables at 80 columns
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OVSS_CACHE_DIR"], os.environ["OVSS_OFFLINE"] = tmp, "1"
        clip = build_clip_b16()
        console.print(
            f"CLIP ViT-B/16, random weights, fp32, CPU, {torch.get_num_threads()} threads, "
            f"{'quick' if args.quick else 'default'} mode; peak RSS after building it {peak_mb()}"
        )
        columns = ("stage", "vocabulary (queries)", "latency", "process peak RSS")
        rows, profile = naclip_rows(clip, sizes, Path(tmp), naclip.NaclipConfig())
        title = "NACLIP propose (reference defaults, PAMR on), 480x640 photo, text on disk"
        console.print(table(title, columns, rows))
        rows, _ = naclip_rows(clip, sizes, Path(tmp), naclip.NaclipConfig(pamr_steps=0))
        title = "NACLIP propose without PAMR (eval.py --pamr off), same photo"
        console.print(table(title, columns, rows))
        title = "Scoring a new vocabulary, step by step (run again on the same features)"
        console.print(table(title, ("step", "time", "share"), profile))
        text, naive_batch = text_rows(clip, sizes, Path(tmp))
        title = "CLIP text encoding, COCO-Stuff prompts (171 classes x 80 templates)"
        columns = ("method", "prompts", "time", "prompts/s", "note")
        console.print(table(title, columns, text))
        title = "Achieved fp32 GFLOP/s (FlopCounterMode FLOPs, timed without the counter)"
        columns = ("workload", "GFLOP", "time", "GFLOP/s", "of matmul")
        console.print(table(title, columns, flop_rows(clip, sizes, naive_batch)))
        title = "SAM ViT-B and CLIP ViT-L/14 (random weights), 480x640 photo"
        columns = ("workload", "detail", "time", "note")
        points = 8 if args.quick else 32  # SAM automatic-mask grid (library default 32)
        sam = sam_rows(photo(), matmul_limit(sizes.matmul)[1], count_flops, Path(tmp), points)
        console.print(table(title, columns, sam))
        title = "PnP-OVSS (random weights), 480x640 photo"
        console.print(table(title, columns, pnp_rows(photo(), 1 if args.quick else 4)))
    console.print(f"total {time.perf_counter() - start:.0f} s, process peak RSS {peak_mb()}")


if __name__ == "__main__":
    main()
