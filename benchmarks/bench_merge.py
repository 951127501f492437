"""Throughput of weighted_average merges on Gemma-7B-shaped rank-8 LoRA adapters.

Four random bf16 adapters with the q/k/v/o shapes of Gemma-7B (28 layers, hidden 3072,
16 heads x 256 = 4096 for q, k, v and o; lora_A [8, in], lora_B [out, 8]) are merged
  * in memory with merge_state_dicts, and
  * from disk with lora_merge (read 4 adapters, merge, write one atomically).
Figures are GB/s of input bytes read, and the ratio to a plain tensor copy of the same bytes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_merge.py [--repeats 5] [--threads 2]
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from merge import lora_merge, merge_state_dicts, save_adapter  # noqa: E402

LAYERS, HIDDEN, QKVO_OUT, RANK = 28, 3072, 16 * 256, 8
# (in_features, out_features) per projection
SHAPES = {"q_proj": (HIDDEN, QKVO_OUT), "k_proj": (HIDDEN, QKVO_OUT), "v_proj": (HIDDEN, QKVO_OUT), "o_proj": (QKVO_OUT, HIDDEN)}


def make_adapter(seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for proj, (fan_in, fan_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=g) * 0.02).to(torch.bfloat16)
            state[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=g) * 0.02).to(torch.bfloat16)
    return state


def best_of(fn, repeats):
    fn()  # warm-up: allocator, page cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    adapters = [make_adapter(i) for i in range(4)]
    weights = [0.4, 0.3, -0.2, 0.5]
    nbytes = sum(t.numel() * t.element_size() for s in adapters for t in s.values())
    print(f"4 adapters x {len(adapters[0])} tensors, {nbytes / 1e6:.1f} MB of bf16 input, "
          f"torch threads={torch.get_num_threads()}")

    copy_s = best_of(lambda: [t.clone() for s in adapters for t in s.values()], args.repeats)
    copy_gbs = nbytes / copy_s / 1e9
    print(f"plain tensor copy      : {copy_s * 1e3:8.1f} ms  {copy_gbs:6.2f} GB/s")

    mem_s = best_of(lambda: merge_state_dicts(adapters, weights), args.repeats)
    mem_gbs = nbytes / mem_s / 1e9
    print(f"in-memory merge        : {mem_s * 1e3:8.1f} ms  {mem_gbs:6.2f} GB/s  "
          f"({mem_gbs / copy_gbs:.2f}x copy throughput)")

    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16,
              "target_modules": list(SHAPES), "base_model_name_or_path": "google/gemma-7b"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, s in enumerate(adapters):
            paths.append(os.path.join(tmp, f"adapter{i}"))
            save_adapter(paths[-1], s, config)
        out = os.path.join(tmp, "merged")
        disk_s = best_of(lambda: lora_merge(weights, paths, out, "cpu"), args.repeats)
    disk_gbs = nbytes / disk_s / 1e9
    print(f"lora_merge (disk, fsync): {disk_s * 1e3:6.1f} ms  {disk_gbs:6.2f} GB/s  "
          f"({disk_gbs / copy_gbs:.2f}x copy throughput)")


if __name__ == "__main__":
    main()
