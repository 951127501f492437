"""The published BWR search loop as it really runs, re-implemented for timing on the tiny population (issue #17).

The published code (RKS-2804/test-fin at 75897bc: search.py, evaluate.py, merge.py) is followed step by step; only
what it does is timed, nothing of it is copied. What one search does there, and here:
  - start-up: the driver imports torch/transformers/peft/datasets/wandb, copies the initial experts into
    candidate_i/, then one Pool evaluates them all (evaluate(..., save_dev_flag=True) writes scores_dev.json);
  - every iteration, three pools of one process each (--num_cpu_when_merging 1, one device), created and joined one
    after the other with torch.multiprocessing's start method set to 'spawn' (a spawned worker re-imports the
    driver's module, so it pays the imports again):
      1. candidate updates, all N in the one worker: a stray candidate (its best is restart_patience x patience
         iterations old) gets a copy of a random other candidate as candidate_i_new; otherwise with r4 > 0.2 the BWR
         step through disk as three lora_merge calls (r1 (best - T random) -> temp_i/part1, -r2 (worst - random) ->
         temp_i/part2, current + step (part1 + part2) -> candidate_i_new), each reading its inputs' safetensors and
         writing the result and a copy of adapter_config.json; with r4 <= 0.2 a uniform random adapter within the
         random candidate's per-tensor max-abs is written;
      2. every current candidate is evaluated again (N evaluations), 3. every candidate_i_new is evaluated
         (N evaluations): 2N per iteration;
    each evaluation: from_pretrained of the base model, load_adapter (transformers' peft integration), tokenizer from
    the base, pad = eos, batches of 10, tokenizer(batch, padding=True).input_ids only (no attention mask),
    generate(max_new_tokens=10, do_sample=False), decode after the prompt, score 1 when the answer is a substring;
  - then a better candidate_i_new replaces candidate_i (rmtree + rename), the others are deleted; best/ and worst/
    are copied again (copytree) when they change; utility_scratchpad.json is rewritten.
Adaptations to this machine, all in the published path's favour or neutral: the device is the CPU in float32 (the
published code needs a GPU and loads float16; float32 is what our CPU worker runs, so forward passes compare);
trl, scikit-learn and googleapiclient are not installed here, so a spawned worker re-imports less than the published
one does (torch, transformers, peft, safetensors, datasets, wandb, tqdm); W&B logging is left out; the tokenizer
pads on the left (Gemma's tokenizer does by default; the tiny one's default is the right; the shapes, hence the
timing, are the same); random is seeded per step so that runs repeat (spawned workers get an unseeded one there).
The published exact-match scorer sleeps 0.2 s after each correct answer (evaluate.py, exact_match branch): that is
not done here; the seconds it would add are counted and reported apart (sleep_artefact), never in the wall time.

    python benchmarks/published_baseline.py --out DIR -m 3 [--start_method spawn|fork]   # prints one JSON line
"""
# The imports a spawned pool worker pays again (the published search.py imports these at module level).
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import datasets  # noqa: F401  (imported by the published search.py and evaluate.py)
import torch
import tqdm  # noqa: F401
import wandb  # noqa: F401
from peft import LoraConfig  # noqa: F401
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SLEEP_PER_CORRECT = 0.2  # the published exact-match scorer's time.sleep after each correct answer
BATCH_SIZE, MAX_NEW_TOKENS = 10, 10  # the published exact-match settings (all datasets but nlgraph and gsm8k)


# ----------------------------------------------------------------------------------------------------------------
# merge through disk (the published lora_merge with directly_load_safetensors=1, weighted average)

def disk_merge(weights, sources, output):
    state_dicts = [load_file(os.path.join(s, "adapter_model.safetensors"), device="cpu") for s in sources]
    merged = {key: weights[0] * value for key, value in state_dicts[0].items()}
    for w, state in zip(weights[1:], state_dicts[1:]):
        for key, value in state.items():
            merged[key] += w * value
    os.makedirs(output, exist_ok=True)
    save_file(merged, os.path.join(output, "adapter_model.safetensors"))
    shutil.copy(os.path.join(sources[0], "adapter_config.json"), os.path.join(output, "adapter_config.json"))


# ----------------------------------------------------------------------------------------------------------------
# one evaluation: everything loaded for this candidate alone

def evaluate(adapter, base_model, dev, save_dev_flag, threads):
    if threads:  # 0: torch's default, one per core, as the published code (which sets none)
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.load_adapter(adapter)
    model.to("cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    load = time.perf_counter() - t0
    prompts = [item["question"] for item in dev]
    outputs, forward = [], 0.0
    for b in range(math.ceil(len(prompts) / BATCH_SIZE)):
        input_ids = tokenizer(prompts[b * BATCH_SIZE:(b + 1) * BATCH_SIZE], return_tensors="pt", padding=True).input_ids
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        forward += time.perf_counter() - start
        outputs += [tokenizer.decode(row[len(input_ids[j]):], skip_special_tokens=True).strip()
                    for j, row in enumerate(output)]
    scores = [int(item["answer"] in output) for item, output in zip(dev, outputs)]
    if save_dev_flag:
        with open(os.path.join(adapter, "scores_dev.json"), "w") as f:
            json.dump(scores, f)
    return {"utility": sum(scores) / len(scores), "load": load, "forward": forward,
            "total": time.perf_counter() - t0, "correct": sum(scores)}


# ----------------------------------------------------------------------------------------------------------------
# one candidate update (runs in the update pool's worker)

def candidate_update(i, root, step_length, restart, seed):
    t0 = time.perf_counter()
    rng = random.Random(seed)
    candidate = os.path.join(root, f"candidate_{i}")
    new = candidate + "_new"
    others = [j for j in range(len(os.listdir(root))) if j != i and os.path.isdir(os.path.join(root, f"candidate_{j}"))]
    if restart:
        shutil.rmtree(new, ignore_errors=True)
        shutil.copytree(os.path.join(root, f"candidate_{rng.choice(others)}"), new)
        return {"merge": time.perf_counter() - t0, "kind": "restart"}
    r1, r2, r3, r4 = (rng.uniform(0, 1) for _ in range(4))
    T = rng.choice([1, 2])
    other = os.path.join(root, f"candidate_{rng.choice(others)}")
    best, worst, temp = os.path.join(root, "best"), os.path.join(root, "worst"), os.path.join(root, f"temp_{i}")
    os.makedirs(temp, exist_ok=True)
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    if r4 > 0.2:
        disk_merge([r1, -r1 * T], [best, other], os.path.join(temp, "part1"))
        disk_merge([-r2, r2], [worst, other], os.path.join(temp, "part2"))
        disk_merge([1, step_length, step_length], [candidate, os.path.join(temp, "part1"), os.path.join(temp, "part2")],
                   new)
        kind = "bwr"
    else:  # exploration: uniform within the random candidate's per-tensor bounds
        state = load_file(os.path.join(other, "adapter_model.safetensors"), device="cpu")
        generator = torch.Generator().manual_seed(seed)
        fresh = {}
        for name, tensor in state.items():
            bound = float(tensor.abs().max())
            fresh[name] = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * 2 * bound - bound
        save_file(fresh, os.path.join(new, "adapter_model.safetensors"))
        shutil.copy(os.path.join(other, "adapter_config.json"), os.path.join(new, "adapter_config.json"))
        kind = "explore"
    return {"merge": time.perf_counter() - t0, "kind": kind}


# ----------------------------------------------------------------------------------------------------------------
# the loop

def run_pool(ctx, function, args):
    """One pool of one process, as the published loop creates for each step: returns (results, pool seconds)."""
    start = time.perf_counter()
    pool = ctx.Pool(processes=1)
    results = pool.starmap(function, args, chunksize=max(1, len(args)))
    pool.close()
    pool.join()
    return results, time.perf_counter() - start


def write_scratchpad(root, scratchpad):
    with open(os.path.join(root, "utility_scratchpad.json"), "w") as f:
        json.dump(scratchpad, f, indent=4)


def search(args, t_process):
    ctx = get_context(args.start_method)
    root = os.path.join(args.out, "search")
    os.makedirs(root)
    dev = json.loads((REPO / "data" / "eval" / f"{args.dataset}.json").read_text())["dev"]
    experts = sorted(os.path.join(args.experts, p) for p in os.listdir(args.experts)
                     if os.path.isfile(os.path.join(args.experts, p, "adapter_config.json")))
    n = len(experts)
    base = os.path.abspath(args.base)

    # start-up: copy the experts, evaluate them all in one pool, record best/ and worst/
    t_imports = time.perf_counter() - t_process
    start = time.perf_counter()
    for i, expert in enumerate(experts):
        shutil.copytree(expert, os.path.join(root, f"candidate_{i}"))
    initial, pool_wall = run_pool(ctx, evaluate, [(os.path.join(root, f"candidate_{i}"), base, dev, True,
                                                   args.threads) for i in range(n)])
    utilities = [r["utility"] for r in initial]
    scratchpad = {"best": max(utilities), "worst": min(utilities), "history": [max(utilities)]}
    for i, u in enumerate(utilities):
        scratchpad[f"candidate_{i}"], scratchpad[f"candidate_{i}_history"] = u, [u]
    write_scratchpad(root, scratchpad)
    shutil.copytree(os.path.join(root, f"candidate_{utilities.index(max(utilities))}"), os.path.join(root, "best"))
    shutil.copytree(os.path.join(root, f"candidate_{utilities.index(min(utilities))}"), os.path.join(root, "worst"))
    startup = {"imports": t_imports, "initial_evaluation": time.perf_counter() - start,
               "initial_pool_overhead": pool_wall - sum(r["total"] for r in initial)}

    step_length, iterations = args.step_length, []
    for k in range(1, args.max_iteration + 1):
        t0 = time.perf_counter()
        history = scratchpad["history"]
        if len(history) > args.patience and len(set(history[-args.patience:])) == 1:
            break
        restarts = []
        for i in range(n):
            h = scratchpad[f"candidate_{i}_history"]
            restarts.append(len(h) - h.index(max(h)) >= args.restart_patience * args.patience)
        updates, update_wall = run_pool(ctx, candidate_update, [(i, root, step_length, restarts[i],
                                                                 args.seed * 100003 + k * 101 + i) for i in range(n)])
        current, current_wall = run_pool(ctx, evaluate, [(os.path.join(root, f"candidate_{i}"), base, dev, False,
                                                          args.threads) for i in range(n)])
        fresh_ids = [i for i in range(n) if os.path.exists(os.path.join(root, f"candidate_{i}_new"))]
        fresh, fresh_wall = [], 0.0  # the published loop starts this pool only when there is something new
        if fresh_ids:
            fresh, fresh_wall = run_pool(ctx, evaluate, [(os.path.join(root, f"candidate_{i}_new"), base, dev, False,
                                                          args.threads) for i in fresh_ids])
        results = [r["utility"] for r in current]
        new_utility = dict(zip(fresh_ids, (r["utility"] for r in fresh)))
        for i in range(n):
            old_path, new_path = os.path.join(root, f"candidate_{i}"), os.path.join(root, f"candidate_{i}_new")
            if i in new_utility and new_utility[i] > results[i]:
                shutil.rmtree(old_path)
                os.rename(new_path, old_path)
                results[i] = new_utility[i]
            elif i in new_utility:
                shutil.rmtree(new_path)
            scratchpad[f"candidate_{i}"] = results[i]
            scratchpad[f"candidate_{i}_history"].append(results[i])
        if max(results) > scratchpad["best"]:
            scratchpad["best"] = max(results)
            shutil.copytree(os.path.join(root, f"candidate_{results.index(max(results))}"), os.path.join(root, "best"),
                            dirs_exist_ok=True)
        scratchpad["history"].append(scratchpad["best"])
        if min(results) < scratchpad["worst"]:
            scratchpad["worst"] = min(results)
            for i in range(n):
                if results[i] == scratchpad["worst"]:
                    shutil.copytree(os.path.join(root, f"candidate_{i}"), os.path.join(root, "worst"),
                                    dirs_exist_ok=True)
        write_scratchpad(root, scratchpad)
        step_length = max(step_length * 0.95, 0.1)
        evaluations = current + fresh
        wall = time.perf_counter() - t0
        busy = sum(u["merge"] for u in updates) + sum(e["total"] for e in evaluations)
        iterations.append({
            "wall": wall, "candidates": n, "evaluations": len(evaluations),
            "merge": sum(u["merge"] for u in updates), "load": sum(e["load"] for e in evaluations),
            "forward": sum(e["forward"] for e in evaluations),
            "pool_overhead": update_wall + current_wall + fresh_wall - busy,
            "sleep_artefact": SLEEP_PER_CORRECT * sum(e["correct"] for e in evaluations),
            "kinds": [u["kind"] for u in updates]})
    return {"start_method": args.start_method, "startup": startup, "iterations": iterations,
            "initial_sleep_artefact": SLEEP_PER_CORRECT * sum(r["correct"] for r in initial)}


def main():
    t_process = float(os.environ.get("BENCH_T0", time.time()))
    t_process = time.perf_counter() - (time.time() - t_process)  # process start on the perf_counter clock
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="an empty or missing folder for the search's files")
    parser.add_argument("-i", "--experts", default=str(REPO / "initial_experts" / "tiny" / "experts"))
    parser.add_argument("-b", "--base", default=str(REPO / "initial_experts" / "tiny" / "base_model"))
    parser.add_argument("-d", "--dataset", default="tiny_demo", help="a data/eval/NAME.json with question/answer")
    parser.add_argument("-m", "--max_iteration", type=int, default=3)
    parser.add_argument("-p", "--patience", type=int, default=6)
    parser.add_argument("--restart_patience", type=float, default=0.5)
    parser.add_argument("--step_length", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each pool worker; 0: torch's default (one per core), as published")
    parser.add_argument("--start_method", choices=("spawn", "fork"), default="spawn",
                        help="spawn: as published (torch.multiprocessing.set_start_method('spawn')); fork: a lower "
                             "bound, pool workers inherit the driver's imports")
    args = parser.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"published_baseline.py: error: --out {args.out} is not empty; give a new folder")
    print(json.dumps(search(args, t_process)))


if __name__ == "__main__":
    main()
