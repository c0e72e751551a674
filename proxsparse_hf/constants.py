"""File names, defaults and per-architecture target names used across the library."""

from __future__ import annotations

# --- files in an output folder (one layout for every way of producing a pruned model) ---
CONFIG_NAME = "proxsparse_config.json"
MASKS_NAME = "proxsparse_masks.safetensors"
PACKED_MASKS_NAME = "proxsparse_masks_packed.safetensors"
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

# --- methods that can produce an output folder ---
METHODS = ("proxsparse", "magnitude", "wanda", "sparsegpt", "dense")

# Linear-layer name suffixes inside decoder blocks, per `config.model_type`. Used for documentation and for
# `target_modules="default"`; `"all-linear"` needs no table (it takes every Linear/Conv1D inside the blocks).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

# Output-layer names that are never targets, even when a user's regex would match them.
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")
