"""ProxSparse mask learning under FSDP2 (``fully_shard``) on N GPUs: tokens/s, peak memory per GPU, and the learned masks.

Launch once per GPU count with the same arguments, then compare the saved masks::

    torchrun --nproc_per_node 1 benchmarks/fsdp2_scaling.py --out runs/fsdp1gpu
    torchrun --nproc_per_node 2 benchmarks/fsdp2_scaling.py --out runs/fsdp2gpu
    python benchmarks/fsdp2_scaling.py --compare runs/fsdp1gpu runs/fsdp2gpu

Every rank sees its share of the same global batches (same data order for every GPU count). The model is a ~1.1B-parameter
Llama-architecture decoder with random weights (``--model synthetic-1b``, bf16) or a real checkpoint / GGUF file (fp32).
Each run prints one JSON line and writes ``result.json`` + ``masks.safetensors`` under ``--out`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "synthetic-1b":
        config = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model, config.vocab_size
    from proxsparse_hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, dtype="float32")
    return model.cuda(), len(tokenizer)


def run(args) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from proxsparse_hf import ProxSparseConfig
    from proxsparse_hf.learning.learner import MaskLearner

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    model, vocab = _model(args.model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    model.train()
    learner = MaskLearner(
        model, ProxSparseConfig(lambda1=args.lambda1, lambda_scaling="weight_scale", snapshot_device="same")
    )
    learner.freeze_non_targets()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (args.steps * args.global_batch, args.seq_len), generator=gen)
    per_rank = args.global_batch // world
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        batch = data[
            step * args.global_batch + rank * per_rank : step * args.global_batch + (rank + 1) * per_rank
        ].cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        learner.add_frozen_weight_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learner.prox_step(step + 1, args.steps)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    if world > 1:
        dist.all_gather(peaks, peak)
    else:
        peaks = [peak]
    stats = learner.statistics()
    masks = learner.finalize()
    timed = times[args.warmup :]
    result = {
        "model": args.model,
        "gpus": world,
        "gpu_name": torch.cuda.get_device_name(0),
        "steps": args.steps,
        "global_batch": args.global_batch,
        "seq_len": args.seq_len,
        "tokens_per_s": args.global_batch * args.seq_len * len(timed) / sum(timed),
        "step_ms_median": 1000 * sorted(timed)[len(timed) // 2],
        "peak_memory_gib_per_gpu": [round(float(p), 2) for p in peaks],
        "frac_2to4_before_projection": stats["proxsparse/frac_2to4"],
        "torch": torch.__version__,
    }
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        masks_dir = args.masks_dir or args.out
        os.makedirs(masks_dir, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in masks.items()}, os.path.join(masks_dir, "masks.safetensors"))
        result["masks_dir"] = masks_dir
        with open(os.path.join(args.out, "result.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        print(json.dumps(result), flush=True)
    if world > 1:
        dist.destroy_process_group()


def compare(a: str, b: str) -> None:
    from safetensors.torch import load_file

    ra, rb = (json.load(open(os.path.join(d, "result.json"))) for d in (a, b))
    ma, mb = (load_file(os.path.join(r.get("masks_dir", d), "masks.safetensors")) for r, d in ((ra, a), (rb, b)))
    if ma.keys() != mb.keys():
        raise SystemExit(f"mask names differ: {sorted(set(ma) ^ set(mb))[:5]}")
    same = total = 0
    for key in ma:
        ga, gb = ma[key].reshape(-1, 4), mb[key].reshape(-1, 4)
        same += int((ga == gb).all(dim=1).sum())
        total += ga.shape[0]
    print(
        json.dumps(
            {
                "identical_groups_fraction": same / total,
                "groups": total,
                "identical": same == total,
                "tokens_per_s": [ra["tokens_per_s"], rb["tokens_per_s"]],
                "scaling": rb["tokens_per_s"] / ra["tokens_per_s"],
                "peak_memory_gib_per_gpu": [ra["peak_memory_gib_per_gpu"], rb["peak_memory_gib_per_gpu"]],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-1b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda1", type=float, default=0.1)
    parser.add_argument("--out", default="runs/fsdp2")
    parser.add_argument("--masks-dir", default=None, help="where masks.safetensors goes (default: --out)")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
