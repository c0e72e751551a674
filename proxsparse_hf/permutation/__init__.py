"""Channel permutation for 2:4: reorder the input channels of a layer so that more importance survives the top-2-of-4
rule, and fold the reordering into the weights so that the model computes exactly the same function.

A 2:4 group is four *consecutive* input channels; which channels share a group is an accident of the checkpoint. If the
input channels of a layer are permuted and the layer that produces them permutes its output rows the same way, the
model is unchanged (up to float rounding) and a mask method run afterwards sees better groups. Run it before any mask
method (magnitude, Wanda, RIA, SparseGPT, ProxSparse)::

    report = permute_channels(model, config, importance="activation", calibration=windows)
    prune(model, "wanda", windows, config)            # the result is still a plain checkpoint, exactly 2:4

Which layers, and why it is exact (Llama, Mistral, Qwen2 decoder blocks):

* ``mlp.down_proj``: its input is ``act(gate_proj(x)) * up_proj(x)``, element by element, so permuting the rows (and
  biases) of ``gate_proj`` and ``up_proj`` with the same permutation permutes ``down_proj``'s input.
* ``self_attn.o_proj``: its input is the concatenation of the heads' outputs ``softmax(q_h k_gᵀ) v_g``; head ``h`` reads
  key/value head ``g = h // n_rep`` (grouped-query attention). A permutation of the ``head_dim`` channels of value head
  ``g`` (rows of ``v_proj``) permutes the output channels of every query head that reads it the same way, so ``o_proj``
  gets one within-head permutation per key/value head, shared by its ``n_rep`` query heads. Moving whole heads would
  not change any group (``head_dim`` is a multiple of 4), so this is all the freedom there is.
* The residual-stream inputs (``q/k/v_proj``, ``gate/up_proj``) are left alone: only one permutation of the whole
  stream (embeddings, every norm, every ``o_proj``/``down_proj`` output, ``lm_head``) is exact there, and measured on
  SmolLM2-135M it removes 1.5 % of the pruned importance of those layers, against 5–7 % for a ``down_proj`` with its own
  permutation (docs/quality.md).

The search, per layer (per key/value head for ``o_proj``, whose query heads' columns are stacked): the importance
matrix ``S`` (``|W|``, ``|W|·‖X_j‖`` or the RIA score) decides the objective ``Σ_rows Σ_groups top-2``. RIA's
heuristic allocation (channels sorted by total importance, dealt to the groups in a snake order) gives the start, then
each of the four positions of a group is re-assigned in turn, keeping the other three fixed: an assignment problem,
solved exactly with ``scipy.optimize.linear_sum_assignment`` (``refine="hungarian"``) or by pairwise swaps in pure torch
(``refine="swap"``); ``"auto"`` uses scipy when it is installed. The result is never worse than the identity.
"""

from .folding import (
    SUPPORTED_ARCHITECTURES,
    PermutationReport,
    PermutedLayer,
    check_permutable,
    permutable_layers,
    permutation_importance_for,
    permute_channels,
)
from .record import apply_index_maps, load_index_maps, save_index_maps
from .search import PERMUTATION_IMPORTANCES, PERMUTATION_REFINEMENTS, find_permutation, kept_importance

__all__ = [
    "PERMUTATION_IMPORTANCES",
    "PERMUTATION_REFINEMENTS",
    "SUPPORTED_ARCHITECTURES",
    "PermutationReport",
    "PermutedLayer",
    "apply_index_maps",
    "check_permutable",
    "permutable_layers",
    "find_permutation",
    "kept_importance",
    "load_index_maps",
    "permutation_importance_for",
    "permute_channels",
    "save_index_maps",
]
