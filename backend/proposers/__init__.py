"""Open-vocabulary proposers (one module per method), the feature cache and post-processing."""

from .base import (
    BACKGROUND,
    Features,
    MethodPlan,
    Proposal,
    Proposer,
    TextEmbedder,
    available_proposers,
    create_proposer,
    method_plan,
    register_method,
)
from .cache import FeatureCache, image_key, propose
from .postprocess import PostprocessConfig, proposal_to_instances

__all__ = [
    "BACKGROUND",
    "FeatureCache",
    "Features",
    "MethodPlan",
    "PostprocessConfig",
    "Proposal",
    "Proposer",
    "TextEmbedder",
    "available_proposers",
    "create_proposer",
    "image_key",
    "method_plan",
    "proposal_to_instances",
    "propose",
    "register_method",
]
