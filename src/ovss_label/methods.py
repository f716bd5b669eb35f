"""The proposal methods by name, importable without torch (the CLI builds its choices from it).

``tests/test_proposers.py`` checks this list against the registry of ``backend.proposers``;
what each method loads is its plan's business (``backend/proposers``, ``method_plan``).
"""

METHODS = ("naclip", "naclip+sam", "clip_sam", "pnp_ovss", "pnp_ovss+sam", "fmbseg", "fmbseg+sam")
SAM_MODELS = ("sam_vit_b", "sam_vit_l", "sam_vit_h")
