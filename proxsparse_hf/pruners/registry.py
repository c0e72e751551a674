"""The pruner registry: one name → one :class:`PrunerSpec` (display label, description, what it needs, its options and the
function that runs it).

Every way of producing a 2:4 mask is registered here by the one file that implements it, with one decorator::

    @register_pruner("magnitude", label="Magnitude", description="...", needs_calibration=False)
    def magnitude(model, targets, calibration, *, show_progress=False):
        ...

Nothing else in the code base names a method: :func:`~proxsparse_hf.pruners.prune`, the CLI, cards and benchmarks read
names, labels, descriptions and options from :func:`get_pruner` / :func:`pruner_names`, and an unknown name is a
``ValueError`` listing the registered ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from ..permutation.search import PERMUTATION_IMPORTANCES

__all__ = [
    "PrunerOption",
    "PrunerSpec",
    "get_pruner",
    "pruner_names",
    "register_pruner",
    "unregister_pruner",
]

T = TypeVar("T")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_OPTION_RE = re.compile(r"[a-z][a-z0-9_]*")


def _type_words(default: Any) -> str:
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return f"a {type(default).__name__}"


def _has_type_of(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if default is None:
        return True
    return isinstance(value, type(default))


@dataclass(frozen=True)
class PrunerOption:
    """One option of a pruner: its default, a help line and what values it accepts.

    A value must have the default's type (``bool``; ``int``; ``float`` also takes an ``int``; ``str``) and pass ``check``.

    Args:
        default: the value used when the option is not given.
        help: one line for ``--help`` and docs.
        check: extra validity test on a value of the right type (e.g. ``lambda v: 0 < v < 1``).
        allowed: the accepted values in words for error messages (derived from the type when empty).
    """

    default: Any
    help: str = ""
    check: Callable[[Any], bool] | None = None
    allowed: str = ""

    def validate(self, name: str, value: Any) -> Any:
        """Return ``value`` if valid for option ``name``, else raise ``ValueError`` naming it and what is allowed."""
        if not _has_type_of(value, self.default) or (self.check is not None and not self.check(value)):
            raise ValueError(f"`{name}`={value!r} is invalid; allowed: {self.allowed or _type_words(self.default)}.")
        return value


@dataclass(frozen=True)
class PrunerSpec:
    """A registered pruning method.

    Args:
        name: registry key (``--method`` value, ``method`` in ``run_info.json`` and ``eval_results.json``).
        label: display name for tables, charts and cards (e.g. ``"SparseGPT"``).
        description: one or two sentences on what the method does.
        needs_calibration: the method reads calibration data (``prune(..., calibration_data)`` is required).
        updates_weights: the method may change the surviving weights (otherwise they keep their original values).
        options: ``{name: PrunerOption}`` the method accepts, with defaults (see :meth:`defaults`).
        fn: ``fn(model, targets, calibration, *, show_progress, **options) -> {weight_name: bool mask}``; prunes in place.
            ``calibration`` is a :class:`~proxsparse_hf.pruners.capture.CalibrationBatches` (``None`` when the method
            needs none), ``options`` are the method's options with defaults filled in.
        learned: the mask is learned by training (:func:`proxsparse_hf.learn_mask` / ``proxsparse learn``), not found by
            :func:`~proxsparse_hf.pruners.prune`.
        permutation_importance: the importance a channel permutation before this method should maximise (a name of
            :data:`proxsparse_hf.permutation.PERMUTATION_IMPORTANCES`); None: derived (see
            :func:`proxsparse_hf.permutation.permutation_importance_for`).
    """

    name: str
    label: str
    description: str
    needs_calibration: bool
    updates_weights: bool
    options: Mapping[str, PrunerOption]
    fn: Callable[..., Any]
    learned: bool = False
    permutation_importance: str | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """``{option: default}``."""
        return {name: option.default for name, option in self.options.items()}

    def resolve_options(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``opts``, every value validated.

        Raises:
            ValueError: an option this method does not declare (naming the allowed ones), or an invalid value.
        """
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for method {self.name!r}; allowed: {sorted(self.options)}.")
        resolved = self.defaults
        for name, value in opts.items():
            resolved[name] = self.options[name].validate(name, value)
        return resolved


_REGISTRY: dict[str, PrunerSpec] = {}


def _as_option(name: str, method: str, value: Any) -> PrunerOption:
    if not isinstance(name, str) or not _OPTION_RE.fullmatch(name):
        raise ValueError(
            f"Option name {name!r} of pruner {method!r} is invalid; allowed: lower-case letters, digits and '_', "
            f"starting with a letter."
        )
    option = value if isinstance(value, PrunerOption) else PrunerOption(default=value)
    option.validate(name, option.default)
    return option


def register_pruner(
    name: str,
    *,
    label: str,
    description: str,
    needs_calibration: bool,
    updates_weights: bool = False,
    options: Mapping[str, Any] | None = None,
    learned: bool = False,
    permutation_importance: str | None = None,
) -> Callable[[T], T]:
    """Class/function decorator that registers a pruning method under ``name``.

    Decorate either the function ``fn(model, targets, calibration, *, show_progress, **options) -> masks`` (see
    :class:`PrunerSpec`) or a class whose ``run`` classmethod has that signature (e.g. a
    :class:`~proxsparse_hf.pruners.capture.SequentialPruner`, which only defines ``make_stats`` and ``prune_target``).
    The decorated object is returned unchanged.

    Args:
        name: the method's name (lower case; letters, digits, ``-`` and ``_``).
        label: display name.
        description: one or two sentences.
        needs_calibration: the method reads calibration data.
        updates_weights: the method may change surviving weights.
        options: ``{option: default}`` or ``{option: PrunerOption(...)}``.
        learned: the mask is learned by training, not found by ``prune()``.
        permutation_importance: the importance a channel permutation before this method maximises (default: derived).

    Raises:
        ValueError: an invalid or already registered name, an empty label, an invalid option declaration or
            permutation importance.
        TypeError: the decorated object is not callable and has no ``run``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"`name`={name!r} is invalid; allowed: lower-case letters, digits, '-' and '_', starting with a letter or "
            f"digit."
        )
    if name in _REGISTRY:
        raise ValueError(f"A pruner named {name!r} is already registered; unregister_pruner({name!r}) first.")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"`label`={label!r} is invalid; allowed: a non-empty string.")
    declared = MappingProxyType({key: _as_option(key, name, value) for key, value in (options or {}).items()})
    if permutation_importance is not None and permutation_importance not in PERMUTATION_IMPORTANCES:
        raise ValueError(
            f"`permutation_importance`={permutation_importance!r} is invalid; allowed: None or one of "
            f"{tuple(PERMUTATION_IMPORTANCES)}."
        )

    def decorator(obj: T) -> T:
        fn = getattr(obj, "run", None) if isinstance(obj, type) else obj
        if not callable(fn):
            raise TypeError(f"register_pruner({name!r}) decorates a function or a class with a `run` classmethod.")
        if name in _REGISTRY:
            raise ValueError(f"A pruner named {name!r} is already registered; unregister_pruner({name!r}) first.")
        _REGISTRY[name] = PrunerSpec(
            name=name,
            label=label,
            description=description,
            needs_calibration=bool(needs_calibration),
            updates_weights=bool(updates_weights),
            options=declared,
            fn=fn,
            learned=bool(learned),
            permutation_importance=permutation_importance,
        )
        return obj

    return decorator


def unregister_pruner(name: str) -> PrunerSpec:
    """Remove ``name`` from the registry and return its spec (for tests and plug-ins that replace a method).

    Raises:
        ValueError: ``name`` is not registered.
    """
    spec = get_pruner(name)
    del _REGISTRY[name]
    return spec


def get_pruner(name: str) -> PrunerSpec:
    """The spec registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"`method`={name!r} is invalid; allowed: {pruner_names()}.")
    return spec


def pruner_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)
