"""How many dev items other early-rejection rules would score on the demo: replays of every proposal of full runs.

    .venv/bin/python benchmarks/early_reject_rules.py                 # seeds 42 1 2 3 4, ALPHA 0.01
    .venv/bin/python benchmarks/early_reject_rules.py --seeds 42 --alpha 0.05

Per seed, one search with search_demo.sh's settings (15 iterations) runs in this process, each greedy proposal
scored in full, and records what an --early_reject run would see: each proposal's per-item dev scores, its member's
and the population's. Every rule is then replayed on every proposal (a replay changes no decision, so all rules see
the same proposals; a statistical rule that would have stopped a proposal the full evaluation keeps is counted as a
wrong stop). Printed per seed: the kept proposals; how far the losing ones end below their member; the most that
stopping at the first look could save, and how few items per losing proposal 2x fewer would leave; and for each
rule (each cell) the dev items it scores against a full evaluation of every proposal ("fewer"), the chunks it runs
per proposal, and the modelled time against full evaluations, a proposal costing its share of the items plus
--chunk_overhead of a pass for each chunk after its first (0.10 measured at two threads on the tiny model, about 0.04
at one thread: bench_early_reject.py --chunk_cost, docs/early_reject.md). The rules:

    as run, exact / ALPHA    bwr.early_reject_chunks and bwr.cannot_win: --early_reject as it is (looks at 25, 50, 75%)
    looks every 10% / 5%     the same exact rule, looked at more often
    stratified + hypergeom.  the textbook paired test: the items the member misses and those it gets right, each
                             in its own uniform order, the same share of each at a look (25, 50, 75%); the fixes
                             and the breaks bounded by exact hypergeometric tails at level ALPHA / 6 each (two
                             strata, three looks), plus the exact rule; 0/1 scores only
"""

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile

import numpy as np

from bench_early_reject import DEMO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# before search imports transformers and wandb, which read them at import
os.environ.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import bwr  # noqa: E402
import search  # noqa: E402


def record_proposals(seed, root):
    """Every greedy proposal of a demo search: {"scores", "member", "population", "seed", "accepted"}. The search
    runs with --early_reject, so members keep their per-item dev scores, but each task is built without its
    EarlyReject (a full evaluation, which returns every item's score); the results are taken where the driver
    counts an iteration's dev items, in the order their tasks were built. Decisions are those of a full run."""
    pending, proposals = [], []
    build, count = search.early_rejection, search.count_dev_items

    def full_evaluation(args, state, i, threshold, restart=False):
        if state is None:  # the initial population, scored before there is a state; no iteration counts it
            return None
        greedy = build(args, state, i, threshold, restart) is not None  # what --early_reject would score in chunks
        pending.append({"member": state["candidates"][i]["dev_scores"],
                        "population": [c["dev_scores"] for c in state["candidates"]],
                        "seed": [seed, 29, state["iteration"], i, int(restart)]} if greedy else None)
        return None

    def take_results(args, state, profile, evaluated):
        assert len(evaluated) == len(pending), "a result without its task"
        for record, result in zip(pending, evaluated):
            if record is not None and "rejected" not in result:  # a non-finite merge is never scored
                proposals.append({**record, "scores": result["details"]["scores"], "accepted": result["accepted"]})
        pending.clear()
    search.early_rejection, search.count_dev_items = full_evaluation, take_results
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = search.main(["-n", f"rules{seed}", "--output_root", root, "--seed", str(seed), *DEMO,
                              "--early_reject"])
    finally:
        search.early_rejection, search.count_dev_items = build, count
    if rc != 0:
        sys.exit(f"early_reject_rules: the search of seed {seed} failed ({rc})")
    return proposals


def as_run(p, alpha, looks):
    """(items scored, chunks) under bwr's rule, with these looks."""
    order, groups = bwr.rejection_order(p["member"], p["population"], (0.0, 1.0), p["seed"])
    s = np.asarray(p["scores"])[order]
    ends = bwr.early_reject_chunks(p["member"], 1.0, 0.0, alpha, groups, True, looks)
    for chunk, end in enumerate(ends, 1):
        if end < len(s) and bwr.cannot_win(s[:end].tolist(), p["member"], 1.0, 0.0, alpha, groups, True, len(looks)):
            return end, chunk
    return len(s), len(ends)


def log_hypergeom_pmf(k, total, successes, draws):
    return (math.lgamma(successes + 1) - math.lgamma(k + 1) - math.lgamma(successes - k + 1)
            + math.lgamma(total - successes + 1) - math.lgamma(draws - k + 1)
            - math.lgamma(total - successes - draws + k + 1)
            - math.lgamma(total + 1) + math.lgamma(draws + 1) + math.lgamma(total - draws + 1))


def fewest_successes(total, draws, seen, delta):
    """The fewest successes among total items consistent, at level delta, with seen successes in a uniform sample
    of draws of them: the smallest K with P(X >= seen | K) > delta (X hypergeometric). The largest K possible
    leaves total - K < draws - seen failures, so its tail is 1: there is always one."""
    def tail(successes):
        return sum(math.exp(log_hypergeom_pmf(k, total, successes, draws))
                   for k in range(seen, min(draws, successes) + 1))
    return next(k for k in range(seen, total - (draws - seen) + 1) if tail(k) > delta)


def stratified_hypergeometric(p, alpha, looks=bwr.EARLY_REJECT_LOOKS):
    """The paired test for 0/1 scores: kept iff fixes (items the member misses, the proposal gets) outnumber breaks
    (the reverse). Each stratum (member 0, member 1) in its own uniform order, the same share of each at a look;
    stop if the most fixes and the fewest breaks consistent with the samples (each at level alpha / (2 * looks))
    leave fixes <= breaks, or if the exact rule stops it."""
    m, s = np.asarray(p["member"]), np.asarray(p["scores"])
    assert set(m.tolist()) | set(s.tolist()) <= {0.0, 1.0}, "the stratified test is for 0/1 scores"
    rng = np.random.default_rng(p["seed"])
    missed, right = rng.permutation(np.flatnonzero(m == 0)), rng.permutation(np.flatnonzero(m == 1))
    delta = alpha / (2 * len(looks))
    for chunk, share in enumerate(looks, 1):
        n_missed, n_right = round(share * len(missed)), round(share * len(right))
        fixes, breaks = int(s[missed[:n_missed]].sum()), int((1 - s[right[:n_right]]).sum())
        most_fixes = len(missed) - fewest_successes(len(missed), n_missed, n_missed - fixes, delta)
        fewest_breaks = fewest_successes(len(right), n_right, breaks, delta)
        exact = fixes + (len(missed) - n_missed) <= breaks
        if exact or most_fixes <= fewest_breaks:
            return n_missed + n_right, chunk
    return len(m), len(looks) + 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    p.add_argument("--alpha", type=float, default=0.01, help="the statistical rules' level")
    p.add_argument("--chunk_overhead", type=float, default=0.10, help="an extra chunk's cost, as a share of a pass")
    a = p.parse_args()
    os.chdir(REPO)
    rules = {"as run, exact": lambda q: as_run(q, 0.0, bwr.EARLY_REJECT_LOOKS),
             f"as run, ALPHA {a.alpha:g}": lambda q: as_run(q, a.alpha, bwr.EARLY_REJECT_LOOKS),
             "looks every 10%": lambda q: as_run(q, 0.0, tuple(np.arange(1, 10) / 10)),
             "looks every 5%": lambda q: as_run(q, 0.0, tuple(np.arange(1, 20) / 20)),
             f"stratified + hypergeometric, {a.alpha:g}": lambda q: stratified_hypergeometric(q, a.alpha)}
    print("| seed | kept / proposals | losers below their member, median (within 1 point) | first-look ceiling | "
          "2x leaves a loser | " + " | ".join(rules) + " |")
    print("|---" * (5 + len(rules)) + "|")
    items, passes, full_items, n_proposals = dict.fromkeys(rules, 0), dict.fromkeys(rules, 0.0), 0, 0
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as root:
            proposals = record_proposals(seed, root)
        n_items = len(proposals[0]["member"])
        full, kept, losers = n_items * len(proposals), sum(q["accepted"] for q in proposals), len(proposals)
        losers -= kept
        if not losers:
            sys.exit(f"early_reject_rules: seed {seed} rejected no proposal, there is nothing to replay")
        # whole items below the member (the scores are 0/1, their sums exact)
        behind = [round(sum(q["member"]) - sum(q["scores"])) for q in proposals if not q["accepted"]]
        close = sum(b <= n_items // 100 for b in behind) / losers
        ceiling = full / (kept * n_items + losers * bwr.EARLY_REJECT_LOOKS[0] * n_items)
        per_loser = (full / 2 - kept * n_items) / losers
        leaves = f"{per_loser:.0f} items" if per_loser >= 0 else "none (over half kept)"
        cells = []
        for name, rule in rules.items():
            replays = [(rule(q), q["accepted"]) for q in proposals]
            scored = sum(n for (n, _), _ in replays)
            wrong = sum(n < n_items and accepted for (n, _), accepted in replays)
            cost = sum(n / n_items + a.chunk_overhead * (chunks - 1) for (n, chunks), _ in replays)
            items[name] += scored
            passes[name] += cost
            cells.append(f"{full / scored:.2f}x, {statistics.mean(c for (_, c), _ in replays):.2f}, "
                         f"{len(proposals) / cost:.2f}x" + (f" ({wrong} wrong)" if wrong else ""))
        full_items += full
        n_proposals += len(proposals)
        print(f"| {seed} | {kept} / {len(proposals)} | {statistics.median(behind) / n_items:.3f} ({close:.0%}) | "
              f"{ceiling:.2f}x | {leaves} | " + " | ".join(cells) + " |")
    print(f"over the seeds (fewer items, modelled time at --chunk_overhead {a.chunk_overhead:g}): "
          + "; ".join(f"{name} {full_items / items[name]:.2f}x, {n_proposals / passes[name]:.2f}x" for name in rules))


if __name__ == "__main__":
    main()
