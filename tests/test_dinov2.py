"""DINOv2 backbones: weight rows and pull/verify without a published digest, tiny twins through
the pool and timm's offline loader, Meta's position-embedding interpolation, patch tokens."""

from __future__ import annotations

import hashlib
import math

import httpx
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from ovss_label.backend.models import MissingWeightError, get_spec, weights_dir
from ovss_label.backend.models.dinov2 import (
    DINOV2_ARCHS,
    TINY_DINOV2_CFG,
    LoadedDinov2,
    MetaPosEmbedViT,
    _create_dinov2,
    encode_size,
    load_dinov2,
    meta_state_dict,
    patch_tokens,
)
from ovss_label.backend.models.download import pull, verify
from ovss_label.backend.models.fingerprints import TINY
from ovss_label.backend.models.identity import loaded_weight
from ovss_label.backend.models.pool import ModelPool, WeightRef
from ovss_label.backend.models.weights import recorded_sha256, sidecar_path
from ovss_label.cli import cli

PLAIN, REG4 = "dinov2_vitl14", "dinov2_vitl14_reg4"
SIZES = [(336, 448), (224, 308), (518, 518)]


def meta_interpolate_pos_encoding(pos_embed, x_shape, offset, antialias, patch_size=14):
    """Meta's ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2
    ``dinov2/models/vision_transformer.py`` at b8931f7), as a function of the (1, 1 + M*M, D)
    table and the input's (B, C, H, W) shape, with Meta's own names: ``B, nc, w, h = x.shape``
    (so its ``w`` is the height), ``sx`` for dim 2, ``sy`` for dim 3."""
    _, _, w, h = x_shape
    N = pos_embed.shape[1] - 1  # noqa: N806 (Meta's names)
    npatch = (w // patch_size) * (h // patch_size)
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    M = int(math.sqrt(N))  # noqa: N806
    assert N == M * M
    if offset:
        sx, sy = float(w0 + offset) / M, float(h0 + offset) / M
        kwargs = {"scale_factor": (sx, sy)}
    else:
        kwargs = {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _twin(name: str, seed: int = 1) -> VisionTransformer:
    """A tiny twin whose position table is N(0, 1), so interpolation errors show."""
    model = _create_dinov2(DINOV2_ARCHS[name], seed=seed, tiny=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=generator))
    return model


def _pos_rows(model: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """What ``model`` adds to zero patch tokens on a (gh, gw) grid: prefix tokens + positions."""
    with torch.no_grad():
        return model._pos_embed(torch.zeros(1, *grid, model.embed_dim))


# ---- weight table, pull / verify / list without a published digest ---------------------------
def test_weight_rows():
    for name, tag in ((PLAIN, "dL14"), (REG4, "dL14r")):
        spec = get_spec(name)
        assert spec.family == "dinov2" and spec.tag == tag and spec.format == "state_dict"
        assert spec.file == f"{name}_pretrain.pth" and spec.sha256 == ""
        assert spec.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{spec.file}"
        assert spec.arch == DINOV2_ARCHS[name].timm_name and spec.licence.startswith("Apache")
        assert (spec.mean, spec.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert WeightRef(name).fingerprint() == f"unpublished:{spec.file}"  # not on this machine
    assert DINOV2_ARCHS[PLAIN].reg_tokens == 0 and DINOV2_ARCHS[REG4].reg_tokens == 4
    with pytest.raises(MissingWeightError, match=r"no published sha256.*models pull dinov2_vitl14"):
        load_dinov2(PLAIN)


def _mock_http(monkeypatch, payload: bytes) -> None:
    real = httpx.Client
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=payload))
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=transport))


def test_pull_records_the_digest_and_verify_checks_it(monkeypatch):
    spec, payload = get_spec(PLAIN), b"dinov2 bytes" * 100
    digest = hashlib.sha256(payload).hexdigest()
    _mock_http(monkeypatch, payload)
    pulled = CliRunner().invoke(cli, ["models", "pull", PLAIN])
    assert pulled.exit_code == 0, pulled.output
    path = weights_dir() / spec.file
    assert path.read_bytes() == payload and recorded_sha256(path) == digest
    assert f"no published sha256; recorded {digest}" in pulled.output
    checked = verify(spec)
    assert checked.status == "ok" and checked.note.startswith("no published digest; fingerprint")
    assert pull(spec) == path  # present and as recorded: nothing downloaded
    listed = CliRunner().invoke(cli, ["models", "list"])
    assert f"{PLAIN}\t{spec.file}\t1217\t" in listed.stdout and "\tpulled\t" in listed.stdout
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", "verify", PLAIN])
    assert shown.exit_code == 0 and "no published digest; fingerprint" in shown.output

    path.write_bytes(b"changed")  # another file under the name: the recorded digest catches it
    assert verify(spec).status == "mismatch"
    assert CliRunner().invoke(cli, ["models", "verify", PLAIN]).exit_code == 1
    sidecar_path(path).unlink()  # copied in by hand: nothing to compare with
    assert verify(spec).status == "unverified" and "none recorded" in verify(spec).note
    assert pull(spec) == path and recorded_sha256(path) == hashlib.sha256(b"changed").hexdigest()


# ---- building and loading ------------------------------------------------------------------
@pytest.mark.parametrize("name", [PLAIN, REG4])
def test_meta_format_file_loads_offline_through_timm(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = _create_dinov2(DINOV2_ARCHS[name], seed=5, tiny=True)
    sd = meta_state_dict(built)
    assert "mask_token" in sd and sd["pos_embed"].shape == (1, 1370, 64)  # Meta's layout
    assert ("register_tokens" in sd) == (name == REG4) and "reg_token" not in sd
    path = tmp_path / get_spec(name).file
    torch.save(sd, path)
    loaded = load_dinov2(name, checkpoint=path, tiny=True)
    direct = timm.create_model(  # the documented call, nothing else
        DINOV2_ARCHS[name].timm_name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        dynamic_img_size=True,
        num_classes=0,
        **TINY_DINOV2_CFG,
    )
    for key, value in built.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
        assert torch.equal(direct.state_dict()[key], value), key
    assert loaded.file_fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert (loaded.patch_size, loaded.embed_dim) == (14, 64)
    assert loaded.num_prefix_tokens == (5 if name == REG4 else 1)


def test_pool_builds_each_twin_once():
    pool = ModelPool()
    first = pool.load(WeightRef(PLAIN, None, tiny=True))
    assert pool.load(WeightRef(PLAIN, None, tiny=True)) is first and pool.builds[PLAIN] == 1
    other = pool.load(WeightRef(REG4, None, tiny=True))
    assert isinstance(first, LoadedDinov2) and isinstance(first.model, MetaPosEmbedViT)
    assert type(other.model) is VisionTransformer  # timm's interpolation is Meta's for reg4
    assert (first.weight, first.file_fingerprint, first.device.type) == (PLAIN, TINY, "cpu")
    assert loaded_weight("dinov2", first).tag == "dL14"
    assert first.backbone_fingerprint != other.backbone_fingerprint


def test_a_file_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "clip.pth"
    torch.save({"visual.proj": torch.zeros(2, 2)}, path)
    with pytest.raises(Exception, match=r"does not fit DINOv2 .*\(tiny twin\)") as err:
        load_dinov2(PLAIN, checkpoint=path, tiny=True)
    assert "\n" not in str(err.value)


# ---- Meta's position-embedding interpolation ---------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_plain_positions_are_metas(size):
    model = _twin(PLAIN)
    grid = (size[0] // 14, size[1] // 14)
    reference = meta_interpolate_pos_encoding(model.pos_embed, (1, 3, *size), 0.1, False)
    ours = _pos_rows(model, grid)
    assert ours.shape == (1, 1 + grid[0] * grid[1], 64)
    assert torch.allclose(ours[:, 1:], reference[:, 1:], rtol=0, atol=1e-6)
    assert torch.allclose(ours[:, 0], model.cls_token[:, 0] + reference[:, 0], rtol=0, atol=1e-6)
    if size[0] != size[1]:  # timm's own resampling (size=, antialias) is not Meta's
        timm_rows = VisionTransformer._pos_embed(model, torch.zeros(1, *grid, 64))
        assert (timm_rows - reference).abs().max() > 1e-2


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reg4_positions_are_metas_with_timms_resampling(size):
    model = _twin(REG4)
    meta = meta_state_dict(model)  # Meta's table: a CLS position in front, registers apart
    grid = (size[0] // 14, size[1] // 14)
    reference = meta_interpolate_pos_encoding(meta["pos_embed"], (1, 3, *size), 0.0, True)
    ours = _pos_rows(model, grid)  # CLS + pos, 4 registers (no position), patches + pos
    assert torch.allclose(ours[:, 5:], reference[:, 1:], rtol=0, atol=1e-6)
    assert torch.allclose(ours[:, 0], meta["cls_token"][:, 0] + reference[:, 0], atol=1e-6)
    assert torch.equal(ours[:, 1:5], meta["register_tokens"])


def test_plain_forward_is_tokens_blocks_norm_with_metas_positions():
    model = _twin(PLAIN)
    x = torch.randn(1, 3, 336, 448, generator=torch.Generator().manual_seed(0))
    proj = model.patch_embed.proj
    with torch.no_grad():
        patches = F.conv2d(x, proj.weight, proj.bias, stride=14).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token, patches], dim=1)
        tokens = tokens + meta_interpolate_pos_encoding(model.pos_embed, x.shape, 0.1, False)
        for block in model.blocks:
            tokens = block(tokens)
        expected = model.norm(tokens)
        ours = model.forward_features(x)
        model.__class__ = VisionTransformer  # the same weights with timm's interpolation
        timms = model.forward_features(x)
    assert ours.shape == (1, 1 + 24 * 32, 64)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5), (ours - expected).abs().max()
    assert (timms - expected).abs().max() > 1e-2


# ---- patch tokens -------------------------------------------------------------------------
def test_encode_size():
    assert encode_size(300, 500) == (448, 742)  # 500 * 448/300 = 746.7 -> 53.3 patches -> 53
    assert encode_size(500, 300) == (742, 448)
    assert encode_size(518, 518, short_side=518) == (518, 518)
    assert encode_size(100, 2000) == (84, 1792)  # long side capped: scale 0.896, 89.6 -> 6 patches
    assert encode_size(10, 10000) == (14, 1792)  # never below one patch
    assert encode_size(1000, 1000, short_side=224) == (224, 224)


@pytest.mark.parametrize("name", [PLAIN, REG4])
def test_patch_tokens_of_a_300x500_image(name):
    loaded = load_dinov2(name, tiny=True)
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    tokens = patch_tokens(loaded, image, short_side=448)
    assert tokens.shape == (32, 53, 64) and tokens.dtype == torch.float32  # (448/14, 742/14)
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    pixels = TF.resize(pixels, [448, 742], InterpolationMode.BICUBIC, antialias=True)
    mean, std = torch.tensor(loaded.mean).view(3, 1, 1), torch.tensor(loaded.std).view(3, 1, 1)
    with torch.no_grad():
        out = loaded.model.forward_features((pixels - mean) / std)
    prefix = 5 if name == REG4 else 1
    assert torch.allclose(tokens, out[0, prefix:].reshape(32, 53, 64), atol=1e-6)
    with pytest.raises(ValueError, match="uint8 RGB"):
        patch_tokens(loaded, image.astype(np.float32))
