"""The proposal methods by name, importable without torch (the CLI builds its choices from it).

``tests/test_proposers.py`` checks this list against the registry of ``backend.proposers``.
"""

METHODS = ("naclip", "naclip+sam", "clip_sam", "pnp_ovss", "pnp_ovss+sam")
SAM_MODELS = ("sam_vit_b", "sam_vit_l", "sam_vit_h")

SAM_SLOT = "<sam>"
"""Stands for the chosen SAM (``--sam-model``, the server's ``sam_model``) in METHOD_WEIGHTS."""

METHOD_WEIGHTS: dict[str, tuple[str, ...]] = {
    "naclip": ("clip_vit_b16",),
    "naclip+sam": ("clip_vit_b16", SAM_SLOT),
    "clip_sam": ("clip_vit_l14", SAM_SLOT),
    "pnp_ovss": ("blip_itm_large_flickr",),
    "pnp_ovss+sam": ("blip_itm_large_flickr", SAM_SLOT),
}
"""Method -> the weight-table names its factory loads with default options, in load order
(``tests/test_fingerprints.py`` checks it against the factories, so it cannot drift)."""


def method_weights(method: str, sam_model: str = "sam_vit_b") -> tuple[str, ...]:
    """The weight-table names ``method`` loads with default options and SAM ``sam_model``."""
    if method not in METHOD_WEIGHTS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHOD_WEIGHTS)}")
    if sam_model not in SAM_MODELS:
        raise ValueError(f"unknown SAM {sam_model!r}; known: {', '.join(SAM_MODELS)}")
    return tuple(sam_model if n == SAM_SLOT else n for n in METHOD_WEIGHTS[method])
