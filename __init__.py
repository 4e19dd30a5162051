"""Irminsul: position-independent KV caching for Multi-Head Latent Attention models."""

__version__ = "0.1.0"
