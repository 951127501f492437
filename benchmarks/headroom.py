"""Merge headroom of an expert population: do merges that a search reaches beat the best single expert?

    python benchmarks/headroom.py [--population initial_experts/tiny] [--dataset tiny_demo] [--samples 150]

Uses the project's own merge (merge.merge_state_dicts, weighted_average in LoRA factor space) and evaluate()
on in-memory adapters, on the dataset's dev and test splits:
  1. every expert on dev and test; the starting best is the best on dev (as search.py picks it);
  2. the uniform average of all experts, and the same scaled to total weight 1.5 and 2;
  3. random search over coefficient vectors of total weight 1 (what a BWR update of members of total weight 1
     produces): a random subset of 2..n experts with Dirichlet(1) weights; the best on dev is scored on test.
Prints each gain over the starting best on test with its paired standard error (std of per-item score
differences / sqrt(n)). Pin the kernels (ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1) for
figures that hold on any machine.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import evaluate as ev  # noqa: E402
from merge import load_adapter, merge_state_dicts  # noqa: E402


def paired(scores_a, scores_b):
    """Mean of b - a and its paired standard error."""
    d = np.asarray(scores_b, dtype=float) - np.asarray(scores_a, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--population", default=str(REPO / "initial_experts" / "tiny"),
                   help="folder with base_model/ and experts/<name>/")
    p.add_argument("--dataset", default="tiny_demo", help="exact-match dataset in --data_dir")
    p.add_argument("--data_dir", default=str(REPO / "data" / "eval"))
    p.add_argument("--samples", type=int, default=150, help="random coefficient vectors to try on dev")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256, help="generation batch size")
    p.add_argument("--scoring", default="strict", choices=("published", "strict"),
                   help="exact-match rules (default strict, as search_demo.sh)")
    args = p.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ev.configure(data_dir=args.data_dir, batch_size=args.batch_size, scoring=args.scoring)
    pop = Path(args.population)
    base = str(pop / "base_model")
    names = sorted(d.name for d in (pop / "experts").iterdir() if d.is_dir())
    loaded = [load_adapter(pop / "experts" / n) for n in names]
    states, config = [s for s, _ in loaded], loaded[0][1]
    t0 = time.time()

    def score(state, split):
        u, details = ev.evaluate_split((state, config), "exact_match", args.dataset, "cpu", base, split)
        return u, details["scores"]

    def merged(weights):
        return merge_state_dicts(states, list(map(float, weights)), "weighted_average")

    ops = None
    if args.dataset == "tiny_demo":  # accuracy per operation shows which skills a merge keeps
        from data.tiny_demo import skill_of
        items = ev.load_data(args.dataset, "exact_match")["test"]
        ops = {op: [i for i, it in enumerate(items) if skill_of(it["question"]) == op] for op in ("max", "fst", "snd")}

    def per_op(scores):
        if ops is None:
            return ""
        return "  (" + " ".join(f"{op} {np.mean([scores[i] for i in idx]):.2f}" for op, idx in ops.items()) + ")"

    if ops is not None:  # the base model alone: which answers it computes, and how often it picks the intended one
        from data.tiny_demo import answer_of
        _, details = ev.evaluate_split(None, "exact_match", args.dataset, "cpu", base, "test")
        said = [(p.split() or [""])[0] for p in details["preds"]]
        shares = []
        for op, idx in ops.items():
            intended = np.mean([said[i] == answer_of(items[i]["question"]) for i in idx])
            either = np.mean([said[i] in (answer_of(items[i]["question"]), answer_of(items[i]["question"], True))
                              for i in idx])
            shares.append(f"{op} {intended:.2f} intended, {either:.2f} intended or distractor")
        print(f"base model alone, test {details['utility']:.3f}: " + "; ".join(shares), flush=True)

    dev, test = {}, {}
    for n, s in zip(names, states):
        dev[n], test[n] = score(s, "dev"), score(s, "test")
        print(f"expert {n:14s} dev {dev[n][0]:.3f} test {test[n][0]:.3f}{per_op(test[n][1])}", flush=True)
    start = max(names, key=lambda n: dev[n][0])
    print(f"starting best (best dev): {start}, test {test[start][0]:.3f}; "
          f"best expert on test: {max(test[n][0] for n in names):.3f}")

    def report(label, weights):
        state = merged(weights)
        d, t = score(state, "dev"), score(state, "test")
        gain, se = paired(test[start][1], t[1])
        print(f"{label}: dev {d[0]:.3f} test {t[0]:.3f}{per_op(t[1])}  test gain {gain:+.3f} +- {se:.3f} "
              f"(paired SE)  weights {np.round(weights, 2).tolist()}", flush=True)

    report("uniform average", np.full(len(names), 1.0 / len(names)))
    # total weight above 1: where BWR's updates of members of total weight 1 do not go (docs/tiny.md, "Merge headroom")
    for total in (1.5, 2.0):
        report(f"uniform average scaled to total weight {total}", np.full(len(names), total / len(names)))

    rng = np.random.default_rng(args.seed)
    best_w, best_dev = None, -1.0
    for _ in range(args.samples):
        k = int(rng.integers(2, len(names) + 1))
        w = np.zeros(len(names))
        w[rng.choice(len(names), size=k, replace=False)] = rng.dirichlet(np.ones(k))
        u = score(merged(w), "dev")[0]
        if u > best_dev:
            best_w, best_dev = w, u
    report(f"random search ({args.samples} total-weight-1 vectors, best on dev)", best_w)
    print(f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
