"""Weight fingerprints: which file was loaded, once-per-file warnings, hashing once per machine,
a server that hashes at start, and ``models pull`` that keeps a user's file. (Model identities
built from these fingerprints: ``tests/test_identity.py``.)"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from ovss_label.backend.models import fingerprints as fp
from ovss_label.backend.models import sam as sam_module
from ovss_label.backend.models.download import ForeignFileError, pull
from ovss_label.backend.models.fingerprints import file_sha256
from ovss_label.backend.models.sam import TINY_SAM_CFG, _create_sam, build_sam
from ovss_label.backend.models.weights import WEIGHTS, get_spec, weights_dir
from ovss_label.backend.proposers import create_proposer, method_plan
from ovss_label.backend.server import Engine, ServerSettings
from ovss_label.cli import cli

LOGGER = "ovss_label.backend.models.fingerprints"


@pytest.fixture(autouse=True)
def _fresh_process_cache():
    """Each test starts as a new process would: no sha256 known in memory, nothing warned."""
    fp.forget_process_cache()
    yield
    fp.forget_process_cache()


@pytest.fixture()
def foreign_sam(monkeypatch) -> Path:
    """A tiny SAM saved under the official ViT-B file name; ``sam_vit_b`` builds the tiny
    architecture, so the real resolve-load-fingerprint path runs on it."""
    path = weights_dir() / get_spec("sam_vit_b").file
    torch.save(_create_sam(TINY_SAM_CFG, seed=7).state_dict(), path)
    monkeypatch.setitem(sam_module.SAM_ARCHS, "sam_vit_b", TINY_SAM_CFG)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


def test_a_file_that_is_not_the_published_one_warns_once(foreign_sam, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    first, second = build_sam("sam_vit_b"), build_sam("sam_vit_b")
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    published = get_spec("sam_vit_b").sha256
    for part in ("sam_vit_b", str(foreign_sam), _sha(foreign_sam)[:12], published[:12]):
        assert part in messages[0]
    assert "model version" in messages[0] and "\n" not in messages[0]
    assert first.file_fingerprint == second.file_fingerprint == _sha(foreign_sam)


def test_the_published_file_does_not_warn(foreign_sam, monkeypatch, caplog):
    spec = dataclasses.replace(get_spec("sam_vit_b"), sha256=_sha(foreign_sam))
    monkeypatch.setitem(WEIGHTS, "sam_vit_b", spec)
    caplog.set_level(logging.WARNING, LOGGER)
    loaded = build_sam("sam_vit_b")
    assert not _warnings(caplog) and loaded.file_fingerprint == spec.sha256


def test_twins_and_tiny_checkpoints_are_fingerprinted_without_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    assert build_sam("sam_vit_b", tiny=True).file_fingerprint == "tiny"
    path = tmp_path / "mine.pth"
    torch.save(_create_sam(TINY_SAM_CFG, seed=2).state_dict(), path)
    assert build_sam("sam_vit_b", tiny=True, checkpoint=path).file_fingerprint == _sha(path)
    assert not _warnings(caplog)


def test_sha256_is_computed_once_per_machine_and_file_version(tmp_path, monkeypatch):
    calls = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda p: calls.append(p) or real(p))
    weight = tmp_path / "w.pth"
    weight.write_bytes(b"a" * 1000)
    assert file_sha256(weight) == file_sha256(weight) == _sha(weight)
    fp.forget_process_cache()  # a new process: the disk cache answers
    assert file_sha256(weight) == _sha(weight) and len(calls) == 1
    assert (Path(os.environ["OVSS_CACHE_DIR"]) / "fingerprints.sqlite").is_file()
    weight.write_bytes(b"b" * 1000)  # same size: the mtime tells
    stat = weight.stat()
    os.utime(weight, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(weight) == _sha(weight) and len(calls) == 2
    weight.write_bytes(b"c" * 10)  # another size
    assert file_sha256(weight) == _sha(weight) and len(calls) == 3


def test_processes_share_the_disk_cache_safely(tmp_path):
    weights = [tmp_path / f"w{i}.pth" for i in range(4)]
    for i, weight in enumerate(weights):
        weight.write_bytes(bytes([i]) * 100_000)
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from ovss_label.backend.models.fingerprints import file_sha256\n"
        "print(' '.join(file_sha256(Path(p)) for p in sys.argv[1:]))\n"
    )
    # Four processes hash and record the same files at once, each in its own order.
    runs = [
        subprocess.Popen([sys.executable, "-c", code, *map(str, weights[i:] + weights[:i])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=60) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert all("disabled" not in err for _, err in outputs)
    expected = {w: _sha(w) for w in weights}
    for i, (out, _) in enumerate(outputs):
        assert out.split() == [expected[w] for w in weights[i:] + weights[:i]]
    fp.forget_process_cache()
    assert all(fp.cached_sha256(w) == expected[w] for w in weights)  # all four recorded


def test_an_unwritable_cache_only_costs_rehashing(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("OVSS_CACHE_DIR", str(blocker))
    caplog.set_level(logging.WARNING, LOGGER)
    weight = tmp_path / "w.pth"
    weight.write_bytes(b"x")
    assert file_sha256(weight) == file_sha256(weight) == _sha(weight)
    assert len(_warnings(caplog)) == 1 and "OVSS_CACHE_DIR" in _warnings(caplog)[0]


def test_hub_snapshots_hash_their_safetensors_and_never_warn(monkeypatch, caplog):
    spec = get_spec("blip_itm_large_flickr")
    monkeypatch.setattr("ovss_label.backend.models.weights._hub_snapshot", lambda hub_id: None)
    assert fp.expected_fingerprint(spec) == f"hub:{spec.hub_id}"  # absent: what the hub serves
    folder = weights_dir() / spec.file
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "b.safetensors").write_bytes(b"bb")
    (folder / "a.safetensors").write_bytes(b"aa")
    lines = "".join(f"{f}:{_sha(folder / f)}\n" for f in ("a.safetensors", "b.safetensors"))
    caplog.set_level(logging.WARNING, LOGGER)
    assert fp.expected_fingerprint(spec) == hashlib.sha256(lines.encode()).hexdigest()
    assert not _warnings(caplog)


def test_a_server_hashes_its_files_at_start_once_per_machine(foreign_sam, caplog, tmp_path):
    caplog.set_level(logging.INFO, LOGGER)
    methods = ["naclip", "naclip+sam"]
    first = Engine(ServerSettings(data_dir=tmp_path)).warm(methods)
    assert f"fingerprinting {foreign_sam.name} (" in caplog.text
    assert "once per machine" in caplog.text
    caplog.clear()
    fp.forget_process_cache()  # a restart: the disk cache knows the file
    again = Engine(ServerSettings(data_dir=tmp_path)).warm(methods)
    assert again == first == {m: method_plan(m).identity.version for m in methods}
    assert "fingerprinting" not in caplog.text


def test_blip_snapshot_fingerprint_reaches_the_pnp_ovss_version():
    from transformers import BlipImageProcessor, BlipProcessor

    from ovss_label.backend.models.blip import build_tiny_blip
    from ovss_label.backend.models.blip_loader import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    folder = weights_dir() / "blip_itm_large_flickr"  # a save_pretrained snapshot
    build_tiny_blip(len(tokenizer), pad=0, sep=3, bos=len(tokenizer) - 2).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    proposer = create_proposer("pnp_ovss")
    lines = f"model.safetensors:{_sha(folder / 'model.safetensors')}\n"
    assert proposer.blip.file_fingerprint == hashlib.sha256(lines.encode()).hexdigest()
    assert proposer.identity == method_plan("pnp_ovss").identity


def _client(payload: bytes) -> httpx.Client:
    return httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=payload))
    )


def test_pull_keeps_a_users_file_unless_forced(tmp_path):
    payload = b"published" * 100
    spec = dataclasses.replace(get_spec("sam_vit_b"), sha256=hashlib.sha256(payload).hexdigest())
    mine = tmp_path / spec.file
    mine.write_bytes(b"fine-tuned")
    with pytest.raises(ForeignFileError, match=r"--force to replace it"):
        pull(spec, tmp_path, client=_client(payload))
    assert mine.read_bytes() == b"fine-tuned"
    assert pull(spec, tmp_path, client=_client(payload), force=True) == mine
    assert mine.read_bytes() == payload
    assert fp.cached_sha256(mine) == spec.sha256  # hashed while downloading, never re-read
    assert pull(spec, tmp_path, client=_client(b"unused")) == mine  # published: kept


def test_models_pull_cli_refuses_in_one_line_then_force_replaces(monkeypatch):
    payload = b"published" * 100
    spec = dataclasses.replace(get_spec("sam_vit_b"), sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(WEIGHTS, "sam_vit_b", spec)
    real_client = httpx.Client
    mock = httpx.MockTransport(lambda r: httpx.Response(200, content=payload))
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=mock))
    mine = weights_dir() / spec.file
    mine.write_bytes(b"fine-tuned")
    runner = CliRunner()
    refused = runner.invoke(cli, ["models", "pull", "sam_vit_b"])
    assert refused.exit_code == 1, refused.output
    line = refused.output.strip().splitlines()[-1]
    for part in (spec.file, _sha(mine)[:12], spec.sha256[:12], "--force to replace it"):
        assert part in line
    assert mine.read_bytes() == b"fine-tuned"
    listed = runner.invoke(cli, ["models", "list"])
    assert f"other {_sha(mine)[:8]}" in listed.output
    forced = runner.invoke(cli, ["models", "pull", "sam_vit_b", "--force"])
    assert forced.exit_code == 0, forced.output
    assert mine.read_bytes() == payload
    assert "published" in runner.invoke(cli, ["models", "list"]).output
