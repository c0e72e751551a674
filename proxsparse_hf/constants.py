"""File names of an output folder and the supported sparsity pattern, used across the library."""

from __future__ import annotations

# --- files in an output folder (one layout for every way of producing a pruned model) ---
CONFIG_NAME = "proxsparse_config.json"
MASKS_NAME = "proxsparse_masks.safetensors"
PACKED_MASKS_NAME = "proxsparse_masks_packed.safetensors"
PERMUTATION_NAME = "proxsparse_permutation.safetensors"  # the channel permutation folded in before the mask was found
REPORT_NAME = "sparsity_report.json"
EVAL_RESULTS_NAME = "eval_results.json"
TRAINING_LOG_NAME = "training_log.json"
RUN_INFO_NAME = "run_info.json"
COMPACT_WEIGHTS_NAME = "model_2to4.safetensors"
COMPACT_INDEX_NAME = "proxsparse_compact.json"
CARD_NAME = "README.md"

# --- the sparsity pattern supported today ---
SUPPORTED_N = 2
SUPPORTED_M = 4

# Method names are not constants: they come from the pruner registry (`proxsparse_hf.pruners.pruner_names()`).

# Output-layer names that are never targets, even when a user's regex would match them.
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")
