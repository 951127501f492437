"""--early_reject: a proposal scored chunk by chunk stops once it cannot be kept. Exact mode changes no decision (the
same bytes as a full evaluation); the statistical bound rejects a proposal that a full evaluation keeps at most
alpha of the time; a search killed part-way through a proposal's chunks resumes bit for bit."""
import json
import math
import os
import signal

import numpy as np
import pytest

import bwr
from conftest import REPO
from test_reliability import resume_search, same_result
from test_search import only_dir, run_search

ARGS = ["-m", "3", "-p", "5", "--step_length", "1.0", "--reset_mode", "bounds", "--scoring", "strict"]


def looks_reject(proposal, member, population, high, low, alpha, seed=0, integer=False):
    """Where the worker would stop a proposal (items scored) in its rejection order, or None when scored in full."""
    order, groups = bwr.rejection_order(member, population, (low, high), [seed])
    for end in bwr.early_reject_chunks(member, high, low, alpha, groups, integer):
        seen = [proposal[i] for i in order[:end]]
        if end < len(member) and bwr.cannot_win(seen, member, high, low, alpha, groups, integer):
            return end
    return None


@pytest.mark.parametrize("kind", ["binary", "continuous", "reliability", "rating"])
def test_exact_bound_never_rejects_a_proposal_that_a_full_evaluation_keeps(kind):
    """Property test over random score vectors (and proposals tied with or one item above their member): whenever
    the exact bound stops a proposal, its full mean is not above the member's; and it does stop clear losers."""
    rng = np.random.default_rng(0)
    low, high = {"binary": (0, 1), "continuous": (0, 1), "reliability": (-1, 1), "rating": (1, 10)}[kind]

    def scores(n):
        if kind == "binary":
            return (rng.random(n) < rng.random()).astype(float)
        if kind == "reliability":
            return rng.integers(-1, 2, n).astype(float)
        if kind == "rating":
            return np.round(1 + 9 * rng.random(n) ** rng.uniform(0.2, 5))  # ratings 1-10, means of all kinds
        return low + (high - low) * rng.random(n) ** rng.uniform(0.2, 5)
    stopped = 0
    for trial in range(3000):
        n = int(rng.integers(4, 400))
        member, proposal = scores(n), scores(n)
        if trial % 3 == 0:  # a proposal just above (or tied with) its member: the case a bound must never reject
            proposal = member.copy()
            proposal[rng.integers(n)] = high if trial % 2 else proposal[0]
        kept = bwr.accept(sum(member) / n, sum(proposal) / n, greedy=True)
        population = [member, scores(n), scores(n)]
        integer = kind in ("binary", "reliability")  # as EvalType.integer_scores: exact match, AbstainQA
        end = looks_reject(list(proposal), list(member), population, high, low, 0.0, trial, integer)
        if end is not None:
            stopped += 1
            assert not kept, (trial, end)
    assert stopped > 30  # the bound does fire


def test_a_tie_of_integer_scores_is_rejected_but_not_a_float_rounding_win():
    """Kept needs a strictly higher mean: integer scores that can at best tie are stopped; real-valued ones only
    when clearly below (a margin over rounding)."""
    member = [1.0, 0.0, 1.0, 1.0]
    assert bwr.cannot_win([0.0], member, 1.0, 0.0, integer=True)      # at best 3 of 4: a tie, not kept
    assert not bwr.cannot_win([1.0], member, 1.0, 0.0, integer=True)  # at best 4 of 4
    assert not bwr.cannot_win([0.0], member, 1.0, 0.0)                # real-valued scores: 3.0 against 3.0 stays
    assert bwr.cannot_win([0.0, 0.0], member, 1.0, 0.0)               # at best 2.0 against 3.0


def test_statistical_bound_wrongly_rejects_at_most_alpha():
    """A member scoring 0.5 on each item (one group in its order) against 0/1 proposals: over many shuffles, the
    share in which the Hoeffding-Serfling rule (alpha 0.05, union over the looks) stops a proposal one item above
    the member is at most alpha; it stops a proposal 0.15 below on most shuffles, which exact mode stops on few."""
    rng = np.random.default_rng(1)
    n, alpha = 400, 0.05
    member = [0.5] * n
    winner, loser = np.zeros(n), np.zeros(n)
    winner[rng.permutation(n)[:201]] = 1.0  # 201 of 400: kept by a full evaluation
    loser[rng.permutation(n)[:140]] = 1.0   # 0.35
    seeds = range(2000)
    wrong = sum(looks_reject(list(winner), member, [member], 1.0, 0.0, alpha, s) is not None for s in seeds)
    caught = sum(looks_reject(list(loser), member, [member], 1.0, 0.0, alpha, s) is not None for s in seeds)
    assert wrong / len(seeds) <= alpha
    assert caught / len(seeds) > 0.5
    exact = sum(looks_reject(list(loser), member, [member], 1.0, 0.0, 0.0, s) is not None for s in range(200))
    assert exact / 200 < 0.25


def test_statistical_bound_across_groups():
    """A member in three groups (scores 0.25, 0.5, 0.75, 200 items each, in that order): a 0/1 proposal one item
    above it is stopped on at most alpha of the shuffles; one at 0.35 is stopped inside the last group on most,
    where exact mode could not stop it before all 600 items."""
    rng = np.random.default_rng(4)
    n, alpha = 600, 0.05
    member = [0.25] * 200 + [0.5] * 200 + [0.75] * 200
    winner, loser = np.zeros(n), np.zeros(n)
    winner[rng.permutation(n)[:301]] = 1.0
    loser[rng.permutation(n)[:210]] = 1.0
    seeds = range(1000)
    wrong = sum(looks_reject(list(winner), member, [member], 1.0, 0.0, alpha, s) is not None for s in seeds)
    stops = [looks_reject(list(loser), member, [member], 1.0, 0.0, alpha, s) for s in seeds]
    assert wrong / len(seeds) <= alpha
    assert sum(stop == 450 for stop in stops) / len(seeds) > 0.5
    assert all(looks_reject(list(loser), member, [member], 1.0, 0.0, 0.0, s) is None for s in range(100))


def test_serfling_radius_covers_the_population_mean_at_its_level():
    """The radius holds at its stated level for a fixed sample size (a direct Monte Carlo of the inequality)."""
    rng = np.random.default_rng(2)
    population = (rng.random(300) < 0.3).astype(float)
    mean, n, delta = population.mean(), 60, 0.05
    radius = bwr.serfling_radius(n, len(population), 1.0, delta)
    misses = sum(mean - rng.permutation(population)[:n].mean() >= radius for _ in range(4000))
    assert misses / 4000 <= delta
    assert bwr.serfling_radius(len(population), len(population), 1.0, delta) == 0.0


def test_rejection_order_and_looks():
    """Items the member scored lowest come first, among them those the population scored lowest, shuffled within
    a group by the seed; a look at which no proposal could be stopped is left out."""
    rng = np.random.default_rng(3)
    member = list((rng.random(1000) < 0.67).astype(float))
    population = [member] + [list((rng.random(1000) < 0.6).astype(float)) for _ in range(4)]
    order, groups = bwr.rejection_order(member, population, (0.0, 1.0), [7])
    assert sorted(order) == list(range(1000)) and sum(groups) == 1000
    assert (order, groups) == bwr.rejection_order(member, population, (0.0, 1.0), [7])
    assert order != bwr.rejection_order(member, population, (0.0, 1.0), [8])[0]
    keys = [(member[i], sum(p[i] for p in population)) for i in order]
    assert keys == sorted(keys)
    assert bwr.early_reject_chunks(member, 1.0, 0.0, integer=True) == [500, 750, 1000]  # none can lose by item 250
    assert bwr.early_reject_chunks([1.0] * 1000, 1.0, 0.0, integer=True) == [250, 500, 750, 1000]  # one wrong loses
    assert bwr.early_reject_chunks([1.0] * 3, 1.0, 0.0, integer=True) == [1, 2, 3]
    assert bwr.early_reject_chunks([0.0] * 1000, 1.0, 0.0, integer=True) == [1000]  # one item right wins
    assert bwr.early_reject_chunks([1.0, 1.0, 0.0, 0.0], 1.0, 0.0, integer=True) == [2, 3, 4]  # at best a tie
    assert bwr.early_reject_chunks([1.0, 1.0, 0.0, 0.0], 1.0, 0.0) == [3, 4]  # real-valued: a tie is not stopped


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


@pytest.mark.parametrize("variant", [("--optimizer", "random"), ("--rule", "published_code", "-p", "4")],
                         ids=["random", "published_rule"])
def test_every_greedy_optimizer_ends_like_a_full_evaluation(tiny, data, tmp_path, variant):
    """The other optimizers and rules that accept greedily (random search; BWR's published-code rule, whose sources
    include global_best/ and global_worst/, -p 4: iteration 2 restarts): exact mode changes none of their bytes."""
    args = [a for a in ARGS if a not in ("--reset_mode", "bounds")]  # a bwr setting of the seed README's rule
    run_search(tmp_path / "full", *args, *variant)
    run_search(tmp_path / "exact", *args, *variant, "--early_reject")
    full, exact = only_dir(tmp_path / "full"), only_dir(tmp_path / "exact")
    same_result(full, exact)
    assert without_item_counts(os.path.join(exact, "final_metrics.json")) == \
        without_item_counts(os.path.join(full, "final_metrics.json"))
    metrics = json.load(open(os.path.join(exact, "final_metrics.json")))
    assert 0 < metrics["dev_items_evaluated"] <= metrics["dev_items_full_evaluation"]


def test_killed_part_way_through_a_proposals_chunks_then_resumed(full_run, tmp_path):
    """SIGKILL of the search while its worker is between two chunks of a proposal (BWR_CRASH_AT=chunk:N, counted
    in the worker), then --resume: the same bytes as the full run."""
    proc = run_search(tmp_path, *ARGS, "--early_reject", env={"BWR_CRASH_AT": "chunk:10"}, check=False)
    assert proc.returncode == -signal.SIGKILL  # killed at the chunk point, not failed
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
        member = list(details["scores"])  # a member one item below it: never stopped, but looks to stop at
        member[member.index(1.0)] = 0.0
        order, groups = bwr.rejection_order(member, [member, details["scores"]], (0.0, 1.0), [5])
        assert len(bwr.early_reject_chunks(member, 1.0, 0.0, 0.0, groups, True)) >= 2
        never = EarlyReject(alpha=0.0, member_scores=tuple(member), score_range=(0.0, 1.0), order=tuple(order),
                            groups=tuple(groups), integer_scores=True)
        chunked, chunk_details, _, counts = runner._evaluate_until_rejected(adapter, "dev", never)
        assert (chunked, counts) == (utility, {"dev_items": n, "rejected_early": False})
        for key in ("golds", "preds", "scores", "outputs", "utility"):
            assert chunk_details[key] == details[key], key
        evaluate.configure(reset=True)
