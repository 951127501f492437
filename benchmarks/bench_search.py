"""How long is a search iteration, how much of it is model forward passes, and how does it compare with the
published code path as it really runs? (issues #8, #17)

On the tiny population, on CPU, through the real search.py (a subprocess per run; the figures come from the
per-iteration profile it records in state.json and log.txt):
  1. side by side, interleaved, --repetitions times: search_demo.sh -m --iterations (this project, the demo's
     settings) and benchmarks/published_baseline.py (the published search loop step by step: three one-process pools
     per iteration, started with 'spawn' as published and, as a lower bound, with 'fork' from the imported driver;
     three lora_merge calls through disk per candidate; 2N evaluations per iteration, each loading the base model,
     the adapter and the tokenizer, batches of 10, 10 new tokens). Seconds per iteration, per candidate and per
     evaluation, median (min-max) over the repetitions, the forward share, each path's profile and the machine's
     load (1-minute os.getloadavg before and after each run); the published scorer's 0.2 s sleep per correct answer
     is reported apart and is not in any figure;
  2. (from the same runs) the start-up before the first iteration: driver imports and checks, worker spawn and
     model load, initial evaluation; and the published loop's;
  3. scaling: 10/20/40 candidates x 50/100/200 dev items (generated tiny_demo items), least-squares fit of
     s/iteration = intercept + slope * candidates * items; and 1 vs 2 CPU workers;
  4. memory: peak resident memory (VmHWM) of the worker over 20 iterations, after the first vs after the last;
  5. peft mixed-adapter batches (10 adapters loaded, adapter_names= per row in generate) vs one candidate at a
     time (the search's way: adapter copied into the resident model, then batched generation), 10 candidates.
  6. (--before DIR) this checkout's search_demo.sh against another checkout's (before / after a change), interleaved:
     seconds per iteration, forward share and start-up, paired ratios.
Figures are printed; nothing is asserted. The GPU benchmark (Gemma-7B shape) is benchmarks/bench_gpu.py.

Every process gets OMP_NUM_THREADS=--threads (default 1): on a machine shared with other jobs more torch threads
than free cores make the tiny model's many small ops wait for descheduled threads (40-50x slower on a 2-core
machine with one core busy), which would measure the neighbours rather than the search. --threads 0 leaves each
program its own default, as on a quiet machine: the search's cores / workers, the published loop's torch default
(one per core; the published code sets none).

    python benchmarks/bench_search.py                    # everything, about 25-40 minutes on 2 busy cores
    python benchmarks/bench_search.py --sections 1       # side by side and start-up only (about 20-30 minutes)
    python benchmarks/bench_search.py --sections 1 --dataset tiny_demo_quick --start_methods fork   # 100 dev items
    python benchmarks/bench_search.py --quick            # one repetition, 'fork' only, reduced grid (a smoke test)
    python benchmarks/bench_search.py --sections 6 --before ../before --iterations 6   # before/after a change
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
    else:  # each program's own default, whatever this shell sets
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
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


# ----------------------------------------------------------------------------------------------------------------
# 1 and 2: this project's search vs the published loop, side by side; start-up

def median_range(values):
    """'median (min-max)' of a list of figures."""
    ordered = sorted(values)
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] +
                                                                   ordered[len(ordered) // 2]) / 2
    return middle, ordered[0], ordered[-1]


def fmt(values, digits=2, unit=""):
    middle, low, high = median_range(values)
    return f"{middle:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def run_ours(root, iterations, threads, repo=REPO, dataset="tiny_demo", extra=()):
    """search_demo.sh -m ITERATIONS (the demo's settings) as a subprocess. Returns the per-iteration profiles, the
    evaluations per iteration (candidates + stray restarts) and the start-up phases, timed by polling log.txt:
    driver (process start to the first log line: imports and argument validation; the worker is spawned part-way
    through and imports its libraries and loads the base model meanwhile), workers (to "initialising": the driver
    waits for the worker to be ready), initial evaluation (to "starting best": every candidate and the starting
    best's test set; whatever of the worker's model load is not done yet falls here). extra: more search.py flags."""
    root = Path(root)
    env = search_env(threads)
    env["PYTHON"] = sys.executable
    marks = {"starting search": "driver", "initialising": "workers", "starting best": "initial_evaluation"}
    seen = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "search_demo.sh", "-m", str(iterations), "-d", dataset, "--output_root", str(root),
                             *extra], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while proc.poll() is None and len(seen) < len(marks):
        time.sleep(0.01)
        logs = list(root.glob("*/log.txt"))
        if logs:
            text = logs[0].read_text()
            for needle, name in marks.items():
                if name not in seen and needle in text:
                    seen[name] = time.perf_counter() - t0
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"search_demo.sh failed ({proc.returncode}):\n{out[-3000:]}")
    directory = next(p for p in root.iterdir() if p.is_dir())
    state = json.loads((directory / "state.json").read_text())
    log = (directory / "log.txt").read_text()
    n = len(state["candidates"])
    restarts = [int(x) for x in re.findall(r"restarted (\d+)", log)]
    startup = {"driver": seen["driver"], "workers": seen["workers"] - seen["driver"],
               "initial_evaluation": seen["initial_evaluation"] - seen["workers"], "total": seen["initial_evaluation"]}
    return {"iterations": state["profile"], "candidates": n,
            "evaluations": n + sum(restarts) / max(1, len(state["profile"])), "startup": startup}


def run_published(root, iterations, threads, start_method, dataset="tiny_demo"):
    env = search_env(threads)
    env["BENCH_T0"] = repr(time.time())
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "published_baseline.py"), "--out", str(root),
                          "-m", str(iterations), "--start_method", start_method, "--threads", str(threads),
                          "-d", dataset],
                         cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"published_baseline.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_side_by_side(tmp, repetitions, iterations, threads, start_methods, dataset="tiny_demo", early_reject=None):
    """Interleaved runs (the order rotates each repetition so that a change of the machine's load hits every
    path alike); for every run the median over its iterations, then median (min-max) over the repetitions.
    early_reject: also this project with --early_reject at that level (0: exact), path "ours_early_reject"."""
    print(f"\n[1] this project (search_demo.sh -m {iterations} -d {dataset}) vs the published loop "
          f"(benchmarks/published_baseline.py, pools started with {' / '.join(start_methods)}), same population, "
          f"dev set and machine, {repetitions} interleaved repetitions; median (min-max) over repetitions of each "
          f"run's median iteration")
    ours_paths = ["ours"] + (["ours_early_reject"] if early_reject is not None else [])
    published_paths = [f"published_{m}" for m in start_methods]
    paths = ours_paths + published_paths
    runs = {p: [] for p in paths}
    for r in range(repetitions):
        for p in paths[r % len(paths):] + paths[:r % len(paths)]:
            load = os.getloadavg()[0]
            root = Path(tmp) / f"{p}_{r}"
            if p in ours_paths:
                extra = ["--early_reject", str(early_reject)] if p == "ours_early_reject" else []
                result = run_ours(root, iterations, threads, dataset=dataset, extra=extra)
                walls = [it["wall"] for it in result["iterations"]]
                share = median_range([it["forward"] / it["wall"] for it in result["iterations"]])[0]
                run = {"wall": median_range(walls)[0], "candidates": result["candidates"],
                       "evaluations": result["evaluations"], "share": share, "startup": result["startup"],
                       "profile": {k: median_range([it[k] for it in result["iterations"]])[0]
                                   for k in result["iterations"][0]}}
            else:
                result = run_published(root, iterations, threads, p.split("_", 1)[1], dataset)
                its = result["iterations"]
                run = {"wall": median_range([it["wall"] for it in its])[0], "candidates": its[0]["candidates"],
                       "evaluations": median_range([it["evaluations"] for it in its])[0],
                       "share": median_range([it["forward"] / it["wall"] for it in its])[0],
                       "startup": result["startup"],
                       "profile": {k: median_range([it[k] for it in its])[0]
                                   for k in ("merge", "load", "forward", "pool_overhead", "sleep_artefact")}}
            run["load"] = (load, os.getloadavg()[0])
            runs[p].append(run)
            print(f"  rep {r + 1} {p:>17}: {run['wall']:7.3f} s/iteration, forward share {run['share']:.1%}, "
                  f"load {run['load'][0]:.1f} -> {run['load'][1]:.1f}", flush=True)
    print(f"\n  {'path':>17} {'s/iteration':>22} {'s/candidate':>22} {'s/evaluation':>22} {'forward share':>16} "
          f"{'load (1 min)':>14}")
    for p in paths:
        rows = runs[p]
        loads = [x for run in rows for x in run["load"]]
        print(f"  {p:>17} {fmt([x['wall'] for x in rows], 3):>22} "
              f"{fmt([x['wall'] / x['candidates'] for x in rows], 4):>22} "
              f"{fmt([x['wall'] / x['evaluations'] for x in rows], 4):>22} "
              f"{fmt([100 * x['share'] for x in rows], 1, '%'):>16} {min(loads):5.1f}-{max(loads):.1f}")
    ours = runs["ours"]
    for p in published_paths:
        ratio = [pub["wall"] / our["wall"] for pub, our in zip(runs[p], ours)]
        per_evaluation = [(pub["wall"] / pub["evaluations"]) / (our["wall"] / our["evaluations"])
                          for pub, our in zip(runs[p], ours)]
        print(f"  {p} / ours, paired by repetition: {fmt(ratio, 1, 'x')} per iteration (= per candidate), "
              f"{fmt(per_evaluation, 1, 'x')} per evaluation")
        if early_reject is not None:
            ratio = [pub["wall"] / our["wall"] for pub, our in zip(runs[p], runs["ours_early_reject"])]
            print(f"  {p} / ours with --early_reject {early_reject}, paired by repetition: {fmt(ratio, 1, 'x')} per "
                  f"iteration")
    print("\n  median profile per iteration (s):")
    for p in paths:
        keys = list(runs[p][0]["profile"])
        print(f"  {p:>17}: " + " ".join(f"{k} {fmt([x['profile'][k] for x in runs[p]], 3)}" for k in keys
                                        if k != "sleep_artefact"))
    for p in published_paths:
        print(f"  {p}: the published scorer's 0.2 s sleep per correct answer would add "
              f"{fmt([x['profile']['sleep_artefact'] for x in runs[p]], 1, ' s')} per iteration (not in the figures "
              f"above)")
    print(f"\n[2] start-up before the first iteration, median (min-max) s over the same runs")
    # the initial evaluation less (candidates + 1) evaluations at the run's own per-evaluation speed estimates what
    # of the worker's set-up (transformers/peft imports, base model load, first LoRA slot) was not done before
    first_use = [x["startup"]["initial_evaluation"] - (x["candidates"] + 1) * x["wall"] / x["evaluations"]
                 for x in ours]
    print(f"  ours: driver (process start to its first log line: imports, argument checks) "
          f"{fmt([x['startup']['driver'] for x in ours])} (the worker starts during it), then waiting for the worker "
          f"{fmt([x['startup']['workers'] for x in ours])}, initial evaluation (10 candidates + the starting best's "
          f"test set; of it, the worker's set-up left over, about "
          f"{fmt(first_use)}) {fmt([x['startup']['initial_evaluation'] for x in ours])}; total "
          f"{fmt([x['startup']['total'] for x in ours])}")
    for p in published_paths:
        rows = runs[p]
        print(f"  {p}: driver imports {fmt([x['startup']['imports'] for x in rows])}, initial evaluation pool "
              f"{fmt([x['startup']['initial_evaluation'] for x in rows])} (of which pool start "
              f"{fmt([x['startup']['initial_pool_overhead'] for x in rows])})")
    return runs

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
    # former default CPU batch size and at the mixed batches' largest size, so that batch size is not what differs
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
              f"one at a time at that batch size, {one_wall[32] / wall:.2f}x one at a time in batches of 32 "
              f"(the former CPU default); "
              f"{same}/{len(rows)} outputs identical")


# ----------------------------------------------------------------------------------------------------------------
# 6: this checkout against another one (before / after a change)

def section_before(tmp, before, repetitions, iterations, threads):
    """search_demo.sh -m ITERATIONS from another checkout of this project (e.g. `git worktree add ../before <commit>`)
    and from this one, interleaved (the order alternates, so a change of the machine's load hits both alike): each
    run's median iteration, its forward share and start-up; median (min-max) over the repetitions, paired ratio."""
    before = Path(before).resolve()
    if not (before / "search_demo.sh").is_file():
        raise SystemExit(f"--before {before}: not a checkout of this project (no search_demo.sh)")
    if not (before / "data" / "eval" / "tiny_demo.json").is_file():
        subprocess.run([sys.executable, "data/tiny_demo.py"], cwd=before, check=True)
    print(f"\n[6] search_demo.sh -m {iterations}: {before} (before) vs this checkout, {repetitions} interleaved "
          f"repetitions; median (min-max) over repetitions of each run's median iteration")
    trees = {"before": before, "this": REPO}
    runs = {name: [] for name in trees}
    for r in range(repetitions):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            load = os.getloadavg()[0]
            result = run_ours(Path(tmp) / f"before_{name}_{r}", iterations, threads, repo=trees[name])
            its = result["iterations"]
            run = {"wall": median_range([it["wall"] for it in its])[0],
                   "share": median_range([it["forward"] / it["wall"] for it in its])[0],
                   "startup": result["startup"]["total"], "load": (load, os.getloadavg()[0])}
            runs[name].append(run)
            print(f"  rep {r + 1} {name:>6}: {run['wall']:.3f} s/iteration, forward share {run['share']:.1%}, start-up "
                  f"{run['startup']:.1f} s, load {run['load'][0]:.1f} -> {run['load'][1]:.1f}", flush=True)
    for name, rows in runs.items():
        loads = [x for run in rows for x in run["load"]]
        print(f"  {name:>6}: {fmt([x['wall'] for x in rows], 3)} s/iteration, forward share "
              f"{fmt([100 * x['share'] for x in rows], 1, '%')}, start-up {fmt([x['startup'] for x in rows], 1)} s, "
              f"load {min(loads):.1f}-{max(loads):.1f}")
    print(f"  before / this, paired by repetition: "
          f"{fmt([b['wall'] / t['wall'] for b, t in zip(runs['before'], runs['this'])], 2, 'x')} per iteration, "
          f"{fmt([b['startup'] / t['startup'] for b, t in zip(runs['before'], runs['this'])], 2, 'x')} start-up")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid and fewer iterations (a smoke test)")
    parser.add_argument("--sections", default="1,3,4,5",
                        help="which sections to run (default 1,3,4,5; 1 includes 2, the start-up; 6 needs --before)")
    parser.add_argument("--before", help="section 6: another checkout of this project to compare with")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved repetitions of sections 1 and 6")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run in sections 1 and 6 (-m)")
    parser.add_argument("--start_methods", default="spawn,fork",
                        help="pool start methods of the published loop in section 1 (default both; --quick: fork)")
    parser.add_argument("--dataset", default="tiny_demo",
                        help="section 1's objective, a tiny_demo-format set in data/eval (tiny_demo_quick: 100 dev items)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every process (default 1; 0: each program's own default: the "
                             "search's cores / workers, the published loop's torch default, one per core)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",")}
    ensure_inputs()
    demo = json.loads((REPO / "data" / "eval" / "tiny_demo.json").read_text())
    print(f"tiny population: {len(experts())} experts; tiny_demo dev {len(demo['dev'])} items; {os.cpu_count()} CPU "
          f"cores; {args.threads or 'default'} thread(s) per process; load average {os.getloadavg()[0]:.2f}")
    quick = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in sections:
            section_side_by_side(tmp, 1 if quick else args.repetitions, args.iterations, args.threads,
                                 ["fork"] if quick else [m.strip() for m in args.start_methods.split(",")], args.dataset)
        if "3" in sections:
            section_scaling(tmp, [10, 20] if quick else [10, 20, 40], [50, 100] if quick else [50, 100, 200],
                            2 if quick else 3, args.threads)
            section_workers(tmp, 2 if quick else 4, args.threads)
        if "4" in sections:
            section_memory(tmp, 5 if quick else 20, args.threads)
        if "5" in sections:
            section_mixed(args.threads)
        if "6" in sections:
            if not args.before:
                raise SystemExit("--sections 6 needs --before DIR, another checkout of this project")
            section_before(tmp, args.before, args.repetitions, args.iterations, args.threads)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other jobs on this machine slow every figure)")


if __name__ == "__main__":
    main()
