"""The training loop of the alignment module: one readable function, nanoGPT's ``train.py``
shape (settings, data, model, optimiser, loop with logging and checkpoints, evaluation).

FMbSeg §3.2 [paper]: SGD, cosine annealing, batch of 5 images, 10 epochs; the other values
are named settings with their reasons (:class:`TrainConfig`). Determinism: the module is
initialised from ``seed``; epoch ``e`` visits images in ``randperm(seed + e)`` order; a batch's
patch sample is drawn from ``seed`` and the step; the checkpoint holds the momentum buffers,
the scheduler and torch's random state. So a run killed at any point and rerun from its last
checkpoint ends on exactly the head an uninterrupted run ends on (``tests/test_train.py``).

Under ``torchrun`` (``distributed.py``) every process draws the same global batch and patch
sample, embeds its share of the images and gathers the others' with gradient, so each
computes the whole batch's loss and the update is the single-process one (``_step`` says why),
up to float rounding (``tests/test_train_ddp.py``). Rank 0 alone writes files; every rank
resumes from the same checkpoint, and a run may be resumed with another number of processes.

Outputs in ``RUN_DIR``: ``checkpoint.safetensors`` (every ``checkpoint_every`` steps and every
epoch), ``metrics.jsonl`` (one line per step: epoch, step, loss and its two terms, learning
rate), ``head.safetensors`` (the trained head, ``head.py``), ``report.json`` and
``report.png`` (loss curve; held-out per-class IoU before and after training).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..jobs import JobReport, NoProgress, Progress
from .checkpoint import read_checkpoint, restore, save_checkpoint
from .data import TrainingSet, TrainItem, split_items
from .distributed import World, gather_rows
from .loss import ContrastiveLossConfig, contrastive_loss
from .model import AlignmentConfig, AlignmentModule

Tokens = Callable[[TrainItem], torch.Tensor]
"""A training item's (gh, gw, D) backbone patch tokens (from the feature store)."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run (all JSON-able; a resumed run must have the same ones).

    Attributes:
        epochs: 10 [paper].
        batch_size: Images per step, 5 [paper].
        lr: SGD learning rate, 0.05 [choose: the paper does not give it; a single block on
            unit-normalised outputs with a τ-scaled loss trains stably at this value in our
            tests and on tiny twins].
        momentum: 0.9 [choose: SGD's usual value].
        weight_decay: 1e-4 [choose].
        seed: Model initialisation, data order and patch sampling.
        held_out: Fraction of images kept out of training and scored at the end (sticky by
            image id, ``data.split_items``).
        max_patches: Labelled patches per batch at most, sampled at random [choose: the loss
            is quadratic in them; 4096 = 64 MB of similarities].
        checkpoint_every: Steps between checkpoints (and one per epoch).
        loss: The loss's settings (τ, averaging, weights).
    """

    epochs: int = 10
    batch_size: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    held_out: float = 0.1
    max_patches: int = 4096
    checkpoint_every: int = 50
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_size and checkpoint_every must be at least 1")
        if self.lr <= 0 or not 0.0 <= self.held_out < 1.0:
            raise ValueError("lr must be positive and held_out in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunInputs:
    """What a run depends on besides its settings; all recorded in every checkpoint."""

    dataset: TrainingSet
    tokens: Tokens
    prototypes: torch.Tensor  # (K, E) unit text prototypes, one per dataset class
    fingerprints: dict[str, str]  # backbone, text model, prototypes: names -> fingerprints
    module: AlignmentConfig


def train(
    inputs: RunInputs,
    config: TrainConfig,
    run_dir: Path,
    *,
    progress: Progress | None = None,
    after_step: Callable[[int], None] | None = None,
    world: World | None = None,
) -> JobReport:
    """Trains (or resumes) the head in ``run_dir``; ``report.result`` is the report dict
    (None on ranks other than 0).

    ``world``: the torchrun processes, each calling this with the same arguments, and the
    device to train on; None: one process on the CPU.

    Raises:
        ValueError: ``run_dir`` holds a run with other settings or data (never overwritten).
    """
    world = world or World()
    run_dir.mkdir(parents=True, exist_ok=True)
    train_items, held_items = split_items(inputs.dataset.items, config.held_out)
    torch.manual_seed(config.seed)
    module = AlignmentModule(inputs.module).to(world.device)  # the CPU: the same object
    optimizer = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)  # fmt: skip
    batches = math.ceil(len(train_items) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * batches)
    identity = _identity(inputs, config)
    step, first_epoch, start = _resume(run_dir, identity, module, optimizer, scheduler)
    world.check_same([step, identity["dataset"]], "the step and data to resume from")
    model = world.wrap(module)  # DDP, after the resume: it starts from the checkpoint's weights
    report = JobReport(f"train {run_dir.name}", skipped=step)
    progress = progress or NoProgress()
    progress.total(config.epochs * batches)
    for _ in range(step):
        progress.advance()
    log = _Metrics(run_dir / "metrics.jsonl", keep_until=step, enabled=world.is_main)
    module.train()
    for epoch in range(first_epoch, config.epochs):
        order = _epoch_order(len(train_items), config.seed, epoch)
        for index in range(start, batches):
            chosen = [
                train_items[i] for i in order[index * config.batch_size :][: config.batch_size]
            ]
            parts = _step(model, optimizer, chosen, inputs, config, step, world)
            scheduler.step()
            step += 1
            report.done += 1
            log.write(epoch=epoch, step=step, lr=scheduler.get_last_lr()[0], **parts)
            progress.advance(f"epoch {epoch + 1} loss {parts['loss']:.4f}")
            position = {"step": step, "epoch": epoch, "batch": index + 1}
            due = step % config.checkpoint_every == 0 or index + 1 == batches
            if due and world.is_main:
                save_checkpoint(run_dir, module, optimizer, scheduler, {**identity, **position})
            if after_step is not None:
                after_step(step)
        start = 0
    if world.is_main:
        report.result = _finish(run_dir, module.cpu(), inputs, config, held_items, identity)
    report.outputs.update(head=run_dir / "head.safetensors", report=run_dir / "report.json")
    world.barrier()  # every rank returns once the head is written
    return report


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    items: Sequence[TrainItem],
    inputs: RunInputs,
    config: TrainConfig,
    step: int,
    world: World,
) -> dict[str, float]:
    """One SGD step on a batch of images (every rank: the same batch); the loss's terms as
    floats."""
    z, y = _embed(model, items, inputs, world)  # (M, E), (M,)
    if len(y) > config.max_patches:  # a seeded sample: the same on a resumed run, every rank
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        pick = torch.randperm(len(y), generator=generator)[: config.max_patches]
        z, y = z[pick], y[pick]
    optimizer.zero_grad(set_to_none=True)
    if len(y) < 2:
        return {"loss": 0.0, "loss_pt": 0.0, "loss_pp": 0.0, "patches": float(len(y))}
    loss = contrastive_loss(z, y, inputs.prototypes.to(z), config.loss)
    # Under DDP every rank computes this same L on the whole batch's patches. The gather's
    # backward sums the ranks' gradients for each share (distributed.gather_rows), so rank r's
    # gradient is W · ∂L/∂z_r · ∂z_r/∂θ (z_r: the rows of its images); DDP then averages the
    # W ranks': (1/W) Σ_r W · ∂L/∂z_r · ∂z_r/∂θ = ∂L/∂θ, one process's gradient, since the
    # shares partition the batch. (Averaging per-rank losses would be another loss, each
    # patch contrasted with its own rank's patches only; a gather without gradient, ∂L/∂θ / W.)
    loss.total.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return {"loss": float(loss.total.detach()), "loss_pt": float(loss.patch_text.detach()),
            "loss_pp": float(loss.patch_patch.detach()), "patches": float(len(y))}  # fmt: skip


def _embed(
    model: torch.nn.Module, items: Sequence[TrainItem], inputs: RunInputs, world: World
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's labelled patches, image after image in batch order: unit embeddings (M, E)
    float and labels (M,) int64 (unlabelled and padded patches left out)."""
    if not world.ddp:
        tokens, labels, padding = _batch(items, inputs, world.device)
        z = model(tokens, padding)  # (B, N, E)
        keep = (labels != 255) & ~padding
        return z[keep], labels[keep].long()
    # Each rank embeds a contiguous share of the images (attention never crosses images, so an
    # image's patches do not depend on its batch-mates) and the shares are gathered in rank
    # order, which is batch order: every rank holds the (M, E) one process would.
    per_image = [torch.from_numpy(inputs.dataset.labels(item)).flatten() for item in items]
    counts = [int((y != 255).sum()) for y in per_image]
    shares = world.shares(len(items))
    start, stop = shares[world.rank]
    # A rank with no image (a batch smaller than the world) embeds a stand-in and keeps none
    # of it: DDP needs a forward and backward reaching every parameter on every rank.
    tokens, local, padding = _batch(items[start:stop] or items[:1], inputs, world.device)
    z = model(tokens, padding)  # (b, N, E), b: this rank's images
    keep = (local != 255) & ~padding & (stop > start)
    rows = gather_rows(z[keep], [sum(counts[a:b]) for a, b in shares])
    return rows, torch.cat([y[y != 255] for y in per_image]).long().to(world.device)


def _batch(
    items: Sequence[TrainItem], inputs: RunInputs, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (B, N, D) padded, labels (B, N) uint8 (255 = ignored), padding (B, N) bool, on
    ``device``."""
    flat = [inputs.tokens(item).flatten(0, 1).float() for item in items]
    labels = [torch.from_numpy(inputs.dataset.labels(item)).flatten() for item in items]
    n = max(t.shape[0] for t in flat)
    tokens = torch.zeros(len(items), n, flat[0].shape[1])
    targets = torch.full((len(items), n), 255, dtype=torch.uint8)
    padding = torch.ones(len(items), n, dtype=torch.bool)
    for b, (t, y) in enumerate(zip(flat, labels, strict=True)):
        if t.shape[0] != y.shape[0]:
            raise ValueError(f"{items[b].id}: {t.shape[0]} patch tokens, {y.shape[0]} labels")
        tokens[b, : len(t)], targets[b, : len(y)], padding[b, : len(t)] = t, y, False
    return tokens.to(device), targets.to(device), padding.to(device)


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _identity(inputs: RunInputs, config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this command."""
    return {
        "dataset": inputs.dataset.digest,
        "classes": list(inputs.dataset.classes),
        "settings": config.as_dict(),
        "module": asdict(inputs.module),
        "fingerprints": inputs.fingerprints,
    }


def _resume(
    run_dir: Path,
    identity: dict[str, Any],
    module: AlignmentModule,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, int, int]:
    """(step, epoch, batch in epoch) to continue from; (0, 0, 0) for a new run."""
    found = read_checkpoint(run_dir)
    if found is None:
        return 0, 0, 0
    state, tensors = found
    for key, value in identity.items():
        if state.get(key) != value:
            raise ValueError(
                f"{run_dir} holds a run with other {key} (checkpoint at step "
                f"{state.get('step')}); use another -o RUN_DIR, or delete that one to start over"
            )
    restore(state, tensors, module, optimizer, scheduler)
    batches_per_epoch = scheduler.T_max // identity["settings"]["epochs"]
    epoch, batch = state["epoch"], state["batch"]
    if batch >= batches_per_epoch:
        epoch, batch = epoch + 1, 0
    return int(state["step"]), int(epoch), int(batch)


class _Metrics:
    """``metrics.jsonl``, one line per step; a resumed run first drops the lines its killed
    predecessor wrote after the checkpoint it resumes from. Disabled: writes nothing (the
    ranks other than 0)."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        kept = [line for line in lines if _step_of(line) <= keep_until]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, **values: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(values) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: dropped


def _finish(
    run_dir: Path,
    module: AlignmentModule,
    inputs: RunInputs,
    config: TrainConfig,
    held_items: list[TrainItem],
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Saves the head, scores it and the untrained one on the held-out images, writes the
    report (``report.py``)."""
    from .head import save_head
    from .report import write_training_report

    meta = {"tau": config.loss.tau, "dataset": identity["dataset"], "classes": identity["classes"],
            "fingerprints": inputs.fingerprints, "settings": identity["settings"]}  # fmt: skip
    digest = save_head(run_dir / "head.safetensors", module, meta)
    torch.manual_seed(config.seed)
    untrained = AlignmentModule(inputs.module)  # the step-0 module, rebuilt from the seed
    return write_training_report(run_dir, inputs, held_items, untrained, module, config, digest)
