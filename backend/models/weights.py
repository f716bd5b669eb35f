"""The weight table (data, not code) and where a weight file is found.

Every checkpoint the backend can load is one :class:`WeightSpec` row in :data:`WEIGHTS`: its
file name, where to download it, its sha256, licence and preprocessing. Architecture lives in
the builders (``clip.py``); this module only knows files (timm ``_pretrained.py``, open_clip
``pretrained.py`` style).

Resolution order for a weight (:func:`resolve_weight`):

1. an explicit path given by the caller (server configuration or a CLI option);
2. ``$OVSS_WEIGHTS_DIR/<file>`` (default ``~/.cache/ovss-label/weights``), where
   ``ovss-label models pull`` puts files;
3. the library's own download cache (open_clip downloads OpenAI files to ``~/.cache/clip``),
   unless ``OVSS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``.

A weight found nowhere raises :class:`MissingWeightError`, whose one-line message names the
file, its sha256, where to get it and the ``models pull`` command.

Some publishers give no digest (Meta's DINOv2 files: no sha256 beside them, none in the name).
Such a row has ``sha256=""`` ("not published"); ``models pull`` then records the sha256 of the
bytes it downloaded in a sidecar ``<file>.sha256`` next to the file (``sha256sum`` format,
:func:`record_sha256`), and ``models verify`` / ``models list`` compare the file with that
recorded digest (:func:`expected_sha256`) and say that no published digest exists.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..store import weights_dir

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
_MIT = "MIT (OpenAI CLIP)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable checkpoint.

    Attributes:
        name: Table key, e.g. ``"clip_vit_b16"``; also the ``models pull`` argument.
        arch: The builder's architecture name (``clip.py`` ``CLIP_ARCHS`` key).
        file: File name in the weights directory.
        url: Where ``models pull`` downloads it from.
        sha256: Hex digest of the file; ``""`` when the publisher gives none (a hub snapshot,
            or a file whose digest ``models pull`` records: module docstring).
        licence: Licence of the weights.
        format: ``"torchscript"`` (OpenAI archives), ``"state_dict"`` or ``"safetensors"``.
        mean: RGB mean of the preprocessing, in [0, 1] units.
        std: RGB std of the preprocessing, in [0, 1] units.
        hub_id: Optional Hugging Face hub id holding the same weights.
        size_mb: Approximate download size, for the table and progress bars.
        family: Which builder loads it: ``"clip"``, ``"sam"``, ``"blip"`` or ``"dinov2"``.
        tag: Short name in model versions (timm's ``arch.tag`` idea): ``b16``, ``samB``.
    """

    name: str
    arch: str
    file: str
    url: str
    sha256: str
    licence: str
    format: str = "state_dict"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    hub_id: str = ""
    size_mb: int = 0
    family: str = "clip"
    tag: str = ""
    notes: str = field(default="", compare=False)


def _openai(
    name: str, arch: str, file: str, sha: str, hub: str, size_mb: int, tag: str
) -> WeightSpec:
    url = _OPENAI_URL.format(sha=sha, file=file)
    return WeightSpec(name, arch, file, url, sha, _MIT, "torchscript", hub_id=hub, size_mb=size_mb,
                      family="clip", tag=tag)  # fmt: skip


def _sam(name: str, arch: str, file: str, sha: str, size_mb: int, tag: str) -> WeightSpec:
    # Plain state dicts (torch.save); SAM normalises with ImageNet mean/std on 0-255 pixels.
    url = f"https://dl.fbaipublicfiles.com/segment_anything/{file}"
    return WeightSpec(
        name,
        arch,
        file,
        url,
        sha,
        "Apache-2.0 (SAM)",
        "state_dict",
        IMAGENET_MEAN,
        IMAGENET_STD,
        size_mb=size_mb,
        family="sam",
        tag=tag,
    )


def _hub(name: str, hub_id: str, size_mb: int, tag: str) -> WeightSpec:
    # A Hugging Face repository snapshot (a folder): the hub client checks each file's sha256
    # against the hub's own record, so the table holds no digest for it.
    url = f"https://huggingface.co/{hub_id}"
    return WeightSpec(name, "blip_itm_large", name, url, "", "BSD-3-Clause (BLIP)", "hf_hub",
                      hub_id=hub_id, size_mb=size_mb, family="blip", tag=tag)  # fmt: skip


def _dinov2(name: str, arch: str, file: str, size_mb: int, tag: str) -> WeightSpec:
    # Meta's official state dicts (dinov2/hub/backbones.py URL scheme); no sha256 is published
    # (module docstring: sha256="" and the sidecar). ``arch`` is the timm model (dinov2.py).
    url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{file}"
    return WeightSpec(name, arch, file, url, "", "Apache-2.0 (DINOv2)", "state_dict",
                      IMAGENET_MEAN, IMAGENET_STD, size_mb=size_mb, family="dinov2",
                      tag=tag)  # fmt: skip


# sha256 of the SAM checkpoints as published with them (segment-anything README downloads).
_SAM_B = "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
_SAM_L = "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"
_SAM_H = "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"

# The OpenAI archive's sha256 is the directory of its URL (open_clip pretrained.py checks it).
WEIGHTS: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        _openai(
            "clip_vit_b16",
            "ViT-B-16",
            "ViT-B-16.pt",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            "timm/vit_base_patch16_clip_224.openai",
            335,
            "b16",
        ),
        _openai(
            "clip_vit_l14",
            "ViT-L-14",
            "ViT-L-14.pt",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            "timm/vit_large_patch14_clip_224.openai",
            890,
            "l14",
        ),
        _openai(
            "clip_vit_l14_336",
            "ViT-L-14-336",
            "ViT-L-14-336px.pt",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            "timm/vit_large_patch14_clip_336.openai",
            891,
            "l14-336",
        ),
        _sam("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", _SAM_B, 358, "samB"),
        _sam("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", _SAM_L, 1192, "samL"),
        _sam("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", _SAM_H, 2446, "samH"),
        _hub("blip_itm_large_flickr", "Salesforce/blip-itm-large-flickr", 1880, "blipL-flickr"),
        _hub("blip_itm_large_coco", "Salesforce/blip-itm-large-coco", 1880, "blipL-coco"),
        _dinov2(
            "dinov2_vitl14",
            "vit_large_patch14_dinov2.lvd142m",
            "dinov2_vitl14_pretrain.pth",
            1217,
            "dL14",
        ),
        _dinov2(
            "dinov2_vitl14_reg4",
            "vit_large_patch14_reg4_dinov2.lvd142m",
            "dinov2_vitl14_reg4_pretrain.pth",
            1217,
            "dL14r",
        ),
    )
}


class MissingWeightError(FileNotFoundError):
    """A checkpoint was not found; the message says where to get it, in one line."""


def offline() -> bool:
    """True when downloads are forbidden (``OVSS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("OVSS_OFFLINE", "HF_HUB_OFFLINE"))


def get_spec(name: str) -> WeightSpec:
    """The table row ``name``; a ValueError lists the known names."""
    try:
        return WEIGHTS[name]
    except KeyError:
        raise ValueError(f"unknown weight {name!r}; known: {', '.join(WEIGHTS)}") from None


def missing_message(spec: WeightSpec) -> str:
    """The one-line error for a weight found nowhere."""
    digest = f"sha256 {spec.sha256}" if spec.sha256 else "no published sha256"
    return (
        f"weight {spec.name!r} not found: put {spec.file} ({digest}) in "
        f"{weights_dir()} (set OVSS_WEIGHTS_DIR), get it from {spec.url}, or run "
        f"`ovss-label models pull {spec.name}`"
    )


def resolve_weight(spec: WeightSpec, path: str | os.PathLike[str] | None = None) -> Path:
    """Finds the file of ``spec`` (module docstring: resolution order).

    Args:
        spec: The table row.
        path: An explicit file; when given it must exist (it is never silently skipped).

    Returns:
        An existing file path (a folder for a hub snapshot).

    Raises:
        MissingWeightError: The explicit path does not exist, or the weight is found nowhere
            and downloads are off or fail.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise MissingWeightError(f"weight file {explicit} does not exist ({spec.name})")
        return explicit
    found = find_weight(spec)
    if found is not None:
        return found
    if offline():
        raise MissingWeightError(missing_message(spec) + " (downloads are off: OVSS_OFFLINE)")
    return _library_download(spec)


def find_weight(spec: WeightSpec) -> Path | None:
    """Where ``spec`` is on this machine without downloading (steps 2-3 of the module
    docstring), or None.

    A file for a file weight; for a hub snapshot (``format="hf_hub"``) the folder
    ``$OVSS_WEIGHTS_DIR/<name>`` when it has a ``config.json``, else the hub cache's snapshot
    (where ``transformers`` finds it by hub id).
    """
    local = weights_dir() / spec.file
    if spec.format == "hf_hub":
        return local if (local / "config.json").is_file() else _hub_snapshot(spec.hub_id)
    if local.is_file():
        return local
    cached = _library_cache(spec)
    if cached is not None and cached.is_file():  # downloaded by open_clip before: no network
        return cached
    return None


def _hub_snapshot(hub_id: str) -> Path | None:
    """The hub cache's snapshot folder of ``hub_id`` (revision ``main``), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # a dependency of transformers; only odd installs lack it
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _library_cache(spec: WeightSpec) -> Path | None:
    # open_clip's download_pretrained_from_url default, shared with OpenAI's clip package.
    return Path("~/.cache/clip").expanduser() / spec.file if spec.format == "torchscript" else None


def _library_download(spec: WeightSpec) -> Path:
    """OpenAI archives through open_clip (its cache, sha256-checked); others (SAM has no
    download code of its own) through ``models pull`` into the weights directory."""
    try:
        if spec.format == "torchscript":
            from open_clip.pretrained import download_pretrained_from_url

            return Path(download_pretrained_from_url(spec.url))
        from .download import pull

        return pull(spec)
    except Exception as exc:  # network errors come in many types; the user needs one line
        raise MissingWeightError(f"{missing_message(spec)} (download failed: {exc})") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    """Where the sha256 recorded for the weight file ``path`` lives: ``<file>.sha256``."""
    return path.with_name(path.name + ".sha256")


def record_sha256(path: Path, digest: str) -> None:
    """Records ``digest`` as the sha256 of the weight file ``path`` (``sha256sum`` format),
    written to a temp file and renamed, so a reader never sees half a line."""
    side = sidecar_path(path)
    part = side.with_name(side.name + ".part")
    part.write_text(f"{digest}  {path.name}\n")
    os.replace(part, side)


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded for ``path`` by :func:`record_sha256`, or None (no or bad sidecar)."""
    try:
        first = sidecar_path(path).read_text().split()
    except OSError:
        return None
    ok = bool(first) and len(first[0]) == 64 and all(c in "0123456789abcdef" for c in first[0])
    return first[0] if ok else None


def expected_sha256(spec: WeightSpec, path: Path) -> str | None:
    """The digest ``path`` should have as ``spec``'s file: the published one, else the one
    recorded when it was pulled; None when neither exists."""
    return spec.sha256 or recorded_sha256(path)
