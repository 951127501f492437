"""--early_reject against full evaluation, seed by seed, on the demo (search_demo.sh's settings, 15 iterations).

    .venv/bin/python benchmarks/bench_early_reject.py                      # seeds 42 1 2 3 4, exact and ALPHA 0.01
    .venv/bin/python benchmarks/bench_early_reject.py --seeds 42 --alphas 0.01 0.05 -- --num_cpu_when_merging 1
    .venv/bin/python benchmarks/bench_early_reject.py --repetitions 3   # wall times paired over 3 interleaved runs
    .venv/bin/python benchmarks/bench_early_reject.py --chunk_cost        # a full evaluation, chunked against one pass

Per seed, one run without --early_reject and one per mode, each through search.py as a subprocess, one at a time;
--repetitions R runs them R times, interleaved (full, exact, ALPHA, full, ...), for the wall times of a shared
machine. The table gives for each seed and mode: whether utility_scratchpad.json, global_best/'s weights and
final_metrics.json (timings and item counts aside) are byte-identical to the full run's (in every repetition); the
dev items its iterations scored against a full evaluation of every proposal (and the ratio, beside the most that any
rule could save on that run: every kept proposal scored in full, every other one stopped at the first look); the
mean and median wall seconds per iteration (from state.json's profile; the medians over the repetitions); and the
ending test gain over the starting best with its paired SE. The last lines give each mode's speed-up per iteration,
paired by seed and repetition. Extra search.py arguments go after --.

--chunk_cost times, for each demo expert, the expert scored in full as a proposal through the worker's chunked path
(TaskRunner._evaluate_until_rejected) against a member one item below it (so it is never stopped; the population:
all ten), in a new rejection order for each of 7 repetitions (as each proposal of a search has its own), against one
pass over the dev set (medians of the 7, in this process, at the threads torch was given).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bwr  # noqa: E402  (pure: numpy only)

DEMO = ["-e", "exact_match", "-d", "tiny_demo", "-g", "cpu", "-i", "initial_experts/tiny/experts",
        "-b", "initial_experts/tiny/base_model", "-p", "6", "-m", "15", "--step_length", "1.0",
        "--reset_mode", "bounds", "--scoring", "strict"]


def run(root, name, seed, flags, extra):
    args = [sys.executable, "search.py", "-n", name, "--output_root", root, "--seed", str(seed), *DEMO, *flags, *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench_early_reject: {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    directory = os.path.join(root, next(d for d in os.listdir(root) if d.startswith(name + "_") or d == name))
    state = json.load(open(os.path.join(directory, "state.json")))
    walls = [p["wall"] for p in state["profile"]]
    return {"dir": directory, "seconds": time.perf_counter() - start, "state": state,
            "metrics": json.load(open(os.path.join(directory, "final_metrics.json"))),
            "wall_mean": statistics.mean(walls), "wall_median": statistics.median(walls)}


def comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("dev_items") and "seconds" not in k
            and "time" not in k}


def same_bytes(a, b):
    files = ("utility_scratchpad.json", os.path.join("global_best", "adapter_model.safetensors"))
    equal = all(open(os.path.join(a["dir"], f), "rb").read() == open(os.path.join(b["dir"], f), "rb").read()
                for f in files)
    return equal and comparable(a["metrics"]) == comparable(b["metrics"])


def ceiling(result):
    """The most items any rule could save on this run: every kept proposal scored in full (they always are), every
    other one stopped at the first look (bwr.EARLY_REJECT_LOOKS[0], 25% of the items)."""
    log = open(os.path.join(result["dir"], "log.txt")).read()
    kept = log.count(": proposal kept,") + log.count(": restarted (stray)")
    total = result["metrics"]["dev_items_full_evaluation"]
    per_proposal = total // (kept + log.count(": proposal not kept,") + log.count(", not above its"))
    first_look = bwr.EARLY_REJECT_LOOKS[0]
    return total / (kept * per_proposal + (total / per_proposal - kept) * per_proposal * first_look)


def row(seed, label, results, full):
    """One table line for a seed and mode from its repetitions (the items and bytes are the same in every one)."""
    m = results[0]["metrics"]
    items = m.get("dev_items_evaluated")
    total = m.get("dev_items_full_evaluation")
    shown = (f"{items:>7d} / {total:<7d} {total / items:5.2f}x (at most {ceiling(results[0]):.2f}x)" if items
             else f"{'(all)':>38s}")
    gain = f"{m['test_gain_over_starting_best']:+.4f} ± {m['test_gain_paired_se']:.4f}"
    diff = m["ending_best_single_test_accuracy"] - full["metrics"]["ending_best_single_test_accuracy"]
    same = all(same_bytes(r, full) and r["metrics"].get("dev_items_evaluated") == items for r in results)
    walls = (statistics.median(r["wall_mean"] for r in results), statistics.median(r["wall_median"] for r in results))
    print(f"| {seed:>4} | {label:<11} | {'yes' if same else 'no':>9} | {shown} | "
          f"{walls[0]:.3f} / {walls[1]:.3f} | {gain} | {diff:+.4f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01], help="statistical modes to run")
    p.add_argument("extra", nargs="*", help="search.py arguments for every run (after --)")
    p.add_argument("--repetitions", type=int, default=1, help="runs of each seed and mode, interleaved")
    p.add_argument("--chunk_cost", action="store_true", help="time a chunked full evaluation against one pass")
    a = p.parse_args()
    if a.repetitions < 1:
        p.error("--repetitions must be at least 1")
    if a.chunk_cost:
        return chunk_cost()
    modes = [("exact", ["--early_reject"])] + [(f"alpha {x:g}", ["--early_reject", str(x)]) for x in a.alphas]
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}, load {os.getloadavg()[0]:.2f}, "
          f"{a.repetitions} repetition(s)")
    print("| seed | mode        | same bytes | dev items scored / full, fewer (ceiling) | s per iteration mean / median | "
          "test gain ± paired SE | test vs full |")
    print("|---|---|---|---|---|---|---|")
    totals = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in a.seeds:
            runs = {"full": []} | {label: [] for label, _ in modes}
            for rep in range(a.repetitions):
                for label, flags in [("full", [])] + modes:
                    runs[label].append(run(root, f"{label.replace(' ', '')}{seed}r{rep}", seed, flags, a.extra))
            full = runs["full"][0]
            row(seed, "full", runs["full"], full)
            for label, _ in modes:
                row(seed, label, runs[label], full)
                t = totals.setdefault(label, {"items": 0, "total": 0, "ratios": [], "walls": [], "full_walls": []})
                t["items"] += runs[label][0]["metrics"]["dev_items_evaluated"]
                t["total"] += runs[label][0]["metrics"]["dev_items_full_evaluation"]
                # a slow iteration of a busy machine moves a mean more than a median
                t["ratios"] += [f["wall_median"] / r["wall_median"] for f, r in zip(runs["full"], runs[label])]
                t["walls"].append(statistics.median(r["wall_median"] for r in runs[label]))
                t["full_walls"].append(statistics.median(f["wall_median"] for f in runs["full"]))
    for label, t in totals.items():
        print(f"{label}: {t['total'] / t['items']:.2f}x fewer dev items over {len(a.seeds)} seeds; "
              f"{statistics.median(t['ratios']):.2f}x faster per iteration (median of {len(t['ratios'])} ratios paired "
              f"by seed and repetition, {min(t['ratios']):.2f}-{max(t['ratios']):.2f}x; "
              f"{statistics.mean(t['walls']):.3f} s against {statistics.mean(t['full_walls']):.3f} s: means over the "
              f"seeds of the median over repetitions of each run's median iteration)")


def chunk_cost():
    """Seconds of a full evaluation in chunks against one pass, per demo expert (median of 7 each)."""
    import torch
    import merge
    from workers import EarlyReject, TaskRunner
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    experts_dir = os.path.join(REPO, "initial_experts", "tiny", "experts")
    runner = TaskRunner("cpu", {"base_model": os.path.join(REPO, "initial_experts", "tiny", "base_model"),
                                "eval_type": "exact_match", "dataset": "tiny_demo",
                                "evaluate_options": {"data_dir": os.path.join(REPO, "data", "eval"),
                                                     "scoring": "strict"}})
    experts = [merge.load_adapter(os.path.join(experts_dir, name)) for name in sorted(os.listdir(experts_dir))]
    population = [runner._evaluate(adapter, "dev")[1]["scores"] for adapter in experts]
    print(f"threads: torch {torch.get_num_threads()}, ATEN_CPU_CAPABILITY="
          f"{os.environ.get('ATEN_CPU_CAPABILITY', 'default')}, load {os.getloadavg()[0]:.2f}")
    print("| member | dev accuracy | chunks | one pass s | chunked s | ratio |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for k, (adapter, scores) in enumerate(zip(experts, population)):
        # the expert is the proposal, against a member one item below it: never stopped, it is scored to the end
        # through the worker's own chunked path, with the looks that a member of this expert's scores gets
        member = list(scores)
        member[member.index(1.0)] = 0.0

        def chunked(rep):
            """Chunks scored: each proposal of a search has its own order, so its chunks are new sets of rows."""
            order, groups = bwr.rejection_order(member, population, (0.0, 1.0), [42, 29, rep, k, 0])
            early = EarlyReject(alpha=0.0, member_scores=tuple(member), score_range=(0.0, 1.0), order=tuple(order),
                                groups=tuple(groups), integer_scores=True)
            counts = runner._evaluate_until_rejected(adapter, "dev", early)[3]
            assert counts == {"dev_items": len(member), "rejected_early": False}, counts
            return len(bwr.early_reject_chunks(member, 1.0, 0.0, 0.0, groups, integer=True))
        one, parts = [], []
        for rep in range(7):
            start = time.perf_counter()
            runner._evaluate(adapter, "dev")
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            n_chunks = chunked(rep)
            parts.append(time.perf_counter() - start)
        ratio = statistics.median(parts) / statistics.median(one)
        ratios.append(ratio)
        print(f"| {k} | {statistics.mean(scores):.3f} | {n_chunks} | {statistics.median(one):.4f} | "
              f"{statistics.median(parts):.4f} | {ratio:.2f}x |")
    print(f"a full evaluation in chunks costs {statistics.median(ratios):.2f}x one pass (median over the experts)")


if __name__ == "__main__":
    main()
