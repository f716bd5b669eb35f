"""One shape for long-running jobs: inputs, resumable state on disk, progress, one report.

The jobs (``predict`` over files, ``predict --project``, ``tune``, ``eval``; next ``train``)
are each a function ``run(inputs..., progress=...) -> JobReport``:

- **inputs** are plain arguments (paths, a project id, a proposer or a method plan): a job
  reads nothing from the environment that its caller did not decide;
- **state** that makes a rerun resume lives where the job's results live: Label Studio's own
  predictions for ``predict --project`` (a task carrying the model's version is done), the
  search state file beside a tuned configuration (``store.tuned_state_path``); ``predict``
  over files writes its outputs at the end and is rerun whole;
- **progress** goes to a :class:`Progress` (the CLI draws it with rich; tests and servers pass
  nothing), item by item, so a job never prints;
- the **report** is one :class:`JobReport`: what was done, skipped (done before: a resumed
  run), left for a retry, failed for good and why, and what was written. The CLI prints every
  job's report the same way (``commands/jobs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Progress(Protocol):
    """Where a job reports how far it is."""

    def total(self, count: int | None) -> None:
        """The number of items (None: unknown yet)."""

    def advance(self, item: str = "") -> None:
        """One item finished (``item`` names it for the display)."""


class NoProgress:
    """A :class:`Progress` that shows nothing (tests, library use)."""

    def total(self, count: int | None) -> None:
        """Ignored."""

    def advance(self, item: str = "") -> None:
        """Ignored."""


@dataclass
class JobReport:
    """What one run of a job did.

    Attributes:
        job: What ran, for the title (``predict``, ``predict --project 7``, ``tune mine``).
        model_version: The model the job used ("" when none).
        done: Items completed in this run.
        skipped: Items already done before this run (a resumed run skips them).
        retry: Items that failed for now: a rerun tries them again.
        failed: ``(item, reason)`` of items that failed for good (the reason does not repeat
            the item).
        counts: Other named counts (``instances`` written, ``empty`` predictions).
        outputs: Named files written (``tasks``, ``coco``, ``tuned``).
        result: The job's own result for its caller (``tune``: the ranked candidates).
    """

    job: str
    model_version: str = ""
    done: int = 0
    skipped: int = 0
    retry: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    result: Any = None

    def count(self, name: str, by: int = 1) -> None:
        """Adds ``by`` to the named count."""
        self.counts[name] = self.counts.get(name, 0) + by
