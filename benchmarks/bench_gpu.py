"""A search iteration at Gemma-7B scale on one GPU, against the roofline (issue #8, benchmark item 5).

GPU only (make bench runs the CPU benchmarks; run this one by hand on a GPU machine). No download: a Gemma-7B-shaped
GemmaForCausalLM (hidden 3072, intermediate 24576, 28 layers, 16 heads of 256, vocab 256000: 8.5B parameters) is
initialised at random in bf16 directly on the GPU, with 20 random rank-8 q/k/v/o LoRA adapters (saved as peft
folders, as the search's population is). One iteration = 20 candidates through the worker's own code
(workers.TaskRunner, exactly what a search worker runs): merge a BWR update of the 20 adapters in memory, copy the
result into the resident model's LoRA slot, greedy left-padded batched generation of 10 new tokens for 200 prompts
of about 350 characters (evaluate.py's exact-match path), score.

Tokens: Gemma's tokenizer cannot be downloaded either. It averages about 4 characters per token on English prose,
so a stand-in tokenizer cuts each prompt into 4-character pieces (ids from a hash of the piece): a 330-370
character prompt becomes 84-94 tokens with the BOS token, about 90. Only lengths matter to the timing.

Printed: seconds per iteration (and its merge / swap / forward / other parts), prefill tokens/s (a run with one new
token), decode ms per step of the whole batch, GPU peak memory, and the ratio to the roofline estimate per iteration
    candidates x (2 x params x prompt tokens / peak bf16 FLOP/s + new tokens x weight bytes / memory bandwidth)
with peak FLOP/s and bandwidth looked up from the device name (H100/H200/A100) or given by --peak_tflops and
--bandwidth_tbs. The roofline reads the weights once per new token, i.e. all prompts in one batch: hence the default
--batch_size 200 (the search's own default is as many prompts as half the GPU's free memory holds by
generation._row_bytes' estimate, about 63 MiB a row for this shape: all 200 on an H100/H200). Target: within 2x
of the roofline. Meant to finish in under 5 minutes on an H100/H200 as one command (it prints its total time);
not yet run on a GPU.

    python benchmarks/bench_gpu.py                                  # GPU 0, Gemma-7B shape
    python benchmarks/bench_gpu.py --shape tiny -g cpu --prompts 20 --candidates 3 --iterations 1   # CPU smoke test
"""
import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

START = time.perf_counter()  # before torch's import: the total printed at the end includes it
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHAPES = {  # GemmaConfig fields
    "gemma-7b": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=256, vocab_size=256000),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16, vocab_size=1000),
}
# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s, memory TB/s), first match wins
DEVICES = [("H200", 989, 4.8), ("H100 NVL", 835, 3.9), ("H100 PCIe", 756, 2.0), ("H100", 989, 3.35),
           ("A100-SXM4-80GB", 312, 2.039), ("A100 80GB PCIe", 312, 1.935), ("A100", 312, 1.555)]
MODEL_NAME = "random-gemma"  # the name the resident model is cached under in evaluate.py
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great old year "
         "off come since against go came right used take three").split()


class PieceTokenizer:
    """Stands in for Gemma's SentencePiece tokenizer: one token per 4 characters, ids 3.. from a hash of the piece."""
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2  # GemmaConfig's defaults
    chat_template = None

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, texts, add_special_tokens=True):
        bos = [self.bos_token_id] if add_special_tokens else []
        return SimpleNamespace(input_ids=[bos + [3 + zlib.crc32(t[i:i + 4].encode()) % (self.vocab_size - 3)
                                                 for i in range(0, len(t), 4)] for t in texts])

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i < 3))


def prompts(count, seed=0):
    """count English-looking prompts of 330-370 characters."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        target = rng.randint(330, 370)
        text = ""
        while len(text) < target:
            text += rng.choice(WORDS) + " "
        out.append(text[:target - 1].rstrip() + "?")
    return out


def random_model(shape, device):
    from transformers import GemmaConfig, GemmaForCausalLM
    config = GemmaConfig(**SHAPES[shape], max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # allocated and initialised where it runs: no 17 GB trip through the host
            model = GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_adapters(model, count, folder, rank=8, seed=0):
    """count peft adapter folders (rank-8 q/k/v/o, bf16, lora_B non-zero so that every candidate differs)."""
    import merge
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "base_model_name_or_path": MODEL_NAME}
    shapes = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in config["target_modules"]:
            shapes[f"base_model.model.{name}"] = (module.in_features, module.out_features)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        state = {}
        for prefix, (fan_in, fan_out) in shapes.items():
            state[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5).to(torch.bfloat16)
            state[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(torch.bfloat16)
        paths.append(os.path.join(folder, f"adapter_{i}"))
        merge.save_adapter(paths[-1], state, config)
    return paths


@contextlib.contextmanager
def resident(model, tokenizer):
    """evaluate.get_host builds its ModelHost with from_pretrained; hand it the random model and the stand-in
    tokenizer instead, so that everything after that is evaluate.py's own code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model), \
            mock.patch.object(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="gemma-7b", choices=sorted(SHAPES))
    parser.add_argument("-g", "--gpu", default="0", help="GPU index, or 'cpu' (smoke test with --shape tiny)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new_tokens", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=200, help="generation batch size (default: all prompts)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations (after one warm-up candidate)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--bandwidth_tbs", type=float, default=None, help="memory TB/s (default: by device name)")
    args = parser.parse_args()

    import bwr
    import evaluate as ev
    import numpy as np
    from workers import CandidateTask, Source, TaskRunner
    gpu = "cpu" if args.gpu == "cpu" else int(args.gpu) if args.gpu.isdigit() else args.gpu
    try:
        device = ev.resolve_device(gpu)
    except ev.EvalError as e:  # no GPU here, or a bad -g: one line (the CPU smoke test is --shape tiny -g cpu)
        print(f"bench_gpu.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak, bandwidth = next(((p, b) for key, p, b in DEVICES if key in name), (None, None))
    peak = args.peak_tflops or peak
    bandwidth = args.bandwidth_tbs or bandwidth

    start = time.perf_counter()
    model = random_model(args.shape, device)
    params = sum(p.numel() for p in model.parameters())
    tokenizer = PieceTokenizer(model.config.vocab_size)
    texts = prompts(args.prompts)
    ids = tokenizer(texts).input_ids
    prompt_tokens = sum(len(row) for row in ids)
    print(f"{name}: {args.shape}-shaped GemmaForCausalLM, {params / 1e6:,.1f}M parameters in bf16, "
          f"initialised in {time.perf_counter() - start:.1f} s; {args.prompts} prompts of {min(map(len, texts))}-"
          f"{max(map(len, texts))} characters = {prompt_tokens / len(ids):.1f} tokens on average "
          f"({prompt_tokens} in all); {args.new_tokens} new tokens; batch size {args.batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        data = {"dataset": "gpu_bench", "dev": [{"question": t, "answer": "x"} for t in texts],
                "test": [{"question": texts[0], "answer": "x"}]}
        Path(tmp, "gpu_bench.json").write_text(json.dumps(data))
        start = time.perf_counter()
        adapters = random_adapters(model, args.candidates, os.path.join(tmp, "population"))
        print(f"{args.candidates} rank-8 q/k/v/o adapters written in {time.perf_counter() - start:.1f} s")
        config = {"base_model": MODEL_NAME, "eval_type": "exact_match", "dataset": "gpu_bench", "fast_merge": 1,
                  "merge_method": "weighted_average", "merge_params": {},
                  "evaluate_options": {"data_dir": tmp, "dtype": "bfloat16", "batch_size": args.batch_size,
                                       "max_new_tokens": args.new_tokens}}
        runner = TaskRunner(gpu, config)
        with resident(model, tokenizer):
            ev.get_host(MODEL_NAME, gpu)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        rng = np.random.default_rng(0)
        n = args.candidates

        def task(i):
            update = bwr.bwr_update(i, 0, n - 1, n, 1.0, rng)
            return CandidateTask(f"candidate_{i}", tuple(Source(p, 0) for p in adapters), update)

        runner.run(task(0))  # warm-up: reads the adapters, builds the LoRA slot, first kernels
        walls, parts = [], []
        for _ in range(args.iterations):
            start = time.perf_counter()
            results = [runner.run(task(i)) for i in range(n)]
            walls.append(time.perf_counter() - start)
            parts.append({k: sum(r["timing"].get(k, 0.0) for r in results) for k in results[0]["timing"]})
        wall = sum(walls) / len(walls)
        mean = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}

        # prefill alone: one new token is the prefill pass itself
        ev.configure(max_new_tokens=1)
        one = runner.run(task(0))["timing"]["forward"]
        ev.configure(max_new_tokens=args.new_tokens)
        full = mean["forward"] / n
        passes = -(-args.prompts // args.batch_size)  # batches per candidate
        decode_step = (full - one) / max(1, args.new_tokens - 1) / passes
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None

    print(f"seconds per iteration ({n} candidates): {wall:.2f} s  (merge {mean['merge']:.2f}, swap {mean['swap']:.2f},"
          f" forward {mean['forward']:.2f}, evaluate_other {mean['evaluate_other']:.2f}; "
          f"forward share {mean['forward'] / wall:.1%})")
    print(f"prefill: {prompt_tokens / one:,.0f} tokens/s ({one:.3f} s for {prompt_tokens} prompt tokens)")
    print(f"decode: {decode_step * 1e3:.1f} ms per step of a {min(args.batch_size, args.prompts)}-row batch "
          f"({decode_step * 1e3 / min(args.batch_size, args.prompts):.3f} ms per token)")
    print(f"GPU peak memory: {memory:.1f} GiB allocated" if memory is not None else "GPU peak memory: n/a (CPU)")
    if peak and bandwidth:
        roofline = n * (2 * params * prompt_tokens / (peak * 1e12) + args.new_tokens * params * 2 / (bandwidth * 1e12))
        print(f"roofline ({peak:g} TFLOP/s bf16, {bandwidth:g} TB/s): {roofline:.2f} s per iteration -> measured "
              f"{wall / roofline:.2f}x the roofline (target <= 2x)")
    else:
        print(f"roofline: unknown peak FLOP/s and bandwidth for {name!r}; give --peak_tflops and --bandwidth_tbs")
    print(f"total {time.perf_counter() - START:.0f} s (target: under 5 minutes)")


if __name__ == "__main__":
    main()
