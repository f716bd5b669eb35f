"""Open-vocabulary proposers (one module per method), the feature cache and post-processing."""

from .base import (
    BACKGROUND,
    Features,
    Proposal,
    Proposer,
    available_proposers,
    create_proposer,
    register_proposer,
)
from .cache import FeatureCache, image_key, propose
from .postprocess import PostprocessConfig, proposal_to_instances

__all__ = [
    "BACKGROUND",
    "FeatureCache",
    "Features",
    "PostprocessConfig",
    "Proposal",
    "Proposer",
    "available_proposers",
    "create_proposer",
    "image_key",
    "proposal_to_instances",
    "propose",
    "register_proposer",
]
