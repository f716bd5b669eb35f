"""Weight fingerprints: which file was loaded, once-per-file warnings, method fingerprints
without models, versions that name the file, and ``models pull`` that keeps a user's file."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
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
from ovss_label.backend.models.fingerprints import (
    file_sha256,
    method_fingerprint,
    short_fingerprint,
    warm_fingerprints,
)
from ovss_label.backend.models.sam import TINY_SAM_CFG, _create_sam, build_sam
from ovss_label.backend.models.weights import WEIGHTS, get_spec, weights_dir
from ovss_label.backend.proposers import create_proposer
from ovss_label.cli import cli
from ovss_label.methods import METHOD_WEIGHTS, METHODS, SAM_MODELS, method_weights

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


def test_method_fingerprint_follows_the_files_without_loading_a_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("ovss_label.backend.models.clip._create_clip", no_model)
    monkeypatch.setattr(sam_module, "_create_sam", no_model)
    monkeypatch.setattr("ovss_label.backend.models.checkpoints.read_state_dict", no_model)
    published = [get_spec(n).sha256 for n in ("clip_vit_b16", "sam_vit_b")]
    assert method_fingerprint("naclip+sam") == short_fingerprint(published)
    assert len(method_fingerprint("naclip+sam")) == 6
    naclip = method_fingerprint("naclip")
    sam_l = method_fingerprint("naclip+sam", sam_model="sam_vit_l")
    assert len({method_fingerprint("naclip+sam"), naclip, sam_l}) == 3
    mine = weights_dir() / get_spec("sam_vit_b").file
    mine.write_bytes(b"fine-tuned")
    assert method_fingerprint("naclip+sam") == short_fingerprint([published[0], _sha(mine)])
    assert method_fingerprint("naclip") == naclip  # its files did not change
    assert method_fingerprint("naclip+sam", sam_model="sam_vit_l") == sam_l
    assert method_fingerprint("clip_sam", tiny=True) == "tiny"
    with pytest.raises(ValueError, match="known"):
        method_fingerprint("nope")


def test_method_fingerprint_imports_no_torch(tmp_path):
    code = (
        "import sys\nfrom ovss_label.backend.models.fingerprints import warm_fingerprints\n"
        "from ovss_label.methods import METHODS\n"
        "print(warm_fingerprints(METHODS, 'sam_vit_h'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_warm_fingerprints_says_which_files_it_hashes_once(foreign_sam, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    methods = ["naclip", "naclip+sam"]
    first = warm_fingerprints(methods)
    assert f"fingerprinting {foreign_sam.name} (" in caplog.text
    assert "once per machine" in caplog.text
    caplog.clear()
    fp.forget_process_cache()  # a restart: the disk cache knows the file
    assert warm_fingerprints(methods) == first == {m: method_fingerprint(m) for m in methods}
    assert "fingerprinting" not in caplog.text


def test_method_weights_table_covers_every_method():
    assert set(METHOD_WEIGHTS) == set(METHODS)
    for method in METHODS:
        for sam_model in SAM_MODELS:
            assert all(n in WEIGHTS for n in method_weights(method, sam_model))
    assert method_weights("clip_sam", "sam_vit_h") == ("clip_vit_l14", "sam_vit_h")
    with pytest.raises(ValueError, match="unknown SAM"):
        method_weights("clip_sam", "sam_vit_x")


@pytest.mark.parametrize(
    ("method", "sam_model"),
    [(m, "sam_vit_b") for m in METHODS] + [("clip_sam", "sam_vit_l"), ("naclip+sam", "sam_vit_h")],
)
def test_method_weights_are_what_the_factories_load(method, sam_model, monkeypatch):
    """Every factory, with default options, asks its builders for the table's names."""
    from ovss_label.backend.proposers import clip_sam, naclip, pnp_ovss, presence, refine

    seen: list[str] = []

    def recording(real):
        def build(name, **options):
            seen.append(name)
            return real(name, **{**options, "tiny": True})  # the twin: no file, seconds

        return build

    for module, attr in ((naclip, "build_clip"), (clip_sam, "build_clip"),
                         (clip_sam, "build_sam"), (refine, "build_sam"),
                         (pnp_ovss, "load_blip"), (presence, "build_clip")):  # fmt: skip
        monkeypatch.setattr(module, attr, recording(getattr(module, attr)))
    options = {"sam_model": sam_model} if "sam" in method else {}
    create_proposer(method, **options)
    assert tuple(seen) == method_weights(method, sam_model)


def test_proposer_versions_carry_the_loaded_files(tiny_checkpoints, tmp_path):
    openai, other = tiny_checkpoints["openai"], tiny_checkpoints["safetensors"]
    naclip = create_proposer("naclip", tiny=True, checkpoint=str(openai))
    assert naclip.model_version.endswith(f"-v0.1.0-w{short_fingerprint([_sha(openai)])}")
    again = create_proposer("naclip", tiny=True, checkpoint=str(other))
    assert again.model_version != naclip.model_version  # the same weights, another file
    assert create_proposer("naclip", tiny=True).model_version.endswith("-wtiny")
    sam_file = tmp_path / "sam.pth"
    torch.save(_create_sam(TINY_SAM_CFG, seed=4).state_dict(), sam_file)
    refined = create_proposer("naclip+sam", tiny=True, sam_checkpoint=str(sam_file))
    assert refined.model_version.endswith(f"+sam_tiny-w{short_fingerprint([_sha(sam_file)])}")
    both = create_proposer("clip_sam", tiny=True, sam_checkpoint=str(sam_file))
    expected = short_fingerprint(["tiny", _sha(sam_file)])
    assert both.model_version.startswith("clip_sam-clip_tiny-sam_tiny-v")
    assert both.model_version.endswith(f"-w{expected}")


def test_loaded_versions_name_what_method_fingerprint_predicts(tiny_checkpoints, monkeypatch):
    """A proposer's ``-w`` part equals the server's fingerprint of the same files."""
    from ovss_label.backend.models import clip

    shutil.copy(tiny_checkpoints["openai"], weights_dir() / "ViT-B-16.pt")
    monkeypatch.setattr(clip, "_openai_cfg", lambda arch: clip.TINY_CLIP_CFG)
    naclip = create_proposer("naclip")
    assert naclip.model_version.endswith(f"-w{method_fingerprint('naclip')}")


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
    assert proposer.model_version.endswith(f"-w{method_fingerprint('pnp_ovss')}")


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
