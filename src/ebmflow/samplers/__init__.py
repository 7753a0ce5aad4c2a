"""MCMC samplers for continuous and discrete states, persistent chains and replay buffers."""

from .base import ChainState, MCMCSampler, NonFiniteError, Sampler

__all__ = ["Sampler", "MCMCSampler", "ChainState", "NonFiniteError"]
