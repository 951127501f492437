import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: modules live in the root

from bwr import accept, apply_update, bwr_update, crossover, make_rng, rng_from_state, rng_state  # noqa: E402

TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])


def utility(state):
    return -float(((state["x"] - TARGET) ** 2).sum())


def search(reset_mode, seed, population=10, iterations=300, step_length=1.0, greedy=True):
    """The BWR loop of the seed README on x in R^5: all candidates move, then best/worst update."""
    rng = make_rng(seed)
    init = np.random.default_rng(1000 + seed).normal(0.0, 3.0, size=(population, 5))
    pop = [{"x": torch.tensor(row, dtype=torch.float32)} for row in init]
    utils = [utility(s) for s in pop]
    history = [max(utils)]
    for _ in range(iterations):
        best = int(np.argmax(utils))
        worst = int(np.argmin(utils))
        proposals = [apply_update(bwr_update(i, best, worst, population, step_length, rng, reset_mode), pop)
                     for i in range(population)]
        for i, new in enumerate(proposals):
            u = utility(new)
            if accept(utils[i], u, greedy):
                pop[i], utils[i] = new, u
        history.append(max(utils))
    return pop, history


def test_update_coefficients_follow_the_rule():
    rng = make_rng(3)
    replay = rng_from_state(rng_state(rng))
    seen = {"combine": 0, "reset": 0}
    for _ in range(200):
        index, best, worst, n, s = 2, 0, 4, 6, 0.7
        upd = bwr_update(index, best, worst, n, s, rng)
        r1, r2, r3, r4 = replay.random(4)
        T = int(replay.integers(1, 3))
        k = int(replay.integers(0, n - 1))
        rand = k if k < index else k + 1
        seed = int(replay.integers(0, 2**63 - 1))
        assert upd["random"] == rand and upd["seed"] == seed and upd["kind"] == "combine"
        expected = np.zeros(n)
        if r4 > 0.5:
            seen["combine"] += 1
            expected[index] += 1
            expected[best] += s * r1
            expected[rand] += -s * r1 * T + s * r2
            expected[worst] += -s * r2
        else:
            seen["reset"] += 1
            expected[rand] = r3
        assert np.allclose(upd["weights"], expected, rtol=0, atol=1e-12)
    assert seen["combine"] > 50 and seen["reset"] > 50


def test_coefficients_add_where_indices_coincide():
    rng = make_rng(0)
    replay = make_rng(0)
    for _ in range(100):
        upd = bwr_update(1, 1, 1, 2, 0.5, rng)  # candidate == best == worst; random must be member 0
        r1, r2, r3, r4 = replay.random(4)
        T = int(replay.integers(1, 3))
        replay.integers(0, 1), replay.integers(0, 2**63 - 1)
        assert upd["random"] == 0
        if r4 > 0.5:
            # cur + 0.5 * (r1 * (cur - T * rnd) - r2 * (cur - rnd))
            assert upd["weights"] == pytest.approx([0.5 * (r2 - T * r1), 1 + 0.5 * r1 - 0.5 * r2], abs=1e-12)
        else:
            assert upd["weights"] == [r3, 0.0]


def test_random_is_never_the_candidate_and_is_uniform():
    rng = make_rng(11)
    n = 5
    counts = np.zeros((n, n))
    for _ in range(5000):
        index = int(rng.integers(0, n))
        upd = bwr_update(index, 0, 1, n, 1.0, rng)
        assert upd["random"] != index
        counts[index, upd["random"]] += 1
    off = counts[~np.eye(n, dtype=bool)]
    assert off.min() > 0.7 * off.mean()


def test_bounds_reset_draws_between_population_min_and_max():
    rng = make_rng(1)
    upd = next(u for u in (bwr_update(0, 1, 2, 3, 1.0, rng, "bounds") for _ in range(50)) if u["kind"] == "bounds")
    assert set(upd) == {"kind", "seed", "random"} and isinstance(upd["seed"], int)
    states = [{"x": torch.tensor([0.0, 5.0, -1.0]), "y": torch.full((1000,), 2.0, dtype=torch.bfloat16)},
              {"x": torch.tensor([1.0, 3.0, -1.0]), "y": torch.full((1000,), 4.0, dtype=torch.bfloat16)},
              {"x": torch.tensor([0.5, 4.0, -1.0]), "y": torch.full((1000,), 3.0, dtype=torch.bfloat16)}]
    new = apply_update(upd, states)
    assert ((new["x"] >= torch.tensor([0.0, 3.0, -1.0])) & (new["x"] <= torch.tensor([1.0, 5.0, -1.0]))).all()
    assert new["y"].dtype == torch.bfloat16 and new["y"].min() >= 2 and new["y"].max() <= 4
    assert new["y"].float().std() > 0.3  # a real spread, not a constant
    again = apply_update(upd, states)
    assert all(torch.equal(new[k], again[k]) for k in new)


def test_greedy_search_improves_monotonically_population_10():
    for mode in ("scaled_random", "bounds"):
        _, history = search(mode, seed=0)
        assert all(b >= a for a, b in zip(history, history[1:])), mode
        assert history[-1] > history[0], (mode, history[0], history[-1])


def test_bounds_mode_reaches_optimum_population_10():
    _, history = search("bounds", seed=0)
    assert history[-1] > -1e-2


def test_scaled_random_reaches_optimum_population_20():
    # One scalar r1, r2 per move keeps every proposal in the span of few members; with 10 members
    # in R^5 the population tends to collapse short of the optimum (-1e-2 reached for 0 of 10
    # seeds, 10/10 with 20 members or with the bounds reset), so convergence is checked at 20.
    _, history = search("scaled_random", seed=0, population=20)
    assert history[-1] > -1e-2


def test_same_seed_same_result_bit_for_bit():
    for mode in ("scaled_random", "bounds"):
        pop_a, hist_a = search(mode, seed=4, iterations=40)
        pop_b, hist_b = search(mode, seed=4, iterations=40)
        assert hist_a == hist_b
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(pop_a, pop_b))
        pop_c, _ = search(mode, seed=5, iterations=40)
        assert not all(torch.equal(a["x"], c["x"]) for a, c in zip(pop_a, pop_c))


def test_rng_state_round_trip_reproduces_future_draws():
    rng = make_rng(123)
    for _ in range(17):
        bwr_update(0, 1, 2, 4, 1.0, rng)
    crossover(rng)
    saved = json.loads(json.dumps(rng_state(rng)))
    restored = rng_from_state(saved)
    for _ in range(50):
        assert bwr_update(3, 0, 1, 4, 0.5, rng, "bounds") == bwr_update(3, 0, 1, 4, 0.5, restored, "bounds")
    assert crossover(rng) == crossover(restored)
    # other bit generators survive JSON too
    mt = np.random.Generator(np.random.MT19937(9))
    again = rng_from_state(json.loads(json.dumps(rng_state(mt))))
    assert mt.random() == again.random()
    with pytest.raises(ValueError, match="unknown bit generator"):
        rng_from_state({"bit_generator": "Nope", "state": {}})


def test_accept():
    # strictly better, as the published loop: an equal score keeps the current model
    assert not accept(0.5, 0.5, True) and accept(0.5, 0.6, True) and not accept(0.5, 0.4, True)
    assert accept(0.5, 0.5, False)
    assert accept(0.5, 0.4, False)
    assert not accept(0.5, math.nan, True) and not accept(0.5, math.nan, False)
    assert accept(math.nan, 0.1, True)


def test_crossover():
    rng = make_rng(0)
    ws = [crossover(rng) for _ in range(2000)]
    assert all(0.0 <= w < 2.0 and w + v == pytest.approx(1.0) for w, v in ws)
    assert min(w for w, _ in ws) < 0.05 and max(w for w, _ in ws) > 1.95


def test_bad_arguments():
    rng = make_rng(0)
    with pytest.raises(ValueError, match="population_size must be an integer >= 2"):
        bwr_update(0, 0, 0, 1, 1.0, rng)
    with pytest.raises(ValueError, match=r"best must be a member index in 0..3, got 4"):
        bwr_update(0, 4, 0, 4, 1.0, rng)
    with pytest.raises(ValueError, match="unknown reset_mode 'box'"):
        bwr_update(0, 1, 2, 4, 1.0, rng, "box")
    with pytest.raises(ValueError, match="step_length must be a finite number"):
        bwr_update(0, 1, 2, 4, float("inf"), rng)
    with pytest.raises(ValueError, match="kind 'combine' or 'bounds'"):
        apply_update({"kind": "other"}, [{"x": torch.zeros(1)}])


def test_apply_update_uses_merge_method_and_population_indices():
    states = [{"x": torch.tensor([1.0, 1.0])}, {"x": torch.tensor([3.0, 0.0])}, {"x": torch.tensor([0.0, 5.0])}]
    upd = {"kind": "combine", "weights": [0.0, 0.5, 2.0], "seed": 0}
    assert torch.equal(apply_update(upd, states)["x"], torch.tensor([1.5, 10.0]))
    # task arithmetic around population member 0: x0 + 0.5 (x1 - x0) + 2 (x2 - x0)
    got = apply_update(upd, states, "task_arithmetic", {"base_model_idx": 0})["x"]
    assert torch.allclose(got, torch.tensor([1 + 1.0 - 2.0, 1 - 0.5 + 8.0]))
