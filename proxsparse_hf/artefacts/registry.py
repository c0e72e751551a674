"""The artefact registry: every way of sharing a pruned model is one :class:`ArtefactFormat` registered by name.

A format knows how to write itself from a :class:`~proxsparse_hf.artefacts.base.PrunedModel`, how to recognise and
load a folder it wrote, which files it writes (push uploads nothing else) and what the model card says about it.
Adding a format is one new module with a registered subclass plus one import line in ``artefacts/__init__.py``::

    @register_artefact
    class MyFormat(ArtefactFormat):
        name = "mine"
        ...

Export, push, the card, ``load_pruned`` and the CLI's ``--artefact`` choices all read this registry.
"""

from __future__ import annotations

import fnmatch
import os
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .base import PrunedModel

__all__ = [
    "BASE_MODEL_RELATIONS",
    "ArtefactFormat",
    "artefact_names",
    "detect_artefact",
    "get_artefact",
    "register_artefact",
    "unregister_artefact",
]

BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
"""The ``base_model_relation`` values the Hub accepts."""

_REGISTRY: dict[str, ArtefactFormat] = {}


class ArtefactFormat:
    """One shareable artefact format. Subclass, set the class attributes, implement the methods, register.

    Class attributes:
        name: registry key and ``--artefact`` value.
        label: short display name (card, logs), e.g. ``"dense pruned checkpoint"``.
        files: ``fnmatch`` patterns of the files :meth:`save` writes (the shared metadata and card files are added
            by the pipeline); a push uploads nothing else.
        library_name: the card's ``library_name`` (the library that loads the artefact).
        base_model_relation: the card's ``base_model_relation`` (one of :data:`BASE_MODEL_RELATIONS`).
        card_tag: tag added to the card.
        casts_dtype: whether ``dtype`` applies (the weights are stored); False for formats without weights.
        detect_priority: formats are tried by :func:`detect_artefact` from the highest priority down.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    files: ClassVar[tuple[str, ...]] = ()
    library_name: ClassVar[str] = "proxsparse-hf"
    base_model_relation: ClassVar[str] = "quantized"
    card_tag: ClassVar[str]
    casts_dtype: ClassVar[bool] = True
    detect_priority: ClassVar[int] = 0

    def detect(self, path: str) -> bool:
        """Whether the local folder ``path`` holds this format."""
        raise NotImplementedError

    def validate(self, source: PrunedModel) -> None:
        """Refuse (``ValueError``) a source this format cannot represent; called before anything is written."""
        source.check_2to4()

    def save(self, source: PrunedModel, directory: str) -> None:
        """Write this format's files into the existing empty ``directory`` (metadata files are written separately)."""
        raise NotImplementedError

    def load(
        self,
        path: str,
        *,
        dtype: str | torch.dtype | None = None,
        base_model: str | nn.Module | None = None,
        token: str | bool | None = None,
    ) -> nn.Module:
        """The pruned ``transformers`` model stored in the local folder ``path``."""
        raise NotImplementedError

    def card_description(self, revision: str | None) -> str:
        """One paragraph for the card: what the repository holds (``revision``: the base model's)."""
        raise NotImplementedError

    def how_to_load(self, repo: str, base_model: str | None, revision: str | None) -> str:
        """Markdown for the card's "How to load" section."""
        raise NotImplementedError

    def owns(self, relative_path: str) -> bool:
        """Whether a file (path relative to the artefact folder) is one this format writes."""
        return any(fnmatch.fnmatchcase(relative_path, pattern) for pattern in self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_artefact(cls: type[ArtefactFormat]) -> type[ArtefactFormat]:
    """Class decorator: register an :class:`ArtefactFormat` subclass under its ``name``.

    Raises:
        ValueError: the class lacks a required attribute, has an invalid ``base_model_relation``, or the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, ArtefactFormat)):
        raise ValueError(f"`cls`={cls!r} is invalid; allowed: a subclass of ArtefactFormat.")
    for attr in ("name", "label", "card_tag"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value:
            raise ValueError(f"`{cls.__name__}.{attr}`={value!r} is invalid; allowed: a non-empty string.")
    if cls.base_model_relation not in BASE_MODEL_RELATIONS:
        raise ValueError(
            f"`{cls.__name__}.base_model_relation`={cls.base_model_relation!r} is invalid; allowed: "
            f"{BASE_MODEL_RELATIONS}."
        )
    if not isinstance(cls.files, tuple) or not all(isinstance(p, str) and p for p in cls.files):
        raise ValueError(f"`{cls.__name__}.files`={cls.files!r} is invalid; allowed: a tuple of file name patterns.")
    if cls.name in _REGISTRY:
        raise ValueError(f"An artefact format named {cls.name!r} is already registered ({_REGISTRY[cls.name]!r}).")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_artefact(name: str) -> None:
    """Remove a registered format (for plugins and tests)."""
    get_artefact(name)
    del _REGISTRY[name]


def get_artefact(name: Any) -> ArtefactFormat:
    """The registered format called ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"`artefact`={name!r} is invalid; allowed: {artefact_names()}.")
    return _REGISTRY[name]


def artefact_names() -> tuple[str, ...]:
    """Names of the registered formats, in registration order."""
    return tuple(_REGISTRY)


def detect_artefact(path: str | os.PathLike) -> str:
    """Name of the format a local folder holds (formats tried by ``detect_priority``, then registration order).

    Raises:
        ValueError: no registered format recognises the folder.
    """
    path = os.fspath(path)
    for fmt in sorted(_REGISTRY.values(), key=lambda f: -f.detect_priority):
        if fmt.detect(path):
            return fmt.name
    expected = "; ".join(f"{fmt.name}: {', '.join(fmt.files[:2])}" for fmt in _REGISTRY.values())
    raise ValueError(
        f"{path!r} holds no pruned-model artefact; expected the files of one of the formats ({expected})."
    )
