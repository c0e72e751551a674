"""Jinja templates of the model cards written by :mod:`proxsparse_hf.card` (shipped as package data)."""
