"""Trainer integrations of proxsparse-hf: ``from trainer_callbacks import ProxSparseCallback``.

The implementation lives in :mod:`proxsparse_hf.learning.callback`; this package only re-exports it (the library never
imports this package).
"""

from proxsparse_hf.learning.callback import ProxSparseCallback

__all__ = ["ProxSparseCallback"]
