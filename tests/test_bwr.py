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


# --- the published code's rule (--rule published_code) ------------------------------------------------------------

from bwr import PUBLISHED_MOVE_ABOVE, published_update  # noqa: E402


def _sources(n_members, seed=0):
    """n_members members, then the global best and the worst ever (sources n and n + 1, as search.py passes them)."""
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen) * 0.05}
            for _ in range(n_members + 2)]


def _first_move(rng, index, n):
    """The first move published_update draws for member index, and the draws it was made from (replayed)."""
    while True:
        replay = rng_from_state(rng_state(rng))
        upd = published_update(index, n, n, n + 1, 0.8, rng)
        r1, r2, r3, r4 = (float(x) for x in replay.random(4))
        T = int(replay.integers(1, 3))
        k = int(replay.integers(0, n - 1))
        if upd["branch"] == "move":
            assert (upd["r1"], upd["r2"], upd["T"]) == (r1, r2, T) and r4 > PUBLISHED_MOVE_ABOVE
            assert upd["members"] == {"current": index, "best": n, "worst": n + 1, "random": k if k < index else k + 1}
            return upd


def _ties_by_hand(tensors, weights, threshold=0.01):
    """TIES written out entry by entry: v_i = w_i t_i, trimmed below threshold; the sign of sum_i v_i (+ on 0);
    the mean of the entries that have it."""
    flat = [(w * t).flatten().tolist() for t, w in zip(tensors, weights)]
    out = []
    for j in range(len(flat[0])):
        v = [0.0 if abs(f[j]) < threshold else f[j] for f in flat]
        sign = 1.0 if sum(v) >= 0 else -1.0
        agree = [x for x in v if x != 0 and math.copysign(1.0, x) == sign]
        out.append(sum(agree) / max(1, len(agree)))
    return torch.tensor(out).reshape(tensors[0].shape)


def test_published_move_is_three_merges_by_hand_weighted_average():
    """new = current + s*(r1*best - r1*T*random) + s*(-r2*worst + r2*random), from the very draws: for a weighted
    average, the seed README's move with other thresholds and another best and worst."""
    n, index = 4, 1
    states = _sources(n)
    upd = _first_move(make_rng(11), index, n)
    r1, r2, T, s = upd["r1"], upd["r2"], upd["T"], upd["step"]
    cur, best, worst, rand = (states[upd["members"][role]] for role in ("current", "best", "worst", "random"))
    new = apply_update(upd, states)
    for key in cur:
        part1 = r1 * best[key] - r1 * T * rand[key]
        part2 = -r2 * worst[key] + r2 * rand[key]
        assert torch.allclose(new[key], cur[key] + s * part1 + s * part2, rtol=1e-6, atol=1e-7)


def test_published_move_with_ties_is_three_merges_not_one():
    """TIES: part1 = TIES([best, random], [r1, -r1*T]), part2 = TIES([worst, random], [-r2, r2]),
    new = TIES([current, part1, part2], [1, s, s]), each computed by hand; one merge over the same coefficients
    (what the seed README rule does) gives another model."""
    n, index = 4, 2
    states = _sources(n, seed=3)
    upd = _first_move(make_rng(5), index, n)
    r1, r2, T, s = upd["r1"], upd["r2"], upd["T"], upd["step"]
    m = upd["members"]
    cur, best, worst, rand = states[m["current"]], states[m["best"]], states[m["worst"]], states[m["random"]]
    new = apply_update(upd, states, "ties", {"threshold": 0.01})
    coefficients = [0.0] * (n + 2)
    for role, c in (("current", 1.0), ("best", s * r1), ("random", s * (r2 - T * r1)), ("worst", -s * r2)):
        coefficients[m[role]] += c
    one = apply_update({"kind": "combine", "weights": coefficients, "seed": 0}, states, "ties", {"threshold": 0.01})
    for key in cur:
        part1 = _ties_by_hand([best[key], rand[key]], [r1, -r1 * T])
        part2 = _ties_by_hand([worst[key], rand[key]], [-r2, r2])
        by_hand = _ties_by_hand([cur[key], part1, part2], [1.0, s, s])
        assert torch.allclose(new[key], by_hand, rtol=1e-5, atol=1e-6), key
        assert not torch.allclose(new[key], one[key], atol=1e-3), key


def test_published_rule_moves_above_0_2_and_explores_a_fifth_of_the_time():
    rng = make_rng(2)
    branches = []
    for _ in range(3000):
        r4 = float(rng_from_state(rng_state(rng)).random(4)[3])
        upd = published_update(0, 5, 5, 6, 1.0, rng)
        assert upd["branch"] == ("move" if r4 > 0.2 else "explore")
        branches.append(upd["branch"])
    assert 0.18 < branches.count("explore") / len(branches) < 0.22
    assert any(0.2 < float(rng_from_state(rng_state(make_rng(s))).random(4)[3]) <= 0.5 for s in range(20))


def test_published_explore_draws_each_tensor_within_the_random_members_max_abs():
    n, index = 3, 0
    states = _sources(n, seed=1)
    for member in states:
        member["a"] = member["a"].to(torch.bfloat16)
    rng = make_rng(0)
    upd = next(u for u in (published_update(index, n, n, n + 1, 1.0, rng) for _ in range(100))
               if u["branch"] == "explore")
    rand = states[upd["members"]["random"]]
    new = apply_update(upd, states, "ties")  # the merge method plays no part
    again = apply_update(upd, [{k: v + 100 for k, v in s.items()} if j != upd["members"]["random"] else s
                               for j, s in enumerate(states)])
    for key, t in rand.items():
        bound = float(t.abs().max())
        assert new[key].dtype == t.dtype and new[key].shape == t.shape
        assert float(new[key].abs().max()) <= bound and float(new[key].abs().max()) > 0.5 * bound
        assert float(new[key].min()) < 0 < float(new[key].max())
        assert torch.equal(new[key], again[key])  # seeded, and only the random member's bounds matter
    other = apply_update({**upd, "seed": upd["seed"] + 1}, states)
    assert not torch.equal(other["a"], new["a"])


def test_published_restart_is_a_copy_of_another_member_whatever_the_method():
    states = _sources(4, seed=2)
    rng = make_rng(4)
    seen = set()
    for _ in range(40):
        upd = published_update(3, 4, 4, 5, 1.0, rng, restart=True)
        assert upd["branch"] == "restart" and upd["members"]["random"] != 3
        seen.add(upd["members"]["random"])
        new = apply_update(upd, states, "ties", {"threshold": 0.5})
        assert all(torch.equal(new[k], states[upd["members"]["random"]][k]) for k in new)
    assert seen == {0, 1, 2}


def test_published_optimizer_uses_the_global_extremes_and_restarts_the_best_too():
    """PublishedBWR: best and worst are sources n and n + 1 (global_best/, global_worst/) whatever the current
    utilities; a member is restarted (a copy, instead of its move) once restart_patience * patience history
    entries have passed since its best, the current best included; state() restores it."""
    from types import SimpleNamespace
    import optimizers
    args = SimpleNamespace(optimizer="bwr", rule="published_code", greedy=1, restart_stray_candidates=1,
                           restart_patience=0.5, patience=4)
    opt = optimizers.make(args, 3)
    assert type(opt).__name__ == "PublishedBWR" and opt.extremes and not opt.restarts
    rng = make_rng(0)
    opt.start([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0.5, 0.9, 0.1], rng)
    opt.begin([0.5, 0.9, 0.1], 1.0, rng)
    ups = [opt.propose(i, rng) for i in range(3)]
    assert all(u["branch"] != "restart" for u in ups)
    assert all(u["members"].get("best", 3) == 3 and u["members"].get("worst", 4) == 4 for u in ups)
    opt.end({0: (0.6, True), 1: (0.8, False)})  # member 2 was skipped: it goes stale as well
    restored = optimizers.make(args, 3, json.loads(json.dumps(opt.state())))
    restored.begin([0.6, 0.9, 0.1], 1.0, rng)
    assert [restored.propose(i, rng)["branch"] == "restart" for i in range(3)] == [False, True, True]
    readme = SimpleNamespace(**{**vars(args), "rule": "readme", "reset_mode": "scaled_random"})
    assert type(optimizers.make(readme, 3)).__name__ == "BWR"
