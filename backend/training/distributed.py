"""Multi-process training under ``torchrun`` (DDP): who this process is, and the few collective
operations the training loop needs. Without torchrun every function here is a no-op on a
world of one, so a single process runs exactly the code it always ran.

``torchrun --nproc-per-node N -m ovss_label train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment (nanoGPT's detection:
``RANK`` set means torchrun). Each process then:

- joins the process group: ``nccl`` when the user's ``--device`` is CUDA (the process uses
  ``cuda:LOCAL_RANK``), ``gloo`` on CPU;
- prepares data after rank 0 (:meth:`World.main_first`): rank 0 downloads weights and writes
  the training set's labels and features, the others then read what it wrote (so nothing is
  computed N times into the same files);
- trains on the same global batch as one process would, embedding only its share of the
  images; the shares are gathered *with gradient* (:func:`gather_rows`) so every rank computes
  the whole batch's loss (``train.py`` says why the update is then the single-process one);
- lets rank 0 alone write checkpoints, metrics, the head and the report.

Waits that depend on the data size (rank 0 encoding a large set while the others wait) go
through a separate gloo group with a long timeout (:data:`PREPARE_TIMEOUT`), so the training
collectives keep torch's short default timeout and a real hang is still reported quickly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import pairwise
from typing import Any, cast

import torch
import torch.distributed as dist

PREPARE_TIMEOUT = timedelta(hours=24)
"""How long ranks wait for rank 0 to prepare the data (or write the report) [choose: a large
project's features and stage-1 labels take hours on one GPU; a crashed rank does not make the
others wait this long, torchrun stops them all]."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1).

    Attributes:
        rank: Global rank, 0..size-1; rank 0 writes every file.
        local_rank: Rank on this machine; picks the GPU (``cuda:local_rank``).
        size: Number of processes.
        device: Where this process trains (``"cpu"``, ``"cuda:1"``, ...).
        wait_group: The long-timeout gloo group of :meth:`barrier` (None for one process).
    """

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: str = "cpu"
    wait_group: Any = field(default=None, repr=False, compare=False)

    @property
    def ddp(self) -> bool:
        """True when several processes train together."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    def shares(self, count: int) -> list[tuple[int, int]]:
        """Each rank's ``[start, stop)`` of ``count`` batch items: contiguous, in rank order,
        sizes differing by at most one (``numpy.array_split``); a rank may get none."""
        base, extra = divmod(count, self.size)
        starts = [r * base + min(r, extra) for r in range(self.size + 1)]
        return list(pairwise(starts))

    def barrier(self) -> None:
        """Waits for every rank, up to :data:`PREPARE_TIMEOUT`."""
        if self.ddp:
            dist.barrier(group=self.wait_group)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Runs the block on rank 0 first, then on the others (which find its files ready)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over ranks), or as is."""
        if not self.ddp:
            return module
        from torch.nn.parallel import DistributedDataParallel

        cuda = torch.device(self.device).type == "cuda"
        return DistributedDataParallel(module, device_ids=[self.local_rank] if cuda else None)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape and dtype everywhere; returned on
        ``tensor``'s device)."""
        if not self.ddp:
            return tensor
        moved = tensor.to(self.device, copy=True).contiguous()  # the caller's stays as it is
        dist.broadcast(moved, src=0)
        return moved.to(tensor.device)

    def check_same(self, value: Any, what: str) -> None:
        """Raises on every rank when the ranks disagree on a JSON-able ``value``.

        Raises:
            RuntimeError: e.g. a rank on another machine that cannot see RUN_DIR.
        """
        if not self.ddp:
            return
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise RuntimeError(
                f"the training processes disagree on {what}: {values} (rank order); every "
                "machine must see the same RUN_DIR and feature store (a shared filesystem)"
            )


def launched_by_torchrun() -> bool:
    """True in a process torchrun started (it sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str) -> World:
    """This process's :class:`World`, joining the process group under torchrun.

    Args:
        device: The user's ``--device``; under torchrun any CUDA device becomes
            ``cuda:LOCAL_RANK`` (one GPU per process, nanoGPT's rule).

    Raises:
        ValueError: torchrun with a device that is neither CUDA nor the CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"torchrun trains on --device cuda or cpu, not {device!r}")
    if kind == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    # Every rank must create the group, in the same order (torch.distributed's rule).
    waits = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    return World(rank, local_rank, size, device, waits)


def teardown() -> None:
    """Leaves the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: str) -> Iterator[World]:
    """:func:`setup`, then :func:`teardown` however the block ends."""
    try:
        yield setup(device)
    finally:
        teardown()


class _AllGather(torch.autograd.Function):
    """(W, n, E) every rank's (n, E) block; backward: this rank's block of the *sum* over
    ranks of their gradients (a reduce-scatter, written as all-reduce + index since gloo has
    no reduce-scatter). That is torch.distributed.nn's ``all_gather`` (open_clip's
    ``gather_features(..., gather_with_grad=True)``), deprecated in torch 2.14."""

    @staticmethod
    def forward(ctx: Any, block: torch.Tensor) -> torch.Tensor:
        blocks = [torch.empty_like(block) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, block.contiguous())
        return torch.stack(blocks)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)  # never modify autograd's
        dist.all_reduce(total)  # SUM: d(L_0 + ... + L_{W-1}) / d(every block)
        return total[dist.get_rank()]


def gather_rows(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every rank's ``rows``, concatenated in rank order, differentiable (open_clip's
    ``gather_with_grad``).

    Args:
        rows: (sizes[rank], E) float, this rank's rows.
        sizes: Every rank's row count (all ranks pass the same list; the counts may differ,
            the collective pads to the largest).

    Returns:
        (sum(sizes), E), rows.dtype. The gradient reaching ``rows`` is the sum over ranks of
        the gradients each rank's use of the result sends back: W times ∂L/∂rows when every
        rank computes the same loss L from it (see ``train._step``).
    """
    if len(sizes) == 1 or max(sizes) == 0:
        return rows
    assert rows.shape[0] == sizes[dist.get_rank()], (rows.shape, sizes)
    pad = rows.new_zeros(max(sizes) - rows.shape[0], *rows.shape[1:])
    blocks = cast(torch.Tensor, _AllGather.apply(torch.cat([rows, pad])))
    return torch.cat([blocks[r, :n] for r, n in enumerate(sizes)])
