"""The Best-Worst-Random (BWR) update rule for searching over adapter merges.

BWR (R. V. Rao's Best-Worst-Random algorithm) is a population-based, parameter-free search:

1. Initialize a population of candidate models.
2. Evaluate each candidate and identify the best and the worst.
3. For each iteration, for each candidate:
     draw r1, r2, r3, r4 ~ U(0, 1), T from {1, 2}, and another candidate `random`;
     if r4 > 0.5:  new = current + r1 * (best - T * random) - r2 * (worst - random)
     otherwise:    reset the candidate: new = random * r3
   then evaluate all candidates and update the best and the worst.
4. Return the best model found.

Here the rule acts in weight space with a step length s scaling the move:

    new = current + s * (r1 * (best - T * random) - r2 * (worst - random))

Models are never built by the rule itself: ``bwr_update`` returns the update as a coefficient
vector over the population members (new = sum_j c_j * member_j, coefficients adding where
indices coincide, e.g. current == best), and ``apply_update`` turns it into a state dict with a
merge method from merge.py. Two reset modes exist:

  scaled_random (default)  new = r3 * random   (coefficient r3 on the random member)
  bounds                   Rao's original reset: every entry drawn uniformly between the
                           population's element-wise min and max

Draw order per ``bwr_update`` call (fixed; a resumed run replays it bit for bit), all from the
given numpy Generator, always all of them whatever the branch taken:
  1. r1, r2, r3, r4 = rng.random(4)
  2. T              = rng.integers(1, 3)                 (1 or 2)
  3. k              = rng.integers(0, population_size-1) -> random = k if k < index else k + 1
                      (uniform over the other members, never the candidate itself)
  4. seed           = rng.integers(0, 2**63 - 1)         (bounds reset draw, DARE drop masks)

The published code's rule (``published_update``, --rule published_code) is a second update kind,
"published", described there.

This module is pure: no I/O, all randomness from the numpy Generator passed in (and torch
Generators seeded from it).
"""

import math
import numbers

import numpy as np

from merge import check_states, derive_seed, merge_state_dicts

# torch is imported where a state dict is built (_bounds_draw), as in merge.py: search.py imports this module before
# it starts the workers

RESET_MODES = ("scaled_random", "bounds")


def make_rng(seed):
    """A numpy Generator (PCG64) for the search."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def rng_state(rng):
    """Exact, JSON-serialisable state of ``rng`` (its bit generator's state)."""
    return _plain(rng.bit_generator.state)


def _plain(obj):
    # bit_generator.state may hold numpy integers/arrays (e.g. MT19937's key); JSON needs builtins
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def rng_from_state(state):
    """A Generator that continues exactly where the one ``rng_state`` was taken from left off."""
    if not isinstance(state, dict) or "bit_generator" not in state:
        raise ValueError("rng state must be a dict from rng_state() with a 'bit_generator' entry")
    name = state["bit_generator"]
    cls = getattr(np.random, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise ValueError(f"unknown bit generator {name!r} in rng state")
    bitgen = cls()
    if isinstance(bitgen, np.random.MT19937) and isinstance(state.get("state", {}).get("key"), list):
        state = dict(state, state=dict(state["state"], key=np.asarray(state["state"]["key"], dtype=np.uint32)))
    bitgen.state = state
    return np.random.Generator(bitgen)


def _member(name, value, n):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < n:
        raise ValueError(f"{name} must be a member index in 0..{n - 1}, got {value!r}")
    return int(value)


def bwr_update(index, best, worst, population_size, step_length, rng, reset_mode="scaled_random"):
    """One BWR move for candidate ``index``, as data (see the module docstring for the draws).

    Returns {"kind": "combine", "weights": [c_0 .. c_{n-1}], "random": j, "seed": s}
         or {"kind": "bounds", "seed": s, "random": j}.
    For "combine", new = sum_j c_j * member_j. With the update branch (r4 > 0.5):
      c[index] += 1, c[best] += s*r1, c[random] += s*(r2 - T*r1), c[worst] -= s*r2
    and with the scaled_random reset: c[random] = r3.
    "seed" seeds any randomness of applying the update (DARE drop masks, bounds draw);
    "random" is the member drawn as `random`, kept for logs.
    """
    if isinstance(population_size, bool) or not isinstance(population_size, numbers.Integral) or population_size < 2:
        raise ValueError(f"population_size must be an integer >= 2 (BWR needs another member), got {population_size!r}")
    n = int(population_size)
    index, best, worst = _member("index", index, n), _member("best", best, n), _member("worst", worst, n)
    if isinstance(step_length, bool) or not isinstance(step_length, numbers.Real) or not math.isfinite(step_length):
        raise ValueError(f"step_length must be a finite number, got {step_length!r}")
    if reset_mode not in RESET_MODES:
        raise ValueError(f"unknown reset_mode {reset_mode!r}; choose one of {', '.join(RESET_MODES)}")
    step = float(step_length)

    r1, r2, r3, r4 = (float(x) for x in rng.random(4))
    T = int(rng.integers(1, 3))
    k = int(rng.integers(0, n - 1))
    rand = k if k < index else k + 1
    seed = int(rng.integers(0, 2**63 - 1))

    if r4 > 0.5:
        c = [0.0] * n
        c[index] += 1.0
        c[best] += step * r1
        c[rand] += step * (r2 - T * r1)
        c[worst] -= step * r2
        return {"kind": "combine", "weights": c, "random": rand, "seed": seed}
    if reset_mode == "bounds":
        return {"kind": "bounds", "seed": seed, "random": rand}
    c = [0.0] * n
    c[rand] = r3
    return {"kind": "combine", "weights": c, "random": rand, "seed": seed}


def _bounds_draw(states, seed, names=None):
    """Every entry uniform in [min_j member_j, max_j member_j], per tensor seeded from ``seed``."""
    import torch
    check_states(states, names)
    out = {}
    for key, t0 in states[0].items():
        if not t0.is_floating_point():
            if any(not torch.equal(s[key].to(t0.device), t0) for s in states[1:]):
                raise ValueError(f"non-float tensor {key!r} differs between population members; "
                                 f"it has no element-wise bounds to draw from")
            out[key] = t0.clone()
            continue
        lo = t0.to(torch.float32, copy=True)
        hi = lo.clone()
        for s in states[1:]:
            t = s[key].to(device=t0.device, dtype=torch.float32)
            torch.minimum(lo, t, out=lo)
            torch.maximum(hi, t, out=hi)
        # CPU generator: the same seed gives the same model whatever device merges it
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, key))
        u = torch.rand(t0.shape, generator=gen).to(t0.device)
        out[key] = hi.sub_(lo).mul_(u).add_(lo).to(t0.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The published code's rule (RKS-2804/test-fin, search.py candidate_update), --rule published_code

PUBLISHED_MOVE_ABOVE = 0.2  # the published code moves when r4 > 0.2 (the seed README: r4 > 0.5)


def published_update(index, n_members, best, worst, step_length, rng, restart=False):
    """One step of the published code for member ``index``, as data.

    best and worst are source indices (the search passes the global best and the worst-ever model, which it
    places after the n_members members); the random member is one of the others, never ``index``.
      restart (a stray member):  {"branch": "restart", "members": {"random": j}}
          the new model is a copy of member j; it replaces this iteration's move (the best is not exempt)
      r4 > 0.2:                  {"branch": "move", "members": {current, best, worst, random}, r1, r2, T, step}
          part1 = merge([r1, -r1*T], [best, random]); part2 = merge([-r2, r2], [worst, random])
          new   = merge([1, s, s], [current, part1, part2])   (three merges, whatever the merge method)
      otherwise:                 {"branch": "explore", "members": {"random": j}, "seed": seed}
          every tensor drawn uniformly in [-max|t|, +max|t|] of member j's same tensor (r3 unused)
    Draws: a restart draws only k; otherwise r1, r2, r3, r4 = rng.random(4), T = rng.integers(1, 3), k, then
    seed = rng.integers(0, 2**63 - 1); random = k if k < index else k + 1, k = rng.integers(0, n_members - 1).
    """
    if isinstance(n_members, bool) or not isinstance(n_members, numbers.Integral) or n_members < 2:
        raise ValueError(f"n_members must be an integer >= 2 (BWR needs another member), got {n_members!r}")
    index = _member("index", index, n_members)
    if restart:
        k = int(rng.integers(0, n_members - 1))
        return {"kind": "published", "branch": "restart", "members": {"random": k if k < index else k + 1}}
    if isinstance(step_length, bool) or not isinstance(step_length, numbers.Real) or not math.isfinite(step_length):
        raise ValueError(f"step_length must be a finite number, got {step_length!r}")
    r1, r2, r3, r4 = (float(x) for x in rng.random(4))
    T = int(rng.integers(1, 3))
    k = int(rng.integers(0, n_members - 1))
    rand = k if k < index else k + 1
    seed = int(rng.integers(0, 2**63 - 1))
    if r4 > PUBLISHED_MOVE_ABOVE:
        return {"kind": "published", "branch": "move", "members": {"current": index, "best": int(best),
                "worst": int(worst), "random": rand}, "r1": r1, "r2": r2, "T": T, "step": float(step_length),
                "seed": seed}
    return {"kind": "published", "branch": "explore", "members": {"random": rand}, "seed": seed}


def _published_step(update, states, method, params, names):
    """The state dict a "published" update describes (see published_update); states are indexed by its members."""
    role = {name: states[j] for name, j in update["members"].items()}
    label = {name: (names[j] if names else f"adapter {j}") for name, j in update["members"].items()}
    if update["branch"] == "restart":
        return {key: t.clone() for key, t in role["random"].items()}
    seed = update["seed"]
    if update["branch"] == "explore":
        return _explore_draw(role["random"], seed)
    r1, r2, T, s = update["r1"], update["r2"], update["T"], update["step"]
    # DARE's drop masks: one seed per merge, so the three merges draw independent masks
    part1 = merge_state_dicts([role["best"], role["random"]], [r1, -r1 * T], method, params,
                              names=[label["best"], label["random"]], seed=derive_seed(seed, "part1"))
    part2 = merge_state_dicts([role["worst"], role["random"]], [-r2, r2], method, params,
                              names=[label["worst"], label["random"]], seed=derive_seed(seed, "part2"))
    return merge_state_dicts([role["current"], part1, part2], [1.0, s, s], method, params,
                             names=[label["current"], "part1", "part2"], seed=derive_seed(seed, "new"))


def _explore_draw(reference, seed):
    """Every floating tensor uniform in [-max|t|, +max|t|] of the reference's tensor, per tensor seeded from
    ``seed`` (the published code draws from torch's global generator, unseeded); other tensors are copied."""
    import torch
    out = {}
    for key, t in reference.items():
        if not t.is_floating_point():
            out[key] = t.clone()
            continue
        bound = t.detach().abs().max().to(torch.float32) if t.numel() else torch.zeros((), dtype=torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, key))
        u = torch.rand(t.shape, generator=gen).to(t.device)
        out[key] = u.mul_(2 * bound).sub_(bound).to(t.dtype)  # L + (U - L) * u with L = -bound, U = +bound
    return out


def describe_update(update):
    """The branch an update took, for log.txt: "move", "explore ..." or "restart-copy ..." (published), or ""."""
    if update.get("kind") != "published":
        return ""
    j = update["members"]["random"]
    if update["branch"] == "restart":
        return f"restart-copy of candidate_{j} (stray)"
    if update["branch"] == "explore":
        return f"explore (uniform in +-max|t| of candidate_{j})"
    return f"move (r4 > {PUBLISHED_MOVE_ABOVE}, random candidate_{j}, T {update['T']})"


def apply_update(update, states, method="weighted_average", params=None, names=None):
    """Build the state dict an update from ``bwr_update`` or ``published_update`` describes.

    states are the update's sources in order (coefficient j applies to states[j]; a "published" update's
    members index this list; a base_model_idx in params indexes the inputs of each merge). "combine" merges
    with ``method``; "bounds" ignores method and draws element-wise between the members' min and max;
    "published" is the published code's step (its moves are three merges with ``method``).
    """
    if not isinstance(update, dict) or update.get("kind") not in ("combine", "bounds", "published"):
        raise ValueError(f"update must be a dict from bwr_update() with kind 'combine' or 'bounds', or from "
                         f"published_update(), got {update!r}")
    seed = update.get("seed", 0)
    if update["kind"] == "published":
        return _published_step(update, states, method, params, names)
    if update["kind"] == "bounds":
        return _bounds_draw(states, seed, names)
    return merge_state_dicts(states, update["weights"], method, params, names=names, seed=seed)


def accept(old_utility, new_utility, greedy):
    """Whether a candidate moves to its new model.

    greedy: only if new > old, strictly (as the published loop: an equal score keeps the current model). Not
    greedy: always. A NaN new utility is never accepted; a NaN old one (a broken candidate) is replaced by any
    non-NaN new one.
    """
    new, old = float(new_utility), float(old_utility)
    if math.isnan(new):
        return False
    if not greedy or math.isnan(old):
        return True
    return new > old


def crossover(rng):
    """Weights (w, 1 - w) with w ~ U[0, 2] for mixing two experts into an initial one."""
    w = float(rng.uniform(0.0, 2.0))
    return w, 1.0 - w


# ----------------------------------------------------------------------------------------------------------------
# Early rejection (--early_reject): stop scoring a proposal once it cannot be kept. Greedy acceptance keeps a
# proposal only if mean(s) > mean(m) over all N dev items (s: its per-item scores, m: its member's, both in
# [low, high]). Each proposal scores its items in its own order (`rejection_order`): the items its member scored
# lowest first, among those the ones the population scored lowest (a merge of the population is most likely to
# score low there too), so that a losing proposal's shortfall shows up early. Items that the member and the
# population score alike form a group, shuffled by a seed of the proposal's own. After each chunk of n items:
#   exact:       even a perfect score on every unseen item leaves mean(s) <= mean(m): the full evaluation would
#                reject it too, so every decision (and byte of the search) is that of a full evaluation, whatever
#                the order;
#   statistical: also when the unseen rest of the group the look falls in is bounded by Hoeffding-Serfling at level
#                alpha / looks instead of by its maximum (its seen items are a uniform sample without replacement of
#                that group, as the shuffle is independent of every score), and even so the proposal cannot win.
#                The union over the looks makes the chance of ever stopping a proposal whose full mean beats its
#                member's at most alpha (DESIGN.md, Early rejection).

EARLY_REJECT_LOOKS = (0.25, 0.5, 0.75)  # where a proposal may stop, as shares of the dev set (docs/early_reject.md)
GRADES = 10  # a group shares the member's score and the population's mean score, each rounded to 1/10 of the range


def early_reject_chunks(member_scores, high, low, alpha=0.0, groups=None, integer=False, looks=EARLY_REJECT_LOOKS):
    """The cumulative item counts after which a proposal is checked, ending with all N items: the looks (shares of
    N) at which some proposal could be stopped. cannot_win is monotone in the seen scores, so a look at which even
    scoring low on every seen item would not stop it stops none, and it would only cost a chunk."""
    n_items = len(member_scores)
    ends = sorted({min(n_items, max(1, int(round(share * n_items)))) for share in looks} | {n_items})
    return [end for end in ends if end == n_items or (end > 0 and cannot_win([low] * end, member_scores, high, low,
                                                                             alpha, groups, integer, len(looks)))]


def rejection_order(member_scores, population_scores, score_range, seed):
    """(order, groups) in which a proposal scores its items: order lists item indices, lowest (member score,
    population mean score) first, shuffled within a group by seed; groups gives the groups' sizes along the order."""
    low, high = score_range
    n_items = len(member_scores)
    if n_items == 0:
        return [], []
    population_mean = np.mean(np.asarray(population_scores, dtype=float), axis=0)

    def grade(x):  # np.rint rounds half to even, as round() does
        return np.rint(GRADES * (np.asarray(x, dtype=float) - low) / (high - low)).astype(np.int64)
    member_grade, population_grade = grade(member_scores), grade(population_mean)
    shuffle = np.random.default_rng(seed).permutation(n_items)  # independent of every score
    order = np.lexsort((shuffle, population_grade, member_grade))  # the driver builds one per proposal: numpy
    keys = np.stack([member_grade[order], population_grade[order]], axis=1)
    group_starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
    groups = np.diff(np.r_[group_starts, n_items])
    return order.tolist(), groups.tolist()


def serfling_radius(n, n_items, score_range, delta):
    """Hoeffding-Serfling (Serfling 1974): for n of n_items values in an interval of width score_range drawn
    without replacement, P(population mean - sample mean >= radius) <= delta."""
    if n >= n_items:
        return 0.0
    return score_range * math.sqrt((1.0 - (n - 1) / n_items) * math.log(1.0 / delta) / (2.0 * n))


def cannot_win(seen_scores, member_scores, high, low, alpha=0.0, groups=None, integer=False,
               looks=len(EARLY_REJECT_LOOKS)):
    """Whether a proposal whose first len(seen_scores) items (in its rejection_order, whose group sizes are groups)
    scored seen_scores can be rejected against its member's per-item scores member_scores (all N items): exactly
    (alpha 0: it cannot beat the member even scoring high on every unseen item), or also statistically (alpha > 0:
    the unseen rest of the group the look falls in bounded at level alpha / looks). integer: every score is a whole
    number (EvalType.integer_scores), so a proposal that can at best tie is stopped too."""
    n, n_items = len(seen_scores), len(member_scores)
    if n == 0 or n >= n_items:
        return False
    seen, member = math.fsum(seen_scores), math.fsum(member_scores)
    # kept needs a strictly higher mean. Whole-number scores sum exactly in floats and both utilities are sum / N,
    # so an equal sum is an equal utility, not kept. Other scores: a margin far above the rounding of two fsums and
    # a mean, so a float-rounding win is never stopped
    margin = 0.0 if integer else 1e-9 * n_items * max(1.0, abs(high), abs(low))
    if seen + (n_items - n) * high <= member - margin:
        return True
    if alpha <= 0.0 or not groups:
        return False
    start = 0  # the group of the first unseen item: [start, start + size) along the order, n - start of it seen
    for size in groups:
        if start + size > n:
            break
        start += size
    in_group = n - start
    if in_group == 0:
        return False
    group_mean = math.fsum(seen_scores[start:]) / in_group
    radius = serfling_radius(in_group, size, high - low, alpha / looks)
    rest_of_group = min(high * (size - in_group), (group_mean + radius) * size - group_mean * in_group)
    return seen + rest_of_group + (n_items - start - size) * high <= member - margin

