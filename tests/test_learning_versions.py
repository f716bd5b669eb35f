"""The versions store (register guards, atomic activate/rollback, pin + prune, orphans,
restart) and its CLI (``models versions``, ``models activate``)."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from ovss_label.backend.learning.jobs import JobStore
from ovss_label.backend.learning.versions import (
    ORPHAN_GRACE_SECONDS,
    UnknownVersionError,
    Version,
    VersionError,
    VersionStore,
    heads_dir,
)
from ovss_label.backend.store import events_path
from ovss_label.cli import cli

PROJECT = 7


class FakeClock:
    """Seconds that move only when a test says so (near real time: folder ages use mtimes)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> VersionStore:
    return VersionStore(events_path(data_dir), data_dir, clock=FakeClock())


def _head_folder(parent: Path, name: str, content: bytes | None = None) -> tuple[Path, str]:
    """A run folder with a head.safetensors of some bytes; returns it and the bytes' sha256."""
    folder = parent / name
    folder.mkdir(parents=True)
    data = content if content is not None else f"head {name}".encode()
    (folder / "head.safetensors").write_bytes(data)
    return folder, hashlib.sha256(data).hexdigest()


def _register(store: VersionStore, name: str, miou: float = 0.5, project: int = PROJECT) -> Version:
    folder, sha = _head_folder(heads_dir(store.data_dir, project), name)
    return store.register(
        project, folder, model_version=f"fmbseg-{sha[:8]}", head_sha256=sha,
        metrics={"miou": miou}, job_id=3, snapshot="manifest-abc",
    )  # fmt: skip


def _age(folder: Path, store: VersionStore) -> None:
    """Makes a folder older than the orphan grace period (by the store's clock)."""
    old = store._clock() - ORPHAN_GRACE_SECONDS - 10
    os.utime(folder, (old, old))


# ---- register --------------------------------------------------------------------------------
def test_register_records_a_complete_folder_as_the_next_inactive_version(
    store: VersionStore, data_dir: Path
) -> None:
    first, second = _register(store, "run-a", 0.41), _register(store, "run-b", 0.52)
    assert (first.name, second.name) == ("v1", "v2")
    assert first.artifact == "heads/7/run-a" and not first.active and not first.pinned
    assert first.metrics == {"miou": 0.41} and first.miou == 0.41 and first.job_id == 3
    assert first.snapshot == "manifest-abc" and first.created_at == store._clock()
    assert store.head_path(first) == data_dir / "heads/7/run-a/head.safetensors"
    assert store.active(PROJECT) is None
    assert first.to_dict()["name"] == "v1" and first.to_dict()["metrics"] == {"miou": 0.41}


def test_register_refuses_a_folder_outside_the_projects_heads_dir(
    store: VersionStore, data_dir: Path, tmp_path: Path
) -> None:
    outside, sha = _head_folder(tmp_path / "runs", "run-a")
    other_project, sha2 = _head_folder(heads_dir(data_dir, 8), "run-b")
    nested, sha3 = _head_folder(heads_dir(data_dir, PROJECT) / "deep", "run-c")
    staging, sha4 = _head_folder(heads_dir(data_dir, PROJECT), ".staging-x")
    for folder, digest in ((outside, sha), (other_project, sha2), (nested, sha3), (staging, sha4)):
        with pytest.raises(VersionError, match="not a version folder of project 7"):
            store.register(PROJECT, folder, model_version="m", head_sha256=digest, metrics={})
    assert store.list() == []


def test_register_refuses_a_missing_head_or_a_sha256_mismatch(store: VersionStore) -> None:
    parent = heads_dir(store.data_dir, PROJECT)
    empty = parent / "run-empty"
    empty.mkdir(parents=True)
    with pytest.raises(VersionError, match=r"holds no head\.safetensors"):
        store.register(PROJECT, empty, model_version="m", head_sha256="0" * 64, metrics={})
    folder, sha = _head_folder(parent, "run-a", b"complete head bytes")
    (folder / "head.safetensors").write_bytes(b"complete he")  # half-written
    with pytest.raises(VersionError, match="incomplete or replaced"):
        store.register(PROJECT, folder, model_version="m", head_sha256=sha, metrics={})
    assert store.list() == []


def test_register_refuses_bad_metrics_and_the_same_folder_twice(store: VersionStore) -> None:
    folder, sha = _head_folder(heads_dir(store.data_dir, PROJECT), "run-a")
    with pytest.raises(VersionError, match="JSON"):
        store.register(PROJECT, folder, model_version="m", head_sha256=sha,
                       metrics={"miou": float("nan")})  # fmt: skip
    store.register(PROJECT, folder, model_version="m", head_sha256=sha, metrics={})
    with pytest.raises(VersionError, match="already a registered version"):
        store.register(PROJECT, folder, model_version="m", head_sha256=sha, metrics={})
    assert [v.name for v in store.list(PROJECT)] == ["v1"]


def test_install_copies_atomically_into_heads_dir(store: VersionStore, tmp_path: Path) -> None:
    run, sha = _head_folder(tmp_path / "runs", "run-a")
    (run / "metrics.json").write_text("{}")
    installed = store.install(PROJECT, run)
    assert installed == heads_dir(store.data_dir, PROJECT) / "run-a"
    assert sorted(p.name for p in installed.iterdir()) == ["head.safetensors", "metrics.json"]
    assert [p.name for p in installed.parent.iterdir()] == ["run-a"]  # no staging left
    with pytest.raises(VersionError, match="already exists"):
        store.install(PROJECT, run)
    (tmp_path / "runs" / "unfinished").mkdir()
    with pytest.raises(VersionError, match="did not finish"):
        store.install(PROJECT, tmp_path / "runs" / "unfinished")
    version = store.register(PROJECT, installed, model_version="m", head_sha256=sha, metrics={})
    assert store.activate(PROJECT, version.name).active


# ---- activate, deactivate, rollback ----------------------------------------------------------
def test_activate_flips_the_active_version_for_every_store_on_the_file(
    store: VersionStore, data_dir: Path
) -> None:
    _register(store, "run-a"), _register(store, "run-b")
    other = VersionStore(events_path(data_dir), data_dir)
    assert store.activate(PROJECT, "v1").active
    assert other.active(PROJECT).name == "v1"  # type: ignore[union-attr]
    promoted = other.activate(PROJECT, "v2")
    assert promoted.active and promoted.activated_at is not None
    assert store.active(PROJECT).name == "v2"  # type: ignore[union-attr]
    assert [(v.name, v.active) for v in store.list(PROJECT)] == [("v2", True), ("v1", False)]
    # rollback to the older version
    assert store.activate(PROJECT, "v1").name == "v1"
    assert [(v.name, v.active) for v in other.list(PROJECT)] == [("v2", False), ("v1", True)]
    # back to zero-shot
    assert store.deactivate(PROJECT).name == "v1"  # type: ignore[union-attr]
    assert other.active(PROJECT) is None and store.deactivate(PROJECT) is None


def test_the_unique_index_refuses_two_active_versions_even_in_raw_sql(
    store: VersionStore,
) -> None:
    _register(store, "run-a"), _register(store, "run-b"), _register(store, "run-c", project=8)
    store.activate(PROJECT, "v1")
    store.activate(8, "v1")  # another project has its own active version
    with closing(sqlite3.connect(store.path)) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE versions SET active = 1 WHERE project = ? AND name = 'v2'", (PROJECT,))
    assert store.active(PROJECT).name == "v1"  # type: ignore[union-attr]
    assert store.active(8).name == "v1"  # type: ignore[union-attr]


def test_activate_refuses_unknown_and_damaged_versions(store: VersionStore) -> None:
    _register(store, "run-a"), _register(store, "run-b")
    with pytest.raises(UnknownVersionError, match=r"no version 'v9' \(known: v2, v1\)"):
        store.activate(PROJECT, "v9")
    with pytest.raises(UnknownVersionError, match=r"known: none"):
        store.activate(99, "v1")
    store.activate(PROJECT, "v1")
    (store.data_dir / "heads/7/run-b/head.safetensors").write_bytes(b"tampered")
    with pytest.raises(VersionError, match="incomplete or replaced"):
        store.activate(PROJECT, "v2")
    assert store.active(PROJECT).name == "v1"  # type: ignore[union-attr]


# ---- pin, prune, orphans ---------------------------------------------------------------------
def test_prune_keeps_the_active_the_pinned_and_the_newest(store: VersionStore) -> None:
    for i in range(1, 7):
        _register(store, f"run-{i}")
    store.activate(PROJECT, "v1")
    assert store.pin(PROJECT, "v2").pinned
    assert (
        store.pin(PROJECT, "v3", pinned=True).pinned and not store.pin(PROJECT, "v3", False).pinned
    )
    removed = store.prune(PROJECT, keep=2)
    assert sorted(v.name for v in removed) == ["v3", "v4"]
    assert [v.name for v in store.list(PROJECT)] == ["v6", "v5", "v2", "v1"]
    folders = sorted(p.name for p in heads_dir(store.data_dir, PROJECT).iterdir())
    assert folders == ["run-1", "run-2", "run-5", "run-6"]
    assert store.prune(PROJECT, keep=2) == []
    # a name is never reused after pruning
    assert _register(store, "run-7").name == "v7"
    with pytest.raises(VersionError, match="keep must be"):
        store.prune(PROJECT, keep=-1)


def test_prune_keep_zero_leaves_only_active_and_pinned(store: VersionStore) -> None:
    for i in range(1, 4):
        _register(store, f"run-{i}")
    store.activate(PROJECT, "v2")
    assert [v.name for v in store.prune(PROJECT, keep=0)] == ["v3", "v1"]
    assert [v.name for v in store.list(PROJECT)] == ["v2"]
    assert _register(store, "run-4").name == "v4"


def test_orphan_folders_are_listed_and_pruned_once_old_enough(store: VersionStore) -> None:
    _register(store, "run-a")
    parent = heads_dir(store.data_dir, PROJECT)
    orphan, _ = _head_folder(parent, "crashed-prune")
    staging, _ = _head_folder(parent, ".staging-crashed")
    fresh, _ = _head_folder(parent, "just-renamed")  # its register may be a moment away
    (parent / "note.txt").write_text("a file, not a version folder")
    _age(orphan, store), _age(staging, store), _age(parent / "run-a", store)
    assert store.orphans(PROJECT) == sorted([orphan, staging])
    assert fresh in store.orphans(PROJECT, min_age=-1e12)
    assert store.prune(PROJECT) == []
    assert sorted(p.name for p in parent.iterdir()) == ["just-renamed", "note.txt", "run-a"]
    assert store.orphans(8) == []


# ---- restart ---------------------------------------------------------------------------------
def test_reopening_keeps_versions_active_pinned_and_numbering(
    store: VersionStore, data_dir: Path
) -> None:
    _register(store, "run-a"), _register(store, "run-b")
    store.activate(PROJECT, "v2"), store.pin(PROJECT, "v1")
    jobs = JobStore(events_path(data_dir))  # the jobs table shares the file
    jobs.enqueue(PROJECT)
    reopened = VersionStore(events_path(data_dir), data_dir, clock=FakeClock())
    assert reopened.list(PROJECT) == store.list(PROJECT)
    assert reopened.active(PROJECT).name == "v2"  # type: ignore[union-attr]
    assert reopened.get(PROJECT, "v1").pinned  # type: ignore[union-attr]
    assert reopened.get(PROJECT, "v9") is None
    assert _register(reopened, "run-c").name == "v3"
    assert len(jobs.list(PROJECT)) == 1


# ---- CLI -------------------------------------------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["models", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def _rows(out: str) -> list[str]:
    """The table rows of ``models versions`` (lines starting with a version name)."""
    return [line for line in out.splitlines() if re.match(r"\s*v\d+ ", line)]


def test_cli_versions_and_activate(store: VersionStore, data_dir: Path) -> None:
    _register(store, "run-a", 0.412), _register(store, "run-b", 0.5)
    store.activate(PROJECT, "v2")
    code, out = _invoke("versions", "--project", "7", "--data-dir", str(data_dir))
    assert code == 0, out
    lines = _rows(out)
    assert [line.split()[0] for line in lines] == ["v2", "v1"]
    assert "active" in lines[0] and "active" not in lines[1] and "0.412" in lines[1]
    assert store.get(PROJECT, "v1").model_version in lines[1]  # type: ignore[union-attr]

    code, out = _invoke("activate", "--project", "7", "v1", "--data-dir", str(data_dir))
    assert code == 0, out
    assert out.strip() == f"project 7: v1 active ({store.get(PROJECT, 'v1').model_version})"  # type: ignore[union-attr]
    code, out = _invoke("versions", "--project", "7", "--data-dir", str(data_dir))
    lines = _rows(out)
    assert "active" in lines[1] and "active" not in lines[0]

    code, out = _invoke("activate", "--project", "7", "--zero-shot", "--data-dir", str(data_dir))
    assert (code, out.strip()) == (0, "project 7: zero-shot (was v1)")
    code, out = _invoke("versions", "--project", "7", "--data-dir", str(data_dir))
    assert "no active version: the project uses its zero-shot method" in out


def test_cli_errors(store: VersionStore, data_dir: Path, tmp_path: Path) -> None:
    _register(store, "run-a"), _register(store, "run-b")
    code, out = _invoke("activate", "--project", "7", "v9", "--data-dir", str(data_dir))
    assert code == 1 and "project 7 has no version 'v9' (known: v2, v1)" in out
    assert len(out.strip().splitlines()) == 1
    code, out = _invoke("activate", "--project", "7", "--data-dir", str(data_dir))
    assert code == 2 and "either VERSION or --zero-shot" in out
    code, out = _invoke("activate", "--project", "7", "v1", "--zero-shot", "--data-dir",
                        str(data_dir))  # fmt: skip
    assert code == 2
    code, out = _invoke("versions", "--project", "8", "--data-dir", str(data_dir))
    assert (code, out.strip()) == (
        0,
        "project 8 has no trained versions: it uses its zero-shot method",
    )
    code, out = _invoke("versions", "--project", "7", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 1 and "no server data" in out
    assert not (tmp_path / "nowhere").exists()
