"""Abliteration pipeline: find the refusal direction in a model's residual stream and remove it from the weights."""

from pipeline.config import register_resolvers

register_resolvers()
