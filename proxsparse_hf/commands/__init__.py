"""Sub-commands of the ``proxsparse`` CLI (one module each, see :mod:`proxsparse_hf.cli`)."""
