"""Training triggers: when a project's annotation events call for a training job.

``/webhook`` only records events (``server/events.py``); whoever reads them feeds each one to
:func:`on_event`, asks :func:`due` now and then (e.g. every minute), and after queueing a job
calls :func:`after_queued`. Everything here is pure: the clock is the ``now`` argument (Unix
seconds), and the state is a plain frozen dataclass (``dataclasses.asdict`` gives JSON;
:meth:`TriggerState.from_dict` reads it back), so the server can keep one per project in SQLite.

A job is due when (first match wins, its reason is returned):

1. ``START_TRAINING`` arrived: at once;
2. at least ``min_new_annotations`` distinct annotations were created or updated since the last
   queued job, and no annotation event came for ``debounce_seconds``, so a burst of edits gives
   one job, after it; or, if edits keep coming, ``max_wait_seconds`` after the first of them;
3. ``schedule`` ("nightly at HH:MM"): the scheduled time passed after the first new
   annotation, i.e. once a night, and only when there are new annotations.

**Counting**: ``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED`` and ``ANNOTATIONS_CREATED`` add
their annotation id (the reader calls :func:`on_event` once per id of a bulk event); an id
counts once however often it is edited. ``ANNOTATIONS_DELETED`` adds nothing and takes a
deleted id out again (it is no longer a new annotation). Other actions are ignored.

**Reset point**: the counters restart when a job is *queued*, not when a version is promoted:
a rejected job's data would be rejected again, so the next job waits for new annotations. The
job snapshots its data when it starts, so annotations arriving between queueing and the
snapshot are in that job and counted again for the next one: at worst one job too many, never
a missed one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

COUNTED = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
"""Actions whose annotation ids count as new annotations."""

DELETED = "ANNOTATIONS_DELETED"
START = "START_TRAINING"

_SCHEDULE = re.compile(r"\s*nightly\s+at\s+(\d{1,2}):(\d{2})\s*", re.IGNORECASE)


def parse_schedule(text: str | None) -> time | None:
    """The time of day of ``"nightly at HH:MM"`` (24-hour clock); None for None.

    Raises:
        ValueError: Any other text, or an hour or minute out of range.
    """
    if text is None:
        return None
    match = _SCHEDULE.fullmatch(text)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ValueError(f"schedule {text!r}: expected 'nightly at HH:MM', e.g. 'nightly at 02:00'")
    return time(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class TriggerPolicy:
    """When a project's events make a job due (per project option; module docstring)."""

    min_new_annotations: int | None = 10
    """Distinct new annotations that make a job due; None turns the count trigger off
    (``START_TRAINING`` and the schedule only). Ten corrected tasks change the training set
    enough to be worth a training run of minutes, and with one task in five held out they
    also add held-out tasks the gate can score; fewer would retrain on nearly the same data."""

    debounce_seconds: float = 120.0
    """Quiet time after the last annotation event before a count-triggered job is due. An
    annotator's session sends an event per submit or edit, seconds apart; two minutes without
    one means the burst is over, so the burst gives one job holding all of it instead of a
    job at the N-th edit that is stale by the next one."""

    max_wait_seconds: float | None = 1800.0
    """Longest a count-triggered job waits for quiet, from the first new annotation: an
    annotator working steadily never pauses for ``debounce_seconds``, and should still get a
    fresher head within half an hour. None: wait for quiet however long it takes."""

    schedule: str | None = None
    """``"nightly at HH:MM"``: also queue a job at that time of day when there are new
    annotations (however few), e.g. when the GPU is free at night. None: no schedule."""

    timezone: str = "UTC"
    """IANA zone of the schedule's HH:MM (e.g. ``"Europe/Paris"``); UTC by default because a
    server's local zone is often UTC anyway, and the option makes the choice explicit."""

    def __post_init__(self) -> None:
        if self.min_new_annotations is not None and self.min_new_annotations < 1:
            raise ValueError(
                f"min_new_annotations must be >= 1 or None, got {self.min_new_annotations}"
            )
        if self.debounce_seconds < 0:
            raise ValueError(f"debounce_seconds must be >= 0, got {self.debounce_seconds}")
        if self.max_wait_seconds is not None and self.max_wait_seconds < 0:
            raise ValueError(f"max_wait_seconds must be >= 0 or None, got {self.max_wait_seconds}")
        parse_schedule(self.schedule)
        _zone(self.timezone)


@dataclass(frozen=True)
class TriggerState:
    """One project's trigger state since the last queued job (all times Unix seconds)."""

    new_annotations: tuple[int, ...] = ()
    """Distinct annotation ids created or updated since then, sorted."""

    first_new_at: float | None = None
    """When the first of them arrived (None while there is none)."""

    last_event_at: float | None = None
    """When the last annotation event (counted or deleted) arrived."""

    requested_at: float | None = None
    """When ``START_TRAINING`` arrived, while its job is not yet queued."""

    queued_at: float | None = None
    """When the last job was queued (:func:`after_queued`)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TriggerState:
        """Reads back ``dataclasses.asdict(state)`` after a JSON round trip (lists to tuples)."""
        return cls(
            new_annotations=tuple(int(i) for i in data.get("new_annotations", ())),
            first_new_at=data.get("first_new_at"),
            last_event_at=data.get("last_event_at"),
            requested_at=data.get("requested_at"),
            queued_at=data.get("queued_at"),
        )


def on_event(
    state: TriggerState, event_kind: str, annotation_id: int | None, now: float
) -> TriggerState:
    """The state after one event (module docstring: what counts).

    Args:
        state: The project's state before the event.
        event_kind: The webhook's ``action``.
        annotation_id: The annotation it is about (one id; call once per id of a bulk event);
            None for ``START_TRAINING``, or when the payload had none (then the event only
            restarts the quiet time).
        now: When it arrived.
    """
    if event_kind == START:
        requested = now if state.requested_at is None else state.requested_at
        return replace(state, requested_at=requested)
    if event_kind not in COUNTED and event_kind != DELETED:
        return state
    ids = set(state.new_annotations)
    if annotation_id is not None:
        if event_kind == DELETED:
            ids.discard(annotation_id)
        else:
            ids.add(annotation_id)
    first = None if not ids else now if state.first_new_at is None else state.first_new_at
    return replace(state, new_annotations=tuple(sorted(ids)), first_new_at=first, last_event_at=now)


def due(state: TriggerState, now: float, policy: TriggerPolicy) -> str | None:
    """Why a job is due now (module docstring: the three triggers), or None."""
    if state.requested_at is not None:
        return START
    n = len(state.new_annotations)
    if n == 0 or state.first_new_at is None:
        return None
    counted = _count_reason(state, n, now, policy)
    if counted:
        return counted
    slot = _last_slot(now, policy)
    if slot is not None and state.first_new_at <= slot:
        return f"nightly schedule: {n} new annotation{'s' if n != 1 else ''}"
    return None


def after_queued(state: TriggerState, now: float) -> TriggerState:
    """The state once a job is queued: nothing new, no request pending, ``queued_at`` now."""
    return TriggerState(queued_at=now)


def _count_reason(state: TriggerState, n: int, now: float, policy: TriggerPolicy) -> str | None:
    """The count trigger's reason (debounced, or past the longest wait), or None."""
    if policy.min_new_annotations is None or n < policy.min_new_annotations:
        return None
    last = now if state.last_event_at is None else state.last_event_at
    if now - last >= policy.debounce_seconds:
        return f"{n} new annotations, quiet for {now - last:.0f} s"
    first = now if state.first_new_at is None else state.first_new_at
    waited = now - first
    if policy.max_wait_seconds is not None and waited >= policy.max_wait_seconds:
        return f"{n} new annotations over {waited:.0f} s, still arriving"
    return None


def _last_slot(now: float, policy: TriggerPolicy) -> float | None:
    """The latest scheduled instant at or before ``now`` (Unix seconds), or None."""
    at = parse_schedule(policy.schedule)
    if at is None:
        return None
    zone = _zone(policy.timezone)
    local = datetime.fromtimestamp(now, zone)
    slot = datetime.combine(local.date(), at, tzinfo=zone)
    if slot > local:
        slot = datetime.combine(local.date() - timedelta(days=1), at, tzinfo=zone)
    return slot.timestamp()


def _zone(name: str) -> tzinfo:
    """``timezone.utc`` for UTC (no time-zone database needed), else the IANA zone.

    Raises:
        ValueError: An unknown zone name.
    """
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown time zone {name!r}") from err
