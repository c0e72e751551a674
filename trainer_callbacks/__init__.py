"""Trainer integrations of proxsparse-hf."""

from .proxsparse import ProxSparseCallback

__all__ = ["ProxSparseCallback"]
