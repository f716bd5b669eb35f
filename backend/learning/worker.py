"""One training job from claim to verdict: snapshot, train in a subprocess, score on the
held-out tasks, promote through the gate or reject.

The steps of :func:`run_job` (docs: issue "continuous learning", README "Train on your labels"):

1. **Snapshot** the project's accepted annotations (``snapshot.py``: immutable, digest-named,
   with the sticky held-out split) and write its two parts as Label Studio export files.
2. **Train** the candidate head in a subprocess (``ovss-label train --ls-export train.json``,
   images read from Label Studio), heartbeating the job; a crash, an out-of-memory kill or a
   cancel ends the subprocess, never the server (``runner.py``). A crash releases the job for
   another attempt (``JobStore.release``), a cancel finishes it as cancelled.
3. **Score** on the held-out tasks, each in a subprocess too (``ovss-label eval``): the
   candidate, the project's active version and its zero-shot method (its labeling config's
   ``ovss_method``, else the server's, without ``+sam``: the candidate is scored without SAM
   too), on the same tasks.
4. **Calibrate**: the candidate's confidence-to-accuracy map, fitted on the held-out pixels,
   goes beside its head (``run/calibration.json``, ``proposers/confidence.py``), so a promoted
   version's prediction scores are calibrated; the zero-shot method's map is saved for the
   project (``calibrations.py``), so its scores are calibrated while no version is active,
   whatever the verdict. **Agreement**: ``eval --agreement`` on the
   project measures how much annotators changed each version's proposals.
5. **Decide** (``gate.py``); a promotion installs the run (copy, fsync, rename), registers and
   activates it in one transaction, then prunes old versions (``versions.py``). The job ends
   ``done`` (promoted) or ``rejected``, with the gate's metrics, one-line reason and its
   report (``report.py``: loss curve, per-class IoU of candidate / active / zero-shot,
   calibration, agreement).

The Label Studio key reaches subprocesses through their environment, never their command line
(which every local user can read).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovss_label.converters import write_json_atomic

from ..evaluation.calibration import Reliability
from ..evaluation.metrics import Scores
from ..proposers.confidence import FILE_NAME as CALIBRATION_FILE
from .calibrations import dense_method, write_zero_shot
from .gate import Decision, GateConfig, HeldOutScores, decide
from .jobs import Job, JobStore
from .report import job_report, reliability_of, write_job_report
from .runner import PARENT_PID, run_in_subprocess
from .snapshot import Snapshot, pull_snapshot, tasks_of
from .versions import VersionStore

log = logging.getLogger(__name__)

TRAINED_METHOD = "fmbseg"
"""The method a trained head is scored and served with (``server/choice.py``)."""


@dataclass(frozen=True)
class WorkerSettings:
    """How jobs run (the server's settings decide them).

    Attributes:
        data_dir: The server's data directory (snapshots, runs, heads, the SQLite file).
        ls_url: Label Studio's URL; ``api_key`` its token (for snapshots and images).
        zero_shot: The method of a project whose labeling config names none (without
            ``+sam``, the gate's baseline for the first version).
        zero_shot_head: The head the server's ``fmbseg`` uses for projects without a trained
            version (``serve --fmbseg-head``); a project whose zero-shot method is ``fmbseg``
            is scored with it, or not at all without one.
        fraction: Held-out share of the tasks (sticky per task).
        train_options: Extra ``ovss-label train`` options (``--epochs``, ``--short-side``...).
        tiny: Tiny random twins (tests).
        gate: The promotion gate's thresholds.
        keep: Versions kept per project besides the active and pinned ones.
        poll_seconds: How often a running subprocess is checked (and the job heartbeats).
    """

    data_dir: Path
    ls_url: str
    api_key: str = field(repr=False)
    zero_shot: str = "naclip"
    zero_shot_head: str | None = None
    fraction: float = 0.2
    train_options: tuple[str, ...] = ()
    tiny: bool = False
    gate: GateConfig = field(default_factory=GateConfig)
    keep: int = 3
    poll_seconds: float = 1.0


def run_job(
    job: Job, owner: str, jobs: JobStore, versions: VersionStore, settings: WorkerSettings,
    client: Any,
) -> Job:  # fmt: skip
    """Runs a claimed job to its end (module docstring); returns its final row."""
    work = settings.data_dir / "runs" / f"job-{job.id}"
    work.mkdir(parents=True, exist_ok=True)
    folder = settings.data_dir / "snapshots" / str(job.project)
    snapshot, _ = pull_snapshot(client, job.project, fraction=settings.fraction,
                                now=time.time(), folder=folder)  # fmt: skip
    if len(snapshot.train) < 1:
        return jobs.finish(job.id, owner, "rejected", reason="no annotated task to train on")
    files = _write_parts(snapshot, work)
    run = work / "run"
    code, reason = _subprocess(job, owner, jobs, settings, _train_command(settings, files, run),
                               work / "train.log")  # fmt: skip
    if code != 0:
        return _stopped(job, owner, jobs, reason)
    zero_shot = zero_shot_method(snapshot.label_config, settings.zero_shot)
    scores = _score_all(job, owner, jobs, versions, settings, files, run, zero_shot)
    if scores is None:
        return _stopped(job, owner, jobs, "scoring failed: see the job's logs")
    reliability = reliability_of(work / "eval-candidate.json", TRAINED_METHOD)
    _write_calibration(run, reliability)  # before _promote: installed with the head
    _save_zero_shot_calibration(job, settings, work, zero_shot)
    if not _measure_agreement(job, owner, jobs, settings, work):
        return _stopped(job, owner, jobs, "cancelled")
    decision = decide(*scores, len(snapshot.held_out), settings.gate, classes=_classes(files))
    if decision.promote:
        _promote(job, versions, settings, run, snapshot, decision)
    state = "done" if decision.promote else "rejected"
    report = _report(job, state, decision.reason, settings, work, reliability, zero_shot)
    result = {"snapshot": snapshot.digest, "held_out": len(snapshot.held_out),
              **decision.metrics, "report": report}  # fmt: skip
    return jobs.finish(job.id, owner, state, result=result, reason=decision.reason)


def zero_shot_method(label_config: str, default: str) -> str:
    """The dense method a project without a trained version runs: its config's
    ``ovss_method``, else ``default``, without ``+sam`` (module docstring)."""
    from ovss_label.converters.ls_project import ProjectConfig

    try:
        method = ProjectConfig.parse(label_config, default).method
    except ValueError:  # train refuses such a config first; the default is then moot
        method = default
    return dense_method(method)


def _write_parts(snapshot: Snapshot, work: Path) -> dict[str, Path]:
    files = {"train": work / "train.json", "held_out": work / "held_out.json",
             "config": work / "label_config.xml"}  # fmt: skip
    files["train"].write_text(json.dumps(tasks_of(snapshot, "train")), encoding="utf-8")
    files["held_out"].write_text(json.dumps(tasks_of(snapshot, "held_out")), encoding="utf-8")
    files["config"].write_text(snapshot.label_config, encoding="utf-8")
    return files


def _cli() -> list[str]:
    return [sys.executable, "-m", "ovss_label"]


def _train_command(settings: WorkerSettings, files: dict[str, Path], run: Path) -> list[str]:
    # The held-out tasks are the snapshot's (scored below), so train keeps none of its own.
    command = [*_cli(), "train", "--ls-export", str(files["train"]), "--label-config",
               str(files["config"]), "-o", str(run), "--held-out", "0",
               *settings.train_options]  # fmt: skip
    return [*command, "--tiny"] if settings.tiny else command


def _eval_command(
    settings: WorkerSettings, files: dict[str, Path], method: str, head: Path | None, out: Path
) -> list[str]:
    command = [*_cli(), "eval", "--ls-export", str(files["held_out"]), "--label-config",
               str(files["config"]), "--method", method, "--json", str(out)]  # fmt: skip
    if head is not None:
        command += ["--head", str(head)]
    return [*command, "--tiny"] if settings.tiny else command


def _subprocess(
    job: Job, owner: str, jobs: JobStore, settings: WorkerSettings, command: list[str],
    log: Path,
) -> tuple[int, str]:  # fmt: skip
    env = {**os.environ, "LABEL_STUDIO_URL": settings.ls_url,
           "LABEL_STUDIO_API_KEY": settings.api_key}  # fmt: skip
    env.pop("OVSS_FMBSEG_HEAD", None)  # each command names its head
    env[PARENT_PID] = str(os.getpid())  # the command dies with the server (runner.py)

    def started(pid: int) -> None:
        jobs.heartbeat(job.id, owner, pid=pid)

    return run_in_subprocess(
        command,
        on_tick=lambda: jobs.heartbeat(job.id, owner),
        poll_seconds=settings.poll_seconds,
        env=env,
        log_path=log,
        on_start=started,
    )


def _score_all(
    job: Job, owner: str, jobs: JobStore, versions: VersionStore, settings: WorkerSettings,
    files: dict[str, Path], run: Path, zero_shot: str,
) -> tuple[HeldOutScores, HeldOutScores | None, HeldOutScores | None] | None:  # fmt: skip
    """(candidate, active, ``zero_shot``) on the held-out tasks; None when one cannot be
    scored."""
    active = versions.active(job.project)
    heads = {"candidate": (TRAINED_METHOD, run),
             "active": (TRAINED_METHOD, versions.head_path(active)) if active else None,
             "zero_shot": _zero_shot_spec(zero_shot, settings)}  # fmt: skip
    found: dict[str, HeldOutScores | None] = {}
    for name, spec in heads.items():
        if spec is None:
            found[name] = None
            continue
        out = run.parent / f"eval-{name}.json"
        command = _eval_command(settings, files, spec[0], spec[1], out)
        code, _ = _subprocess(job, owner, jobs, settings, command, run.parent / f"eval-{name}.log")
        if code != 0:
            return None
        found[name] = held_out_scores(out, spec[0])
    candidate = found["candidate"]
    assert candidate is not None
    return candidate, found["active"], found["zero_shot"]


def _zero_shot_spec(method: str, settings: WorkerSettings) -> tuple[str, Path | None] | None:
    """``(method, head)`` to score a project's zero-shot method with: ``fmbseg`` needs the
    server's head (None: not scored, as the server cannot serve it either)."""
    if method != TRAINED_METHOD:
        return method, None
    return (method, Path(settings.zero_shot_head)) if settings.zero_shot_head else None


def held_out_scores(path: Path, method: str) -> HeldOutScores:
    """A method's scores and labelled pixels from ``eval --json``'s output."""
    data = json.loads(path.read_text(encoding="utf-8"))["methods"][method]
    per_class = list(data["per_class"].values())
    scores = Scores(tuple(c["IoU"] for c in per_class), tuple(c["Acc"] for c in per_class),
                    data["mIoU"], data["mAcc"], data["aAcc"])  # fmt: skip
    return HeldOutScores(scores, tuple(int(c["pixels"]) for c in per_class))


def _write_calibration(run: Path, reliability: Reliability | None) -> None:
    """``run/calibration.json``: the candidate's confidence-to-accuracy map fitted on the
    held-out pixels (``proposers/confidence.py``); none without labelled pixels."""
    if reliability is not None and reliability.pixels.sum() > 0:
        write_json_atomic(run / CALIBRATION_FILE, reliability.fit().to_json(), indent=1)


def _save_zero_shot_calibration(
    job: Job, settings: WorkerSettings, work: Path, method: str
) -> None:
    """The project's zero-shot map from ``eval-zero_shot.json`` (``calibrations.py``); a
    failure is logged: raw scores are a fallback, not a reason to fail a trained job."""
    scored = work / "eval-zero_shot.json"
    if not scored.is_file():  # not scored (``_zero_shot_spec``)
        return
    try:
        version = json.loads(scored.read_text(encoding="utf-8"))["methods"][method]
        write_zero_shot(settings.data_dir, job.project, method, version["model_version"],
                        reliability_of(scored, method), job=job.id)  # fmt: skip
    except (OSError, ValueError, KeyError):
        log.exception("training job %d: no zero-shot calibration saved", job.id)


def _measure_agreement(
    job: Job, owner: str, jobs: JobStore, settings: WorkerSettings, work: Path
) -> bool:
    """``eval --agreement`` on the project (how much annotators changed each version's
    proposals) into ``work/agreement.json``, for the report. A failure only leaves the report
    without it; False when the job was cancelled meanwhile."""
    out = work / "agreement.json"
    command = [*_cli(), "eval", "--agreement", "--project", str(job.project), "--json", str(out)]
    code, _ = _subprocess(job, owner, jobs, settings, command, work / "agreement.log")
    if code != 0:
        out.unlink(missing_ok=True)
    current = jobs.get(job.id)
    return current is None or not current.cancel_requested


def _report(
    job: Job, state: str, reason: str, settings: WorkerSettings, work: Path,
    reliability: Reliability | None, zero_shot: str,
) -> str | None:  # fmt: skip
    """Writes the job's report (``report.py``); its path relative to the data directory, or
    None when it could not be written (logged: a chart must never fail a trained job)."""
    methods = {"candidate": TRAINED_METHOD, "active": TRAINED_METHOD,
               "zero_shot": zero_shot}  # fmt: skip
    try:
        content = job_report(job, state, reason, work, methods, reliability)
        path = write_job_report(work, content, reliability)
    except Exception:  # reported and left out: the job's verdict stands
        log.exception("training job %d: its report could not be written", job.id)
        return None
    return path.relative_to(settings.data_dir).as_posix()


def _classes(files: dict[str, Path]) -> list[str] | None:
    out = files["held_out"].parent / "eval-candidate.json"
    return json.loads(out.read_text(encoding="utf-8"))["classes"] if out.exists() else None


def _promote(
    job: Job, versions: VersionStore, settings: WorkerSettings, run: Path, snapshot: Snapshot,
    decision: Decision,
) -> None:  # fmt: skip
    """Install, register, activate (one transaction), prune (``versions.py``)."""
    from ..models.weights import sha256_file
    from ..proposers import method_plan

    installed = versions.install(job.project, run, folder=f"job-{job.id}")
    head = installed / "head.safetensors"
    version = method_plan(TRAINED_METHOD, head=str(head), tiny=settings.tiny).identity.version
    registered = versions.register(job.project, installed, model_version=version,
                                   head_sha256=sha256_file(head), metrics=decision.metrics,
                                   job_id=job.id, snapshot=snapshot.digest)  # fmt: skip
    versions.activate(job.project, registered.name)
    versions.prune(job.project, settings.keep)


def _stopped(job: Job, owner: str, jobs: JobStore, reason: str) -> Job:
    """A subprocess ended badly: cancelled on request, else another attempt (or failed)."""
    current = jobs.get(job.id)
    if current is not None and current.cancel_requested:
        return jobs.finish(job.id, owner, "cancelled", reason="cancelled")
    return jobs.release(job.id, owner, reason)
