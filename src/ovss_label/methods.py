"""The proposal methods by name, importable without torch (the CLI builds its choices from it).

``tests/test_proposers.py`` checks this list against the registry of ``backend.proposers``.
"""

METHODS = ("naclip", "naclip+sam", "clip_sam", "pnp_ovss", "pnp_ovss+sam")
SAM_MODELS = ("sam_vit_b", "sam_vit_l", "sam_vit_h")
