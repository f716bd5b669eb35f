"""Weight table, resolution, safe loading of real-format tiny checkpoints, pull/verify, CLI."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import httpx
import open_clip
import pytest
import torch
from click.testing import CliRunner

from ovss_label.backend.models import WEIGHTS, MissingWeightError, get_spec, resolve_weight
from ovss_label.backend.models.checkpoints import CheckpointError, is_torchscript
from ovss_label.backend.models.clip import CLIP_ARCHS, build_clip
from ovss_label.backend.models.download import DownloadError, pull, verify
from ovss_label.backend.models.sam import SAM_ARCHS
from ovss_label.backend.models.weights import WeightSpec
from ovss_label.cli import cli


def _rounded(model) -> dict[str, torch.Tensor]:
    return {k: v.half().float() for k, v in model.state_dict().items() if k != "attn_mask"}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "attn_mask"}


def test_weight_table_rows_are_complete():
    assert {"clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336"} <= set(WEIGHTS)
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h"} <= set(WEIGHTS)
    for spec in WEIGHTS.values():
        assert spec.licence and spec.size_mb > 0
        if spec.format == "hf_hub":  # a repository snapshot: the hub checks each file
            assert spec.url == f"https://huggingface.co/{spec.hub_id}" and spec.file == spec.name
            continue
        if spec.family == "dinov2":  # no published digest: its rows are tested in test_dinov2.py
            continue
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.url.endswith("/" + spec.file)
        if spec.name.startswith("clip_"):
            assert spec.sha256 in spec.url  # OpenAI URL scheme: the sha256 is the directory
            assert spec.arch == CLIP_ARCHS[spec.name] and spec.format == "torchscript"
        else:
            assert spec.arch == SAM_ARCHS[spec.name]["arch"] and spec.format == "state_dict"


def test_missing_weight_is_one_line_that_says_how_to_get_it():
    spec = get_spec("clip_vit_b16")
    with pytest.raises(MissingWeightError) as err:
        resolve_weight(spec)
    message = str(err.value)
    assert "\n" not in message
    for part in (spec.file, spec.sha256, spec.url, "ovss-label models pull clip_vit_b16"):
        assert part in message


def test_resolution_order_explicit_then_weights_dir(tmp_path, monkeypatch):
    spec = get_spec("clip_vit_b16")
    with pytest.raises(MissingWeightError, match="does not exist"):
        resolve_weight(spec, tmp_path / "nope.pt")
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / spec.file).write_bytes(b"x")
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"y")
    assert resolve_weight(spec) == tmp_path / spec.file
    assert resolve_weight(spec, explicit) == explicit


def test_open_clip_download_cache_is_used_without_network(tmp_path, monkeypatch):
    spec = get_spec("clip_vit_l14_336")
    cached = Path.home() / ".cache" / "clip" / spec.file
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    try:
        assert resolve_weight(spec) == cached  # OVSS_OFFLINE=1 is set: found, not downloaded
    finally:
        cached.unlink()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_openai_archive_loads_like_open_clip_load_openai_model(tiny_model, tiny_checkpoints):
    archive = tiny_checkpoints["openai"]
    assert is_torchscript(archive)
    ours = build_clip("clip_tiny", checkpoint=archive)
    theirs = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu")
    expected = _rounded(tiny_model)  # OpenAI archives hold fp16 weights
    for key, value in _weights(theirs).items():
        assert torch.equal(ours.model.state_dict()[key], value), key
        assert torch.equal(value, expected[key]), key
    assert not ours.model.training and ours.patch_size == 16


@pytest.mark.parametrize("fmt", ["safetensors", "ddp"])
def test_state_dict_formats_load_exactly(tiny_model, tiny_checkpoints, fmt):
    loaded = build_clip("clip_tiny", checkpoint=tiny_checkpoints[fmt])
    for key, value in _weights(tiny_model).items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert (
        loaded.text_fingerprint
        == build_clip("clip_tiny", checkpoint=tiny_checkpoints["safetensors"]).text_fingerprint
    )


def test_checkpoint_of_another_architecture_is_refused_with_keys(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tiny_checkpoints["openai"].parent))
    with pytest.raises(
        CheckpointError, match=r"does not fit CLIP: missing \['transformer.resblocks.1.*visual.proj"
    ):
        build_clip("clip_vit_b16")  # a tiny archive under the ViT-B/16 file name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_never_unpickled(tmp_path):
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"weights": print}, f)  # a global reference: weights_only refuses it
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_clip("clip_tiny", checkpoint=evil)


def test_tiny_twin_is_deterministic_and_loud(capsys):
    a, b = build_clip("clip_vit_b16", tiny=True), build_clip("clip_vit_b16", tiny=True)
    assert a.tiny and a.name == "clip_tiny"
    assert a.text_fingerprint == b.text_fingerprint
    assert "MEANINGLESS" in capsys.readouterr().err


def _spec(payload: bytes) -> WeightSpec:
    sha = hashlib.sha256(payload).hexdigest()
    return WeightSpec("w", "ViT-B-16", "w.pt", "https://weights.test/w.pt", sha, "MIT")


def _client(payload: bytes) -> httpx.Client:
    return httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=payload))
    )


def test_pull_checks_sha256_and_writes_atomically(tmp_path):
    payload = b"weights" * 1000
    seen = []
    path = pull(
        _spec(payload), tmp_path, client=_client(payload), progress=lambda d, t: seen.append(d)
    )
    assert path.read_bytes() == payload and seen[-1] == len(payload)
    assert verify(_spec(payload), path).status == "ok"
    bad = _spec(b"other")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pull(bad, tmp_path / "x", client=_client(payload))
    assert not list((tmp_path / "x").iterdir())  # no file, no .part left behind
    assert verify(bad, path).status == "mismatch"
    assert verify(bad, tmp_path / "missing").status == "missing"


def test_pull_reports_http_errors(tmp_path):
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    with pytest.raises(DownloadError, match="failed"):
        pull(_spec(b"a"), tmp_path, client=client)


def test_hub_snapshots_verify_by_their_files(tmp_path):
    spec = get_spec("blip_itm_large_flickr")
    assert spec.format == "hf_hub" and spec.hub_id == "Salesforce/blip-itm-large-flickr"
    folder = tmp_path / spec.file
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert verify(spec, folder).status == "missing"  # no weights file yet
    (folder / "model.safetensors").write_bytes(b"x")
    assert verify(spec, folder).status == "ok"


def test_models_cli_list_and_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tmp_path))
    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "clip_vit_b16" in listed.output and "ViT-B-16.pt" in listed.output
    (tmp_path / "ViT-B-16.pt").write_bytes(b"corrupt")
    checked = runner.invoke(cli, ["models", "verify", "clip_vit_b16"])
    assert checked.exit_code == 1 and "mismatch" in checked.output
    unknown = runner.invoke(cli, ["models", "pull", "nope"])
    assert unknown.exit_code == 2 and "known:" in unknown.output


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_models_list_never_shortens_a_name_on_a_narrow_console(tmp_path, monkeypatch, terminal):
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "60")
    if terminal:  # rich treats the output as a terminal, 60 columns wide
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    (tmp_path / "ViT-B-16.pt").write_bytes(b"another file")
    listed = CliRunner().invoke(cli, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    if terminal:  # the table's rows are indented; each weight's source line follows it
        text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout)  # colours
        firsts = [ln.split()[0] for ln in text.splitlines() if ln.startswith("  ") and ln.strip()]
        assert set(WEIGHTS) <= set(firsts), text  # whole names: no "clip_vit_…", no halves
        assert "other" in text and max(len(line) for line in text.splitlines()[:12]) <= 60
    else:  # plain rows for scripts: one per weight, tab-separated, the title on stderr
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert rows[0][0] == "name" and [r[0] for r in rows[1:]] == list(WEIGHTS), rows
        assert all(len(r) == 6 for r in rows) and rows[1][4].startswith("other ")
