"""The server's process-wide state: models, caches, the executor, the event store.

Label Studio's protocol facts this honours (label_studio.md §1.3-1.5):

- exactly one prediction per task, in task order; a task that fails gets an empty ``result``
  and a logged reason, never a failed batch;
- the same ``model_version`` in ``/setup`` and on every prediction (Label Studio skips tasks that
  already have a prediction of the version ``/setup`` reports; a mismatch duplicates them);
- models load once per process, on first use, never at import; predictions run in a bounded
  thread pool; the feature cache is shared by all projects.

The method of a project: the ``ovss_method`` attribute of its BrushLabels/PolygonLabels
control (e.g. ``<BrushLabels name="tag" toName="image" ovss_method="naclip+sam">``), else the
server default. The vocabulary: the config's labels with their ``predicted_values``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any

from ovss_label import __version__
from ovss_label.methods import METHODS
from ovss_label.ontologies import Vocabulary

from ..models.sam import LoadedSam, build_sam
from ..predict import Output
from ..proposers import (
    FeatureCache,
    PostprocessConfig,
    Proposer,
    create_proposer,
    proposal_to_instances,
    propose,
)
from .events import EventStore
from .interactive import has_prompt, interactive_prediction, label_for_text, text_prompt
from .media import MediaFetcher, redact
from .settings import ServerSettings

log = logging.getLogger(__name__)

_SAM_METHODS = tuple(m for m in METHODS if "sam" in m)


@dataclass(frozen=True)
class Project:
    """What a labeling config tells the server: method, vocabulary, result controls."""

    method: str
    vocabulary: Vocabulary
    output: Output


@lru_cache(maxsize=64)
def parse_project(label_config: str, default_method: str) -> Project:
    """The project's method, vocabulary and controls; ValueError names what is missing."""
    from label_studio_sdk.label_interface.interface import LabelInterface

    if not label_config or not label_config.strip():
        raise ValueError("the request has no label_config")
    try:
        interface = LabelInterface(label_config)
        output = Output.from_label_config(label_config, None)
    except ValueError:
        raise
    except Exception as exc:  # the SDK raises its own types for XML and schema errors
        raise ValueError(f"cannot parse the labeling config: {exc}") from exc
    method = default_method
    for control in interface.controls:
        chosen = control.attr.get("ovss_method") if hasattr(control, "attr") else None
        if chosen:
            method = str(chosen)
    if method not in METHODS:
        raise ValueError(f"ovss_method {method!r} is not one of {', '.join(METHODS)}")
    return Project(method, Vocabulary.from_label_config(label_config), output)


class Engine:
    """Models, caches and workers shared by all requests (module docstring)."""

    def __init__(self, settings: ServerSettings, fetcher: MediaFetcher | None = None) -> None:
        self.settings = settings
        self.media = fetcher or MediaFetcher(settings.media)
        self.cache = FeatureCache(settings.cache_mb << 20)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="ovss")
        self._proposers: dict[str, Proposer] = {}
        self._sam: LoadedSam | None = None
        self._lock = threading.Lock()

    @cached_property
    def events(self) -> EventStore:
        """The webhook event store, created on first use (batch jobs never need it)."""
        return EventStore(self.settings.data_dir / "events.sqlite")

    def model_version(self, method: str) -> str:
        """What ``/setup`` reports and every prediction of ``method`` carries."""
        return f"ovss-label-{__version__}-{method}{'-tiny' if self.settings.tiny else ''}"

    def proposer(self, method: str) -> Proposer:
        """The method's proposer, built once per process (thread-safe)."""
        with self._lock:
            if method not in self._proposers:
                options: dict[str, Any] = {"tiny": self.settings.tiny or None}
                options["device"] = self.settings.device
                if method in _SAM_METHODS:
                    options["feature_cache"] = self.cache
                self._proposers[method] = create_proposer(method, **options)
            return self._proposers[method]

    def sam(self) -> LoadedSam:
        """The SAM for interactive prompts, built once per process."""
        with self._lock:
            if self._sam is None:
                s = self.settings
                self._sam = build_sam(s.sam_model, tiny=s.tiny or None, device=s.device)
            return self._sam

    def predict(
        self, tasks: list[dict[str, Any]], label_config: str, context: Any = None
    ) -> list[dict[str, Any]]:
        """One prediction per task, in order (module docstring); with keypoint or rectangle
        regions in ``context``, SAM answers them instead (``interactive.py``)."""
        try:
            project = parse_project(label_config, self.settings.method)
        except ValueError as exc:
            log.warning("labeling config refused for %d task(s): %s", len(tasks), exc)
            return [self._empty(self.settings.method) for _ in tasks]
        if has_prompt(context):
            return [self._interactive(t, project, context) for t in tasks]
        text = text_prompt(context)
        if text:
            try:
                project = self._text_query(project, text)
            except Exception as exc:  # e.g. missing weights: a logged reason, not a 500
                log.warning("text prompt: %s: %s", type(exc).__name__, _safe(exc))
                return [self._empty(project.method) for _ in tasks]
        return list(self.executor.map(lambda t: self.predict_task(t, project), tasks))

    def _text_query(self, project: Project, text: str) -> Project:
        """The project with a one-query vocabulary: ``text``, named by the nearest label."""
        proposer = self.proposer(project.method)
        label = label_for_text(text, project.vocabulary, getattr(proposer, "text", None))
        query = Vocabulary((label,), ((text,),), project.vocabulary.templates)
        return replace(project, vocabulary=query)

    def _interactive(self, task: dict[str, Any], project: Project, context: Any) -> dict[str, Any]:
        task_id = task.get("id")
        try:
            url = (task.get("data") or {}).get(project.output.data_key)
            image = self.media.image(url, task_id if isinstance(task_id, int) else None)
            result, score = interactive_prediction(
                self.sam(), self.cache, image, context, project.output, project.vocabulary.names
            )
        except Exception as exc:  # the user's click must not become a 500
            log.warning(
                "task %s: no interactive mask: %s: %s", task_id, type(exc).__name__, _safe(exc)
            )
            return self._empty(project.method)
        return {
            "result": result,
            "score": round(score, 4),
            "model_version": self.model_version(project.method),
        }

    def predict_task(self, task: dict[str, Any], project: Project) -> dict[str, Any]:
        """One task's prediction; any failure gives an empty one and a logged reason."""
        version = self.model_version(project.method)
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            url = (task.get("data") or {}).get(project.output.data_key)
            image = self.media.image(url, task_id if isinstance(task_id, int) else None)
            proposal = propose(self.proposer(project.method), image, project.vocabulary, self.cache)
            instances = proposal_to_instances(proposal, PostprocessConfig())
        except Exception as exc:  # any failure stays this task's: the batch must go on
            log.warning("task %s: no prediction: %s: %s", task_id, type(exc).__name__, _safe(exc))
            return self._empty(project.method)
        scores = [i.score for i in instances if i.score is not None]
        return {
            "result": project.output.results(instances),
            "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
            "model_version": version,
        }

    def _empty(self, method: str) -> dict[str, Any]:
        return {"result": [], "score": 0.0, "model_version": self.model_version(method)}


def _safe(exc: Exception) -> str:
    """An exception message without URL query strings (they may carry credentials)."""
    return " ".join(redact(w) if "://" in w else w for w in str(exc).split())
