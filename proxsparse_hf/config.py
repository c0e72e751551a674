"""``ProxSparseConfig``: the recipe of a ProxSparse run, saved and shared like a PEFT config."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ._version import __version__
from .constants import CONFIG_NAME, SUPPORTED_M, SUPPORTED_N
from .utils import atomic_write_text

__all__ = ["RECIPES", "ProxSparseConfig", "recipe_learning_rate"]

LAMBDA_SCHEDULES = ("constant", "lr_scaled", "ramp")
LAMBDA_SCALINGS = ("none", "weight_scale")
STEP_SCALINGS = ("none", "weight_rms")

# Named starting points (see README "Mask quality"): config fields plus the learning rate the recipe is trained with.
# "recommended": activation importance, per-layer λ normalisation and per-layer relative steps, so one recipe means the
# same on any model. Its learning rate is RELATIVE (step_scaling="weight_rms"): 0.016 = a step of about 1.6 % of each
# layer's RMS(W0) per unit Adam step, the log-middle of the steps that did well on SmolLM2-135M and on a model of
# another family (benchmarks/results/recipe_sweep_smollm2_h200/README.md, docs/quality.md). "published": the paper's
# setting (|W| importance, one global λ, absolute AdamW steps; its λ is per model).
RECIPES: dict[str, dict[str, Any]] = {
    "recommended": {
        "config": {
            "lambda1": 0.03,
            "lambda_scaling": "weight_scale",
            "importance": "activation",
            "step_scaling": "weight_rms",
        },
        "learning_rate": 0.016,  # relative to each layer's RMS(W0) (step_scaling="weight_rms")
    },
    "published": {
        "config": {"lambda1": 4.0, "lambda_scaling": "none", "importance": "magnitude", "step_scaling": "none"},
        "learning_rate": 1e-4,  # absolute (the paper's AdamW setting)
    },
}


def recipe_learning_rate(config: ProxSparseConfig) -> float:
    """The default learning rate for ``config``: the learning rate of the recipe with the same ``step_scaling``, since
    that decides what a learning rate means: relative to each layer's RMS (``"weight_rms"``: the recommended recipe's
    0.016) or absolute (``"none"``: the paper's 1e-4)."""
    for recipe in RECIPES.values():
        if recipe["config"]["step_scaling"] == config.step_scaling:
            return recipe["learning_rate"]
    raise ValueError(f"`step_scaling`={config.step_scaling!r} has no recipe; allowed: one of {STEP_SCALINGS}.")


SOLVER_BACKENDS = ("auto", "torch", "triton")
SNAPSHOT_DEVICES = ("cpu", "same")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)


@dataclass
class ProxSparseConfig:
    """Configuration of ProxSparse mask learning (2:4 semi-structured sparsity).

    The objective for every target weight ``W`` (pretrained value ``W0``) is
    ``L(W) + λ1·Σ_groups R(w_g) + λ2·Σ (W ⊙ (W − W0) / (W0 + ε·sign(W0)))²`` with ``R`` the 2:4 regulariser; ``λ1`` is
    applied through its proximal operator after every optimizer step, ``λ2`` through its analytic gradient.

    Args:
        lambda1: Strength ``λ1`` of the 2:4 regulariser inside the proximal operator (> 0).
        lambda2: Strength ``λ2`` of the frozen-weight regulariser (>= 0; 0 disables it).
        epsilon: ``ε`` of the frozen-weight regulariser (> 0).
        lambda_schedule: How ``λ1`` is used at each prox step. ``"constant"`` (the paper's convention): the prox uses
            ``λ1`` itself, not multiplied by the learning rate. ``"lr_scaled"``: the textbook proximal-gradient
            convention, ``λ1 · lr_t`` with the scheduler's current learning rate. ``"ramp"``: ``λ1 · t/T``, growing linearly
            to ``λ1`` over training.
        lambda_scaling: ``"none"`` uses ``λ1`` as given for every layer (the paper). ``"weight_scale"`` divides ``λ1`` by
            each layer's RMS weight at the start, so the prox strength is the same for all layers relative to their scale
            (``R`` is cubic in ``|w|``: a global ``λ1`` is far weaker on small-scale layers).
        importance: The per-weight score the regulariser and the final top-2 selection act on: the name of a registered
            importance measure (:mod:`proxsparse_hf.learning.importance`). ``"magnitude"`` (the paper): ``|W|``.
            ``"activation"``: ``|W_ij|·s_j`` with ``s_j`` the RMS-normalised norm of input feature ``j`` over the first
            ``importance_batches`` training batches (Wanda's score). The prox then runs in the scaled coordinates ``W·s``
            (a diagonal-metric proximal step) and the mask keeps the two best scores per group, so a mask that freezes
            early freezes at Wanda's choice instead of magnitude's.
        step_scaling: ``"none"`` (the paper): the optimizer's step is absolute, the same learning rate moves a weight by
            the same amount in every layer and model. ``"weight_rms"``: the optimizer works on every target in units of
            its layer's RMS(W0) (the weight divided and its gradient multiplied by it around the step; for Adam exactly a
            per-layer learning rate ``lr · RMS(W0)``), so the learning rate is a *relative* step (0.01 = about 1 % of the
            layer's RMS per unit Adam step) and one recipe means the same on any model. The frozen-weight term is then
            also taken in those units (on ``W / RMS(W0)``, so ``ε`` is relative). No extra memory; global gradient
            clipping is not scale-free, so ``learn_mask`` turns it off for this setting.
        importance_batches: Training batches used to measure the input-feature norms for ``importance="activation"``.
        prox_every_n_steps: Apply the prox operator every this many optimizer steps (>= 1).
        target_modules: ``"all-linear"`` (every Linear/Conv1D in the decoder blocks, never embeddings or the output layer),
            a list of module-name suffixes, or a regex that must match the full module name.
        exclude_modules: Modules to skip, same rules as ``target_modules``.
        n: Kept weights per group; only 2 is supported.
        m: Group size; only 4 is supported.
        solver_backend: Prox solver: ``"auto"`` (fused Triton kernel on CUDA when available, else torch), ``"torch"``
            or ``"triton"``.
        solver_max_iter: Maximum coordinate-descent sweeps per candidate support in the exact prox solver.
        solver_tol: Convergence tolerance of the solver (max change of a group's values, relative to the group's scale).
        snapshot_device: Where the copy of the original target weights lives: ``"cpu"`` (saves accelerator memory) or
            ``"same"`` (the weight's device; faster).
        train_non_target_params: Keep non-target parameters trainable during mask learning. Off by default (saves optimizer
            memory); either way every non-target parameter is restored to its original value at the end.
        base_model_name_or_path: Model the mask was learned on (filled in by the callback).
        revision: Revision / commit hash of the base model, when known (filled in by the callback).
        proxsparse_version: Version of proxsparse-hf that wrote the config.
    """

    lambda1: float = field(
        default=0.5, metadata={"help": "Strength of the 2:4 regulariser used by the prox operator (> 0)."}
    )
    lambda2: float = field(
        default=0.0, metadata={"help": "Strength of the frozen-weight regulariser (>= 0, 0 = off)."}
    )
    epsilon: float = field(default=0.1, metadata={"help": "Epsilon of the frozen-weight regulariser (> 0)."})
    lambda_schedule: str = field(
        default="constant",
        metadata={"help": f"How lambda1 enters each prox step: one of {LAMBDA_SCHEDULES}; 'constant' is the paper's."},
    )
    lambda_scaling: str = field(
        default="none",
        metadata={"help": f"Per-layer scaling of lambda1: one of {LAMBDA_SCALINGS}; 'none' is the paper's."},
    )
    importance: str = field(
        default="magnitude",
        metadata={
            "help": "Score the prox and the final top-2 act on: a registered importance measure "
            "(proxsparse_hf.learning.importance; built in: 'magnitude', the paper's, and 'activation')."
        },
    )
    step_scaling: str = field(
        default="none",
        metadata={
            "help": f"Per-layer scaling of the optimizer step: one of {STEP_SCALINGS}. 'weight_rms' makes the learning "
            "rate relative to each layer's RMS(W0); 'none' (the paper's) keeps it absolute."
        },
    )
    importance_batches: int = field(
        default=16,
        metadata={"help": "Batches used to measure input-feature norms for importance='activation' (>= 1)."},
    )
    prox_every_n_steps: int = field(default=1, metadata={"help": "Apply the prox every N optimizer steps (>= 1)."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "'all-linear', a list of module-name suffixes, or a full-match regex of module names."},
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Modules to leave dense; same matching rules as target_modules."}
    )
    n: int = field(default=SUPPORTED_N, metadata={"help": "Kept weights per group (only 2 is supported)."})
    m: int = field(default=SUPPORTED_M, metadata={"help": "Group size (only 4 is supported)."})
    solver_backend: str = field(default="auto", metadata={"help": f"Prox solver backend: one of {SOLVER_BACKENDS}."})
    solver_max_iter: int = field(default=100, metadata={"help": "Max coordinate-descent sweeps per candidate (>= 1)."})
    solver_tol: float = field(default=1e-6, metadata={"help": "Solver convergence tolerance, relative (> 0)."})
    snapshot_device: str = field(
        default="cpu", metadata={"help": f"Where the original-weight snapshot lives: one of {SNAPSHOT_DEVICES}."}
    )
    train_non_target_params: bool = field(
        default=False, metadata={"help": "Let non-target parameters train (they are restored at the end)."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model id or path (filled in by the callback)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Base model revision / commit hash, when known."})
    proxsparse_version: str = field(
        default=__version__, metadata={"help": "proxsparse-hf version that wrote this config."}
    )

    @classmethod
    def from_recipe(cls, recipe: str = "recommended", **overrides: Any) -> ProxSparseConfig:
        """A config from a named recipe (:data:`RECIPES`: ``"recommended"`` or ``"published"``), fields overridden by
        ``overrides``. Train it with the recipe's learning rate (:func:`recipe_learning_rate`; ``learn_mask`` and the
        CLI use it by default)."""
        if recipe not in RECIPES:
            raise ValueError(f"`recipe`={recipe!r} is invalid; allowed: one of {tuple(RECIPES)}.")
        return cls(**{**RECIPES[recipe]["config"], **overrides})

    @classmethod
    def recommended(cls, **overrides: Any) -> ProxSparseConfig:
        """The recommended recipe: ``importance="activation"``, ``lambda_scaling="weight_scale"``, ``lambda1=0.03``,
        ``step_scaling="weight_rms"``; train it with the *relative* learning rate ``RECIPES["recommended"]
        ["learning_rate"]`` (a step relative to each layer's RMS(W0)), batches of 2 windows, 10 % warm-up and no
        global gradient clipping (the defaults of ``learn_mask`` and the CLI). Chosen in
        ``benchmarks/results/recipe_sweep_smollm2_h200/README.md`` (see docs/quality.md). ``proxsparse learn`` also
        permutes the input channels of ``o_proj`` / ``down_proj`` first (``--permute auto``; in Python
        :func:`proxsparse_hf.permutation.permute_channels` before training), which is not a config field: it changes
        the checkpoint, function-preserving, not the learning."""
        return cls.from_recipe("recommended", **overrides)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"`{name}`={getattr(self, name)!r} is invalid; allowed: {allowed}.")

        def require_positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "an integer >= 1")

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        if not is_number(self.lambda1) or not self.lambda1 > 0 or self.lambda1 == float("inf"):
            raise bad("lambda1", "a finite number > 0")
        if not is_number(self.lambda2) or self.lambda2 < 0 or self.lambda2 == float("inf"):
            raise bad("lambda2", "a finite number >= 0")
        if not is_number(self.epsilon) or not self.epsilon > 0 or self.epsilon == float("inf"):
            raise bad("epsilon", "a finite number > 0")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise bad("lambda_schedule", f"one of {LAMBDA_SCHEDULES}")
        if self.lambda_scaling not in LAMBDA_SCALINGS:
            raise bad("lambda_scaling", f"one of {LAMBDA_SCALINGS}")
        from .learning.importance import importance_names  # the registry (imports torch only)

        if self.importance not in importance_names():
            raise bad("importance", f"one of {importance_names()}")
        if self.step_scaling not in STEP_SCALINGS:
            raise bad("step_scaling", f"one of {STEP_SCALINGS}")
        require_positive_int("importance_batches")
        require_positive_int("prox_every_n_steps")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise bad("target_modules", "'all-linear', a non-empty list of name suffixes, or a regex")
        elif not _is_str_list(self.target_modules) or not self.target_modules:
            raise bad("target_modules", "'all-linear', a non-empty list of name suffixes, or a regex")
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.exclude_modules is not None and not (
            (isinstance(self.exclude_modules, str) and self.exclude_modules) or _is_str_list(self.exclude_modules)
        ):
            raise bad("exclude_modules", "None, a list of name suffixes, or a regex")
        if (self.n, self.m) != (SUPPORTED_N, SUPPORTED_M):
            raise ValueError(
                f"`n`={self.n!r}, `m`={self.m!r}: only {SUPPORTED_N}:{SUPPORTED_M} semi-structured sparsity is supported "
                f"(the layout sparse tensor cores accept)."
            )
        if self.solver_backend not in SOLVER_BACKENDS:
            raise bad("solver_backend", f"one of {SOLVER_BACKENDS}")
        require_positive_int("solver_max_iter")
        if not is_number(self.solver_tol) or not self.solver_tol > 0:
            raise bad("solver_tol", "a number > 0")
        if self.snapshot_device not in SNAPSHOT_DEVICES:
            raise bad("snapshot_device", f"one of {SNAPSHOT_DEVICES}")
        if not isinstance(self.train_non_target_params, bool):
            raise bad("train_non_target_params", "True or False")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "None or a string")
        if not isinstance(self.proxsparse_version, str) or not self.proxsparse_version:
            raise bad("proxsparse_version", "a version string")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxSparseConfig:
        """Build a config from :meth:`to_dict` output. Unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"ProxSparseConfig.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown ProxSparseConfig key(s) {unknown}; this is proxsparse-hf {__version__} and the config was written "
                f"by version {data.get('proxsparse_version', 'unknown')}. Upgrade proxsparse-hf or remove the keys."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``proxsparse_config.json`` into ``save_directory`` (created if needed) atomically; returns its path.

        The written config records the current library version.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory`={save_directory!r} is a file; a directory is expected.")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data["proxsparse_version"] = __version__
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> ProxSparseConfig:
        """Load a config from a local directory (tried first) or a Hub repo id.

        Args:
            pretrained_model_name_or_path: directory containing ``proxsparse_config.json`` or a Hub repo id.
            subfolder: sub-directory inside the directory / repo.
            revision: Hub branch, tag or commit.
            token: Hub token.
            cache_dir: Hub cache directory.
            **overrides: field values replacing the loaded ones (validated).
        """
        path = os.fspath(pretrained_model_name_or_path)
        local_dir = os.path.join(path, subfolder) if subfolder else path
        local_file = os.path.join(local_dir, CONFIG_NAME)
        if os.path.isfile(local_file):
            config_file = local_file
        elif os.path.isdir(local_dir):
            raise ValueError(f"Directory {local_dir!r} has no {CONFIG_NAME}.")
        else:
            from huggingface_hub import hf_hub_download

            try:
                config_file = hf_hub_download(
                    repo_id=path,
                    filename=CONFIG_NAME,
                    subfolder=subfolder,
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                )
            except Exception as exc:
                raise ValueError(
                    f"Can't find {CONFIG_NAME} at {path!r}: it is not a local directory and downloading it from the Hub "
                    f"(revision={revision!r}, subfolder={subfolder!r}) failed: {exc}"
                ) from exc
        with open(config_file, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_file!r} is not valid JSON: {exc}") from exc
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown ProxSparseConfig override(s) {unknown}.")
        data.update(overrides)
        return cls.from_dict(data)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload ProxSparse config",
        create_pr: bool = False,
    ) -> str:
        """Upload ``proxsparse_config.json`` to ``repo_id`` (created if missing) in one commit; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(tmp)
            info = api.upload_file(
                path_or_fileobj=path,
                path_in_repo=CONFIG_NAME,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
        return str(getattr(info, "commit_url", info))
