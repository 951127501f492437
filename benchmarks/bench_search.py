"""How long is a search iteration, how much of it is model forward passes, and how does it scale? (issue #8)

On the tiny population, on CPU, through the real search.py (a subprocess per run; the figures come from the
per-iteration profile it records in state.json and log.txt):
  1. 10 candidates on the default dev set (data/eval/tiny_demo.json), search_demo.sh's settings: seconds per
     iteration and the share spent in forward passes (target >= 90%), with the profile's other parts;
  2. the published strategy on the same population, data and machine: a fresh process per step that merges every
     candidate through disk (lora_merge) and loads the base model and the merged adapter for each evaluation;
     ratio of seconds per iteration (target: ours >= 5x faster);
  3. scaling: 10/20/40 candidates x 50/100/200 dev items (generated tiny_demo items), least-squares fit of
     s/iteration = intercept + slope * candidates * items; and 1 vs 2 CPU workers;
  4. memory: peak resident memory (VmHWM) of the worker over 20 iterations, after the first vs after the last;
  5. peft mixed-adapter batches (10 adapters loaded, adapter_names= per row in generate) vs one candidate at a
     time (the search's way: adapter copied into the resident model, then batched generation), 10 candidates.
Figures are printed; nothing is asserted. The GPU benchmark (Gemma-7B shape) is benchmarks/bench_gpu.py.

Every process gets OMP_NUM_THREADS=--threads (default 1): on a machine shared with other jobs more torch threads
than free cores make the tiny model's many small ops wait for descheduled threads (40-50x slower on a 2-core
machine with one core busy), which would measure the neighbours rather than the search. --threads 0 leaves the
search's own default (cores / workers).

    python benchmarks/bench_search.py                    # everything, about 6-10 minutes on 2 cores
    python benchmarks/bench_search.py --quick            # reduced grid and fewer iterations, about 3 minutes
    python benchmarks/bench_search.py --sections 1,5     # some sections only
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["WANDB_MODE"] = "disabled"

TINY = REPO / "initial_experts" / "tiny"
BASE = TINY / "base_model"
EXPERTS = TINY / "experts"

# One step of the published strategy, as a fresh process: every candidate is merged from the population's folders
# into a new folder (lora_merge: read, merge, write with fsync), then the base model and that adapter are loaded with
# from_pretrained and the dev set is generated with the same batch size and token budget as the search uses.
PUBLISHED_STEP = r"""
import json, math, sys, time
t_start = time.perf_counter()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, sys.argv[2])
import evaluate as ev
from merge import lora_merge
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
rule = ev.exact_match_rule("tiny_demo")
prompts = [x["question"] for x in job["items"]]
golds = [x["answer"] for x in job["items"]]
forward, merging, loading, utilities = 0.0, 0.0, 0.0, []
for c, (weights, out) in enumerate(zip(job["weights"], job["outputs"])):
    start = time.perf_counter()
    lora_merge(weights, job["population"], out, "cpu")
    merging += time.perf_counter() - start
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    tokenizer.padding_side = "left"
    loading += time.perf_counter() - start
    outputs = []
    for i in range(math.ceil(len(prompts) / job["batch_size"])):
        batch = prompts[i * job["batch_size"]:(i + 1) * job["batch_size"]]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out_ids = model.generate(**enc, max_new_tokens=job["max_new_tokens"], do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        forward += time.perf_counter() - start
        outputs += [tokenizer.decode(o[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for o in out_ids]
    scores = [ev.exact_match_score(rule, g, ev.extract_answer(rule, g, o)) for g, o in zip(golds, outputs)]
    utilities.append(sum(scores) / len(scores))
print(json.dumps({"forward": forward, "merge": merging, "load": loading, "utilities": utilities,
                  "process": time.perf_counter() - t_start}))
"""


# ----------------------------------------------------------------------------------------------------------------
# Running the real search

def ensure_inputs():
    """Tiny population and tiny_demo, built if missing (make bench rebuilds them when stale)."""
    if not EXPERTS.is_dir():
        subprocess.run([sys.executable, "initial_experts/expert_init.py", "--tiny"], cwd=REPO, check=True)
    if not (REPO / "data" / "eval" / "tiny_demo.json").is_file():
        subprocess.run([sys.executable, "data/tiny_demo.py"], cwd=REPO, check=True)


def experts():
    return sorted(p for p in EXPERTS.iterdir() if (p / "adapter_config.json").is_file())


def write_dataset(data_dir, dev_items, test_items=20, seed=1):
    """A tiny_demo-format set with dev_items dev questions (the exact-match rule is picked by the name tiny_demo)."""
    from data.tiny_demo import make_items
    items = make_items(dev_items + test_items, seed)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    (Path(data_dir) / "tiny_demo.json").write_text(
        json.dumps({"dataset": "tiny_demo", "dev": items[:dev_items], "test": items[dev_items:]}))


def search_env(threads):
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_search(root, flags, threads, watch_memory=False):
    """Runs search.py to the end; returns (state, log text, memory samples). With watch_memory, the worker's VmHWM
    (peak resident memory so far) and VmRSS are read from /proc after the initial evaluation and after each
    iteration (each new "profile:" line of the log)."""
    root = Path(root)
    args = [sys.executable, "search.py", "-n", "bench", "-e", "exact_match", "-d", "tiny_demo",
            "-i", str(EXPERTS), "-b", str(BASE), "--output_root", str(root), *map(str, flags)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=search_env(threads))
    samples = []
    if watch_memory:
        import psutil
        worker, seen = None, -1
        while proc.poll() is None:
            time.sleep(0.05)
            logs = list(root.glob("*/log.txt"))
            if worker is None:
                try:
                    children = psutil.Process(proc.pid).children(recursive=True)
                    worker = next((c.pid for c in children if "spawn_main" in " ".join(c.cmdline())), None)
                except psutil.Error:
                    pass
            if worker is None or not logs:
                continue
            text = logs[0].read_text()
            done = text.count("profile:") if "starting best" in text else -1
            if done > seen:
                memory = _proc_memory(worker)
                if memory is None:
                    break
                samples.append((done, *memory))
                seen = done
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"search.py {' '.join(map(str, flags))} failed ({proc.returncode}):\n{out[-3000:]}")
    directory = next(p for p in root.iterdir() if p.is_dir())
    state = json.loads((directory / "state.json").read_text())
    return state, (directory / "log.txt").read_text(), samples


def _proc_memory(pid):
    """(VmHWM, VmRSS) in MiB of a live process, from /proc (Linux), or None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return None
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def summarise(state, workers=1):
    """Mean seconds per iteration, forward share and mean profile, over every iteration of the run."""
    profiles = state["profile"]
    keys = [k for k in profiles[0] if isinstance(profiles[0][k], (int, float))]
    mean = {k: sum(p.get(k, 0.0) for p in profiles) / len(profiles) for k in keys}
    walls = sorted(p["wall"] for p in profiles)
    mean["median_wall"] = walls[len(walls) // 2]
    mean["share"] = mean["forward"] / workers / mean["wall"]
    return mean


def restarts_per_iteration(log, iterations):
    return sum(int(n) for n in re.findall(r"restarted (\d+)", log)) / max(1, iterations)


# ----------------------------------------------------------------------------------------------------------------
# 1 and 2: one search iteration, ours and published

def section_search(tmp, iterations, threads):
    print(f"\n[1] search.py, 10-candidate population, default dev set, search_demo.sh settings (-p 6), "
          f"{iterations} iterations")
    state, log, _ = run_search(Path(tmp) / "s1", ["-g", "cpu", "-p", "6", "-m", iterations, "--seed", "42"], threads)
    m = summarise(state)
    n = len(state["candidates"])
    evals = n + restarts_per_iteration(log, len(state["profile"]))
    print(f"  {len(state['profile'])} iterations of {n} candidates (+{evals - n:.1f} restarts on average): "
          f"{m['wall']:.3f} s/iteration (median {m['median_wall']:.3f}), forward share {m['share']:.1%} "
          f"(target >= 90%)")
    print("  mean profile: " + " ".join(f"{k} {m[k]:.3f}s" for k in
                                        ("forward", "evaluate_other", "merge", "swap", "write", "commit", "driver_ipc")))
    return m["wall"], evals


def section_published(tmp, steps, threads, ours, ours_evals):
    import numpy as np
    import bwr
    import evaluate as ev
    print(f"\n[2] published strategy, same population, data and machine: {steps} step(s), each a fresh process that "
          f"merges through disk and loads the base model per evaluation")
    data = json.loads((REPO / "data" / "eval" / "tiny_demo.json").read_text())
    population_dir = Path(tmp) / "published_population"
    population = []
    for path in experts():
        shutil.copytree(path, population_dir / path.name)
        population.append(str(population_dir / path.name))
    n = len(population)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    budget = ev.exact_match_budget(tokenizer, [x["answer"] for x in data["dev"]], ev.exact_match_rule("tiny_demo"))
    rng = np.random.default_rng(42)
    utilities = [0.0] * n  # the first step sees an unranked population; only timing matters here
    walls, parts = [], []
    for step in range(steps):
        best, worst = int(np.argmax(utilities)), int(np.argmin(utilities))
        weights = []
        for i in range(n):
            update = bwr.bwr_update(i, best, worst, n, 1.0, rng, "scaled_random")
            weights.append([float(w) for w in update["weights"]])
        outputs = [str(Path(tmp) / f"published_step{step}" / f"candidate_{i}") for i in range(n)]
        job = Path(tmp) / "published_job.json"
        job.write_text(json.dumps({"threads": max(threads, 1), "items": data["dev"], "weights": weights,
                                   "outputs": outputs, "population": population, "base": str(BASE),
                                   "batch_size": 32, "max_new_tokens": budget}))
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PUBLISHED_STEP, str(job), str(REPO)], check=True,
                             capture_output=True, text=True, env=search_env(threads))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # greedy acceptance through disk, as the published code keeps its population in folders
        for i, u in enumerate(result["utilities"]):
            if u >= utilities[i] or step == 0:
                shutil.rmtree(population[i])
                shutil.copytree(outputs[i], population[i])
                utilities[i] = u
        walls.append(time.perf_counter() - start)
        parts.append(result)
    wall = sum(walls) / len(walls)
    mean = {k: sum(p[k] for p in parts) / len(parts) for k in ("forward", "merge", "load", "process")}
    rest = wall - mean["forward"] - mean["merge"] - mean["load"]
    print(f"  {wall:.3f} s/iteration ({n} candidates): forward {mean['forward']:.3f}s, merges through disk "
          f"{mean['merge']:.3f}s, model loads {mean['load']:.3f}s, the rest (process start, imports, tokenising, "
          f"population copies) {rest:.3f}s; forward share {mean['forward'] / wall:.1%}")
    # ours may have evaluated restarts on top of its n candidates: compare per candidate evaluation as well
    print(f"  ours {ours:.3f} s/iteration -> {wall / ours:.1f}x faster per iteration, "
          f"{(wall / n) / (ours / ours_evals):.1f}x per candidate evaluation (target >= 5x)")


# ----------------------------------------------------------------------------------------------------------------
# 3: scaling

def section_scaling(tmp, candidates, items, iterations, threads):
    import numpy as np
    print(f"\n[3] scaling: candidates {candidates} x dev items {items}, {iterations} iterations each "
          f"(no restarts, so every iteration is exactly one evaluation per candidate)")
    rows = []
    print(f"  {'cand':>5} {'items':>6} {'cand*items':>10} {'s/iter':>8} {'forward':>8} {'share':>7}")
    for n in candidates:
        for count in items:
            data_dir = Path(tmp) / f"data_{count}"
            write_dataset(data_dir, count)
            state, _, _ = run_search(Path(tmp) / f"scale_{n}_{count}",
                                     ["-g", "cpu", "-m", iterations, "-p", 100000, "--restart_stray_candidates", 0,
                                      "--populate_initial_experts", 1, "--initial_experts_num", n,
                                      "--data_dir", data_dir], threads)
            size = len(state["candidates"])
            m = summarise(state)
            rows.append((size, count, m["median_wall"]))
            print(f"  {size:>5} {count:>6} {size * count:>10} {m['median_wall']:>8.3f} {m['forward']:>8.3f} "
                  f"{m['share']:>7.1%}")
    x = np.array([r[0] * r[1] for r in rows], dtype=float)
    y = np.array([r[2] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    r2 = 1 - (residual ** 2).sum() / ((y - y.mean()) ** 2).sum()
    print(f"  fit: s/iteration = {intercept:.3f} s + {slope * 1e3:.4f} ms x candidates x items   (R^2 {r2:.4f}, "
          f"largest residual {abs(residual).max():.3f} s)")
    # the same with a per-candidate term (merge, swap, the fixed cost of each generate call): how much of the
    # intercept above is per candidate rather than per iteration
    design = np.stack([np.ones_like(x), [r[0] for r in rows], x], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    print(f"       s/iteration = {a:.3f} s + {b * 1e3:.2f} ms x candidates + {c * 1e3:.4f} ms x candidates x items")


def section_workers(tmp, iterations, threads):
    print(f"\n[3b] 1 vs 2 CPU workers (-g cpu --num_cpu_workers N), 10 candidates x 100 dev items, {iterations} "
          f"iterations, {max(threads, 1) if threads else 'default'} thread(s) per worker, {os.cpu_count()} cores")
    data_dir = Path(tmp) / "data_100"
    write_dataset(data_dir, 100)
    walls = {}
    for workers in (1, 2):
        state, _, _ = run_search(Path(tmp) / f"workers_{workers}",
                                 ["-g", "cpu", "--num_cpu_workers", workers, "-m", iterations, "-p", 100000,
                                  "--restart_stray_candidates", 0, "--data_dir", data_dir], threads)
        m = summarise(state, workers)
        walls[workers] = m["median_wall"]
        print(f"  {workers} worker(s): {m['median_wall']:.3f} s/iteration, forward share {m['share']:.1%} "
              f"(forward per worker / wall)")
    print(f"  speed-up with 2 workers: {walls[1] / walls[2]:.2f}x")


# ----------------------------------------------------------------------------------------------------------------
# 4: memory

def section_memory(tmp, iterations, threads):
    print(f"\n[4] worker memory over {iterations} iterations (default dev set)")
    state, _, samples = run_search(Path(tmp) / "memory", ["-g", "cpu", "-m", iterations, "-p", 100000, "--seed", "42"],
                                   threads, watch_memory=True)
    if not samples:
        print("  no /proc memory figures on this system")
        return
    by_iteration = {done: (hwm, rss) for done, hwm, rss in samples}
    first = min(k for k in by_iteration if k >= 1) if any(k >= 1 for k in by_iteration) else None
    last = max(by_iteration)
    if 0 in by_iteration:
        print(f"  after the initial evaluation: peak {by_iteration[0][0]:.1f} MiB, resident {by_iteration[0][1]:.1f} MiB")
    if first is not None:
        print(f"  after iteration {first}: peak {by_iteration[first][0]:.1f} MiB, resident {by_iteration[first][1]:.1f} MiB")
        print(f"  after iteration {last}: peak {by_iteration[last][0]:.1f} MiB, resident {by_iteration[last][1]:.1f} MiB")
        print(f"  growth of the peak from iteration {first} to {last}: "
              f"{by_iteration[last][0] - by_iteration[first][0]:+.1f} MiB "
              f"({len(samples)} samples, {len(state['profile'])} iterations)")


# ----------------------------------------------------------------------------------------------------------------
# 5: mixed-adapter batches

def section_mixed(threads, candidates=10):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig
    import evaluate as ev
    import merge
    torch.set_num_threads(max(threads, 1) if threads else torch.get_num_threads())
    paths = [experts()[i % len(experts())] for i in range(candidates)]
    data = ev.load_data("tiny_demo", "exact_match")["dev"]
    print(f"\n[5] {candidates} candidates x {len(data)} dev items: one candidate at a time vs peft mixed-adapter batches")

    # the search's way: each candidate copied into the resident model's LoRA slot, then batched generation; at the
    # search's default CPU batch size and at the mixed batches' largest size, so that batch size is not what differs
    batches = (32, 32 * candidates)
    loaded = [merge.load_adapter(str(p)) for p in paths]
    ev.evaluate(loaded[0], "exact_match", "tiny_demo", "cpu", str(BASE))  # warm-up: loads the host
    tokenizer = ev.get_host(str(BASE), "cpu").tokenizer
    ids = ev.encode(tokenizer, [x["question"] for x in data])
    budget = ev.exact_match_budget(tokenizer, [x["answer"] for x in data], ev.exact_match_rule("tiny_demo"))
    one_wall = {}
    for batch in batches:
        ev.configure(batch_size=batch)
        start = time.perf_counter()
        one_outputs, forward = [], 0.0
        for state in loaded:
            _, details = ev.evaluate_split(state, "exact_match", "tiny_demo", "cpu", str(BASE), "dev")
            one_outputs.append(details["outputs"])
            forward += details["forward_seconds"]
        one_wall[batch] = time.perf_counter() - start
        print(f"  one candidate at a time, batches of {batch:>3} rows: {one_wall[batch]:.3f} s "
              f"(forward {forward:.3f} s)")
    ev.configure(batch_size=None)

    # all candidates' adapters loaded side by side; each row names its adapter
    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="c0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(str(path), adapter_name=f"c{i}")
    model.eval()
    pad = tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=model.generation_config.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    rows = [(c, i) for c in range(candidates) for i in range(len(ids))]
    rows.sort(key=lambda r: -len(ids[r[1]]))  # as the search does: similar lengths share a batch
    for batch in batches:
        outputs = [[None] * len(ids) for _ in range(candidates)]
        start = time.perf_counter()
        for b in range(0, len(rows), batch):
            chunk = rows[b:b + batch]
            input_ids, mask = ev._left_pad([ids[i] for _, i in chunk], pad, torch.device("cpu"))
            with torch.inference_mode():
                generated = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                           adapter_names=[f"c{c}" for c, _ in chunk])
            for (c, i), tokens in zip(chunk, generated[:, input_ids.shape[1]:].tolist()):
                outputs[c][i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        wall = time.perf_counter() - start
        same = sum(a == b for c in range(candidates) for a, b in zip(outputs[c], one_outputs[c]))
        print(f"  mixed-adapter batches of {batch:>3} rows: {wall:.3f} s -> {one_wall[batch] / wall:.2f}x the speed of "
              f"one at a time at that batch size, {one_wall[32] / wall:.2f}x the search's default (batches of 32); "
              f"{same}/{len(rows)} outputs identical")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid and fewer iterations (a smoke test)")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (default all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every process (default 1; 0: the search's own default)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",")}
    ensure_inputs()
    demo = json.loads((REPO / "data" / "eval" / "tiny_demo.json").read_text())
    print(f"tiny population: {len(experts())} experts; tiny_demo dev {len(demo['dev'])} items; {os.cpu_count()} CPU "
          f"cores; {args.threads or 'default'} thread(s) per process; load average {os.getloadavg()[0]:.2f}")
    quick = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in sections or "2" in sections:
            ours, evals = section_search(tmp, 3 if quick else 10, args.threads)
            if "2" in sections:
                section_published(tmp, 1 if quick else 3, args.threads, ours, evals)
        if "3" in sections:
            section_scaling(tmp, [10, 20] if quick else [10, 20, 40], [50, 100] if quick else [50, 100, 200],
                            2 if quick else 3, args.threads)
            section_workers(tmp, 2 if quick else 4, args.threads)
        if "4" in sections:
            section_memory(tmp, 5 if quick else 20, args.threads)
        if "5" in sections:
            section_mixed(args.threads)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other jobs on this machine slow every figure)")


if __name__ == "__main__":
    main()
