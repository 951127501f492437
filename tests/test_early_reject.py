"""--early_reject: a proposal scored chunk by chunk stops once it cannot be kept. Exact mode changes no decision (the
same bytes as a full evaluation); the statistical bound rejects a proposal that a full evaluation keeps at most
alpha of the time; a search killed part-way through a proposal's chunks resumes bit for bit."""
import json
import math
import os

import numpy as np
import pytest

import bwr
from conftest import REPO
from test_reliability import resume_search, same_result
from test_search import only_dir, run_search

ARGS = ["-m", "3", "-p", "5", "--step_length", "1.0", "--reset_mode", "bounds", "--scoring", "strict"]


def looks_reject(proposal, member, order, high, low, alpha):
    """Where the worker would stop a proposal (items scored), or None when it is scored in full."""
    for end in bwr.early_reject_chunks(len(member)):
        if end < len(member) and bwr.cannot_win([proposal[i] for i in order[:end]], member, high, low, alpha):
            return end
    return None


@pytest.mark.parametrize("kind", ["binary", "continuous", "reliability", "rating"])
def test_exact_bound_never_rejects_a_proposal_that_a_full_evaluation_keeps(kind):
    """Property test over random score vectors (and proposals tied with or one item above their member): whenever
    the exact bound stops a proposal, its full mean is not above the member's; and it does stop clear losers."""
    rng = np.random.default_rng(0)
    low, high = {"binary": (0, 1), "continuous": (0, 1), "reliability": (-1, 1), "rating": (1, 10)}[kind]
    stopped = 0
    for trial in range(3000):
        n = int(rng.integers(4, 400))
        if kind == "binary":
            member = (rng.random(n) < rng.random()).astype(float)
            proposal = (rng.random(n) < rng.random()).astype(float)
        elif kind == "reliability":
            member, proposal = (rng.integers(-1, 2, n).astype(float) for _ in range(2))
        else:
            member, proposal = (low + (high - low) * rng.random(n) ** rng.uniform(0.2, 5) for _ in range(2))
        if trial % 3 == 0:  # a proposal just above (or tied with) its member: the case a bound must never reject
            proposal = member.copy()
            proposal[rng.integers(n)] = high if trial % 2 else proposal[0]
        kept = bwr.accept(sum(member) / n, sum(proposal) / n, greedy=True)
        end = looks_reject(list(proposal), list(member), bwr.item_order(n, trial), high, low, 0.0)
        if end is not None:
            stopped += 1
            assert not kept, (trial, end)
    assert stopped > 30  # the bound does fire


def test_statistical_bound_wrongly_rejects_at_most_alpha():
    """Populations whose proposal beats its member by one item: over many seeded item orders, the share of orders
    in which the Hoeffding-Serfling rule (alpha 0.05, union over the looks) stops it is at most alpha; and it stops
    a proposal 0.15 below its member on most orders."""
    rng = np.random.default_rng(1)
    n, alpha = 400, 0.05
    member = (rng.random(n) < 0.7).astype(float)
    winner = member.copy()
    winner[np.flatnonzero(member == 0)[0]] = 1.0   # one more right answer: kept by a full evaluation
    loser = member.copy()
    loser[np.flatnonzero(member == 1)[:60]] = 0.0  # 60 fewer: 0.15 below
    orders = [bwr.item_order(n, seed) for seed in range(2000)]
    wrong = sum(looks_reject(list(winner), list(member), o, 1.0, 0.0, alpha) is not None for o in orders)
    caught = sum(looks_reject(list(loser), list(member), o, 1.0, 0.0, alpha) is not None for o in orders)
    assert wrong / len(orders) <= alpha
    assert caught / len(orders) > 0.5


def test_serfling_radius_covers_the_population_mean_at_its_level():
    """The radius holds at its stated level for a fixed sample size (a direct Monte Carlo of the inequality)."""
    rng = np.random.default_rng(2)
    population = (rng.random(300) < 0.3).astype(float)
    mean, n, delta = population.mean(), 60, 0.05
    radius = bwr.serfling_radius(n, len(population), 1.0, delta)
    misses = sum(mean - rng.permutation(population)[:n].mean() >= radius for _ in range(4000))
    assert misses / 4000 <= delta
    assert bwr.serfling_radius(len(population), len(population), 1.0, delta) == 0.0


def test_chunks_and_order_are_fixed():
    assert bwr.early_reject_chunks(1000) == [250, 500, 750, 1000]
    assert bwr.early_reject_chunks(3) == [1, 2, 3]
    assert bwr.item_order(50, 7) == bwr.item_order(50, 7) != bwr.item_order(50, 8)
    assert sorted(bwr.item_order(50, 7)) == list(range(50))


def without_item_counts(path):
    metrics = json.load(open(path))
    return {k: v for k, v in metrics.items()
            if not k.startswith("dev_items") and "seconds" not in k and "time" not in k}


@pytest.fixture(scope="module")
def full_run(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    run_search(root, *ARGS)
    return only_dir(root)


@pytest.mark.parametrize("mode", [[], ["0.01"]], ids=["exact", "alpha"])
def test_early_rejection_search_ends_like_a_full_evaluation(full_run, tmp_path, mode):
    """Exact mode: the same scratchpad, global_best/ and final metrics as the full run, with fewer dev items scored
    (some proposals stop early, each log line says on how many items). On this run ALPHA 0.01 decides alike too."""
    run_search(tmp_path, *ARGS, "--early_reject", *mode)
    directory = only_dir(tmp_path)
    same_result(full_run, directory)
    assert without_item_counts(os.path.join(directory, "final_metrics.json")) == \
        without_item_counts(os.path.join(full_run, "final_metrics.json"))
    metrics = json.load(open(os.path.join(directory, "final_metrics.json")))
    assert 0 < metrics["dev_items_evaluated"] < metrics["dev_items_full_evaluation"]
    log = open(os.path.join(directory, "log.txt")).read()
    assert "(rejected early: it cannot be kept)" in log and "on all 100 dev items" in log
    assert "dev_items " in log and "dev_items_full " in log  # the per-iteration profile
    state = json.load(open(os.path.join(directory, "state.json")))
    assert all(len(c["dev_scores"]) == 100 for c in state["candidates"])
    assert math.isclose(sum(state["candidates"][0]["dev_scores"]) / 100, state["candidates"][0]["utility"])


def test_killed_part_way_through_a_proposals_chunks_then_resumed(full_run, tmp_path):
    """SIGKILL of the search while its worker is between two chunks of a proposal (BWR_CRASH_AT=chunk:N, counted
    in the worker), then --resume: the same bytes as the full run."""
    proc = run_search(tmp_path, *ARGS, "--early_reject", env={"BWR_CRASH_AT": "chunk:30"}, check=False)
    assert proc.returncode != 0
    directory = only_dir(tmp_path)
    resumed = resume_search(directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(full_run, directory)
    assert "took over" in open(os.path.join(directory, "log.txt")).read()


def test_a_chunked_evaluation_equals_one_pass(tiny, data):
    """The worker's chunk-by-chunk evaluation that is never stopped gives the same utility and per-item details as
    one pass over the split (exact match and multiple choice by logits)."""
    import evaluate
    import merge
    from workers import EarlyReject, TaskRunner
    for eval_type, dataset, options in (("exact_match", "tiny_demo_quick", {"scoring": "strict"}),
                                        ("multiple_choice", "tiny_mc", {"mc_scoring": "logits"})):
        runner = TaskRunner("cpu", {"base_model": str(tiny.base), "eval_type": eval_type, "dataset": dataset,
                                    "evaluate_options": {"data_dir": os.path.join(REPO, "data", "eval"), **options}})
        adapter = merge.load_adapter(str(tiny.experts / sorted(os.listdir(tiny.experts))[3]))
        utility, details, _ = runner._evaluate(adapter, "dev")
        n = len(details["scores"])
        never = EarlyReject(alpha=0.0, member_scores=(0.0,) * n, score_range=(0.0, 1.0), order_seed=5)
        chunked, chunk_details, _, counts = runner._evaluate_until_rejected(adapter, "dev", never)
        assert (chunked, counts) == (utility, {"dev_items": n, "rejected_early": False})
        for key in ("golds", "preds", "scores", "outputs", "utility"):
            assert chunk_details[key] == details[key], key
        evaluate.configure(reset=True)
