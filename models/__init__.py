"""Multitask rankers on TensorFlow Recommenders layers (Keras 2 only): shared bottom, MMoE, PLE and DCN-v2.

    model = models.build_ranker(spec, models.RankerConfig.preset("large_dcn", scale=1 / 8))
"""

from tfrs_clippy_models.config import BOTTOMS, PRESETS, RankerConfig
from tfrs_clippy_models.embedding import FeatureEmbedding, feature_signature, placeholder_features
from tfrs_clippy_models.ranker import ParameterCounts, Ranker, build_ranker

__all__ = [
    "BOTTOMS",
    "PRESETS",
    "FeatureEmbedding",
    "ParameterCounts",
    "Ranker",
    "RankerConfig",
    "build_ranker",
    "feature_signature",
    "placeholder_features",
]
