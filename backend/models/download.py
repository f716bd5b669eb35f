"""``models pull`` and ``models verify``: download a table weight, check its sha256.

A download streams to ``<file>.part`` next to the target, checks the sha256 and only then
renames, so an interrupted or corrupt download never leaves a file that resolution would pick
up. A file already under the target name that is not the published one (a user's fine-tuned
weights, say) is never replaced without ``force``.

A weight without a published sha256 (``WeightSpec.sha256 == ""``, Meta's DINOv2 files) is
downloaded unchecked and the sha256 of its bytes is recorded in the sidecar ``<file>.sha256``
(``weights.record_sha256``); from then on that recorded digest stands in for the published one.
A file found there without a sidecar (copied in by hand) has its sha256 recorded on first pull.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..store import weights_dir
from .fingerprints import file_sha256, remember_sha256
from .weights import WeightSpec, expected_sha256, record_sha256, sha256_file

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) while downloading."""


class DownloadError(RuntimeError):
    """A download failed or its sha256 did not match; nothing was written."""


class ForeignFileError(DownloadError):
    """The target holds another file than the published one; nothing was downloaded."""


def pull(
    spec: WeightSpec,
    dest_dir: Path | None = None,
    *,
    client: httpx.Client | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Downloads ``spec.url`` into ``dest_dir`` (default: the weights directory).

    Args:
        spec: The weight to fetch.
        dest_dir: Target directory, created if needed.
        client: The HTTP client (tests pass one with a mock transport).
        progress: Optional progress callback.
        force: Download even if a file is already there, replacing it if it is not the
            published one.

    Returns:
        The downloaded (or already present and verified) file.

    Raises:
        ForeignFileError: The target exists with another sha256 and ``force`` is off.
        DownloadError: HTTP error, or the sha256 of the received bytes is wrong.
    """
    if spec.format == "hf_hub":
        return _pull_snapshot(spec, dest_dir or weights_dir())
    target = (dest_dir or weights_dir()) / spec.file
    if target.is_file() and not force:
        return _present(spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    own_client = client is None
    http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0))
    try:
        digest = _stream_to(http, spec.url, part, progress)
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {spec.name} from {spec.url} failed: {exc}") from exc
    finally:
        if own_client:
            http.close()
    if spec.sha256 and digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"sha256 mismatch for {spec.file}: got {digest}, expected {spec.sha256}; "
            "nothing was written"
        )
    os.replace(part, target)
    if not spec.sha256:  # nothing published to check against: record what was received
        record_sha256(target, digest)
    remember_sha256(target, digest)  # its bytes were just hashed: never read them again
    return target


def _present(spec: WeightSpec, target: Path) -> Path:
    """``target`` if it is the published (or, unpublished, the recorded) file; a file without
    either digest gets its sha256 recorded now (module docstring)."""
    present, expected = file_sha256(target), expected_sha256(spec, target)
    if expected is None:
        record_sha256(target, present)
        return target
    if present == expected:
        return target
    which = "published" if spec.sha256 else "recorded at pull"
    raise ForeignFileError(
        f"{target} is not the {which} {spec.file}: sha256 {present[:12]}... vs {which} "
        f"{expected[:12]}...; it was left as it is (--force to replace it)"
    )


def _pull_snapshot(spec: WeightSpec, dest_dir: Path) -> Path:
    """A hub repository's safetensors, config and tokenizer files into ``dest_dir/<name>``."""
    from huggingface_hub import snapshot_download

    target = dest_dir / spec.file
    patterns = ["*.json", "*.safetensors", "*.txt"]  # never the pickled *.bin weights
    try:
        snapshot_download(spec.hub_id, local_dir=str(target), allow_patterns=patterns)
    except Exception as exc:  # hub and network errors come in many types
        raise DownloadError(f"download of {spec.name} from {spec.hub_id} failed: {exc}") from exc
    return target


def _stream_to(http: httpx.Client, url: str, part: Path, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    with http.stream("GET", url) as response:
        response.raise_for_status()
        total = (
            int(response.headers["content-length"])
            if "content-length" in response.headers
            else None
        )
        done = 0
        with part.open("wb") as f:
            for block in response.iter_bytes(1 << 20):
                f.write(block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
    return digest.hexdigest()


@dataclass(frozen=True)
class Verification:
    """What ``models verify`` found for one weight.

    Attributes:
        spec: The table row.
        path: The file or snapshot folder checked; None when absent.
        sha256: Its sha256 (the table's for a complete hub snapshot); None when absent.
        expected: For a weight without a published digest, the one recorded at pull
            (``weights.expected_sha256``), None if none was; otherwise unused.
    """

    spec: WeightSpec
    path: Path | None
    sha256: str | None
    expected: str | None = None

    @property
    def status(self) -> str:
        """``ok``, ``missing``, ``mismatch``, or ``unverified`` (a file with no published and
        no recorded digest: nothing to compare with)."""
        if self.path is None:
            return "missing"
        if self.spec.sha256 or self.spec.format == "hf_hub":  # the table's digest decides
            return "ok" if self.sha256 == self.spec.sha256 else "mismatch"
        if self.expected is None:
            return "unverified"
        return "ok" if self.sha256 == self.expected else "mismatch"

    @property
    def note(self) -> str:
        """For a weight without a published digest: that, and the file's fingerprint."""
        if self.spec.sha256 or self.spec.format == "hf_hub":
            return ""
        if self.sha256 is None:
            return "no published digest"
        recorded = (
            "recorded at pull" if self.expected == self.sha256
            else f"recorded at pull {self.expected[:12]}..." if self.expected
            else f"none recorded: `ovss-label models pull {self.spec.name}` records it"
        )  # fmt: skip
        return f"no published digest; fingerprint {self.sha256[:12]}... ({recorded})"


def verify(spec: WeightSpec, path: Path | None = None) -> Verification:
    """Checks the sha256 of ``path`` or of ``spec``'s file in the weights directory."""
    candidate = path or weights_dir() / spec.file
    if spec.format == "hf_hub":
        complete = (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors"))
        return Verification(
            spec, candidate if complete else None, spec.sha256 if complete else None
        )
    if not candidate.is_file():
        return Verification(spec, None, None)
    digest = sha256_file(candidate)
    return Verification(spec, candidate, digest, expected_sha256(spec, candidate))
