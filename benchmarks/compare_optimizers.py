"""Every optimizer x several seeds at an equal dev-evaluation budget, through search.py itself, on the demo objective.

    python benchmarks/compare_optimizers.py -j 2                  # bwr (both resets), pso, cma_es, random x 5 seeds
    python benchmarks/compare_optimizers.py --budget 60 --seeds 42 1 -j 2
    python benchmarks/compare_optimizers.py --optimizers bwr "bwr_bounds=bwr --reset_mode bounds" cma_es

Each run is `search.py --optimizer X --seed S --max_evaluations B` with patience and iteration limits out of the way,
so every run spends exactly B dev evaluations (the initial population's included). The table gives, per run and as
means per optimizer: dev and test utility of the starting best (the best initial expert) and of the ending global
best, the test and dev gains with their paired standard errors (from per-item scores, final_metrics.json), the
evaluations used, and for a variant with --early_reject how many times fewer dev items its iterations scored than
full evaluations would have. Extra search.py arguments for every run go after `--`, e.g. `-- --merge_method ties`.
An optimizer entry is a name, or "label=name extra flags" for a variant, e.g. the two BWR rules:

    python benchmarks/compare_optimizers.py --optimizers bwr "published=bwr --rule published_code" -j 2

With two or more variants a second table pairs each one with the first, seed by seed (the same seeds start from the
same population): the difference of their ending bests' test utilities with its item-paired SE (the two global
bests' per-item test scores), then the mean difference over seeds with its SE over seeds.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # records.paired_gain for the paired table
# the demo objective with search_demo.sh's scoring rules
DEMO = ["-e", "exact_match", "-g", "cpu", "-i", "initial_experts/tiny/experts",
        "-b", "initial_experts/tiny/base_model", "--scoring", "strict"]
# BWR as search_demo.sh runs it (Rao's bounds reset), BWR with the seed README's scaled_random reset, and the others
DEFAULT_OPTIMIZERS = ["bwr_bounds=bwr --reset_mode bounds", "bwr", "pso", "cma_es", "random"]
UNLIMITED = ["-m", "100000", "-p", "100000"]  # the budget alone ends every run


def parse_variant(text):
    """'cma_es' -> ('cma_es', ['--optimizer', 'cma_es']); 'bwr_bounds=bwr --reset_mode bounds' -> a labelled one."""
    label, _, spec = text.partition("=")
    words = shlex.split(spec if spec else text)
    return (label if spec else words[0]), ["--optimizer", words[0], *words[1:]]


def run_one(label, flags, seed, budget, root, base_args, extra):
    out = os.path.join(root, f"{label}_seed{seed}")
    os.makedirs(out, exist_ok=True)
    args = [sys.executable, "search.py", "-n", f"{label}_seed{seed}", *base_args, *UNLIMITED, *flags,
            "--seed", str(seed), "--max_evaluations", str(budget), "--output_root", out, *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} seed {seed} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    [directory] = [os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
    with open(os.path.join(directory, "final_metrics.json")) as f:
        metrics = json.load(f)
    # the label names the variant (final_metrics.json's "optimizer" is the --optimizer it ran)
    return {**metrics, "optimizer": label, "seed": seed, "seconds": time.time() - start, "directory": directory}


def fmt_gain(row, split):
    gain, se = row.get(f"{split}_gain_over_starting_best"), row.get(f"{split}_gain_paired_se")
    return "n/a" if gain is None else f"{gain:+.3f} ± {se:.3f}"


def items_saved(r):
    """--early_reject: a full evaluation's dev items over those scored (final_metrics.json), else '-'."""
    if not r.get("dev_items_evaluated"):
        return "-"
    return f"{r['dev_items_full_evaluation'] / r['dev_items_evaluated']:.2f}x"


def table(rows, labels):
    head = (f"{'optimizer':<14}{'seed':>6}{'start dev':>11}{'start test':>12}{'end dev':>9}{'end test':>10}"
            f"{'test gain ± SE':>18}{'dev gain ± SE':>18}{'evals':>7}{'fewer items':>13}")
    lines = [head, "-" * len(head)]
    for label in labels:
        mine = [r for r in rows if r["optimizer"] == label]
        for r in mine:
            lines.append(f"{label:<14}{r['seed']:>6}{r['starting_best_validation_utility']:>11.3f}"
                         f"{r['starting_best_single_test_accuracy']:>12.3f}{r['ending_best_validation_utility']:>9.3f}"
                         f"{r['ending_best_single_test_accuracy']:>10.3f}{fmt_gain(r, 'test'):>18}"
                         f"{fmt_gain(r, 'dev'):>18}{r['dev_evaluations']:>7}{items_saved(r):>13}")
        if len(mine) > 1:
            mean = lambda key: sum(r[key] for r in mine) / len(mine)  # noqa: E731
            gains = [r.get("test_gain_over_starting_best") for r in mine]
            positive = sum(g is not None and g > 0 for g in gains)
            start_dev, start_test = mean("starting_best_validation_utility"), mean("starting_best_single_test_accuracy")
            end_dev, end_test = mean("ending_best_validation_utility"), mean("ending_best_single_test_accuracy")
            lines.append(f"{label + ' mean':<14}{'':>6}{start_dev:>11.3f}{start_test:>12.3f}{end_dev:>9.3f}"
                         f"{end_test:>10.3f}{end_test - start_test:>+18.3f}{end_dev - start_dev:>+18.3f}"
                         f"{mean('dev_evaluations'):>7.0f}   test gain > 0 in {positive}/{len(mine)} seeds")
        lines.append("")
    return "\n".join(lines)


def test_scores(row):
    """Per-item test scores of a run's ending global best (finish() writes them beside its weights)."""
    with open(os.path.join(row["directory"], "global_best", "golds_preds_test.json")) as f:
        return json.load(f)["scores"]


def paired_table(rows, labels):
    """Each variant against the first, seed by seed (same seed: same initial population and starting best)."""
    from records import paired_gain  # the project's paired statistic (records.py imports no torch)
    base = labels[0]
    head = f"{'variant - ' + base:<28}{'seed':>6}{'test diff ± item-paired SE':>30}"
    lines = [head, "-" * len(head)]
    for label in labels[1:]:
        diffs = []
        for seed in sorted({r["seed"] for r in rows}, key=[r["seed"] for r in rows].index):
            a = next(r for r in rows if r["optimizer"] == base and r["seed"] == seed)
            b = next(r for r in rows if r["optimizer"] == label and r["seed"] == seed)
            gain = paired_gain(test_scores(a), test_scores(b))
            diff = b["ending_best_single_test_accuracy"] - a["ending_best_single_test_accuracy"]
            diffs.append(diff)
            shown = f"{diff:+.4f} ± {gain['se']:.4f}" if gain else f"{diff:+.4f} (no per-item scores)"
            lines.append(f"{label:<28}{seed:>6}{shown:>30}")
        if len(diffs) > 1:
            mean = sum(diffs) / len(diffs)
            se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
            better = sum(d > 0 for d in diffs)
            lines.append(f"{label + ' mean':<28}{'':>6}{f'{mean:+.4f} ± {se:.4f}':>30}   (SE over {len(diffs)} "
                         f"seeds; higher in {better}/{len(diffs)})")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS,
                   help="optimizer names, or 'label=name extra flags' variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2, 3, 4])
    p.add_argument("--budget", type=int, default=100, help="dev evaluations per run (--max_evaluations)")
    p.add_argument("-d", "--dataset", default="tiny_demo",
                   help="exact-match dataset in data/eval (tiny_demo_quick: a tenth of the forward work)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="searches run at the same time (one CPU worker each)")
    p.add_argument("--output_root", default=os.path.join("search", "compare"),
                   help="folder of the runs' search directories (a fresh sub-folder per invocation)")
    p.add_argument("--json", default=None, help="also write every run's final metrics to this JSON file")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.budget < 1:
        p.error("--jobs and --budget must be >= 1")
    variants = [parse_variant(v) for v in args.optimizers]
    labels = [label for label, _ in variants]
    if len(set(labels)) != len(labels):
        p.error(f"optimizer labels must differ: {labels}")
    root = os.path.join(os.path.abspath(args.output_root), time.strftime("%Y%m%d-%H%M%S"))
    runs = [(label, flags, seed) for label, flags in variants for seed in args.seeds]
    print(f"{len(runs)} searches, {args.budget} dev evaluations each, {args.jobs} at a time; runs in {root}",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, label, flags, seed, args.budget, root, [*DEMO, "-d", args.dataset], extra)
                   for label, flags, seed in runs]
        rows = []
        for (label, _, seed), future in zip(runs, futures):
            try:
                rows.append(future.result())
            except RuntimeError as e:
                print(f"compare_optimizers.py: error: {e}", file=sys.stderr)
                return 1
            print(f"  done: {label} seed {seed} ({rows[-1]['seconds']:.0f}s)", flush=True)
    print()
    print(table(rows, labels))
    if len(labels) > 1:
        print(paired_table(rows, labels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
