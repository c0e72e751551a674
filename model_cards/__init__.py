"""Jinja templates of the model cards written by :mod:`proxsparse_hf.hub.card` (shipped as package data)."""
