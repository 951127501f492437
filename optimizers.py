"""The optimizers search.py can run (--optimizer): each one small class behind one interface.

Every optimizer works on the same population (candidate_0 .. candidate_{n-1}), the same workers, merge methods,
objectives and outputs. An iteration is: propose one update per member -> the workers merge and evaluate them ->
accept -> (BWR only) restart stray members -> commit. What an optimizer decides is the update each member gets
and whether the member keeps it; search.py does everything else.

Two representations of a proposal (an update dict as bwr.apply_update takes it):
  over = "population"  coefficients over the current members (BWR: its rule is written in terms of the
                       population's best, worst and a random member), or BWR's "bounds" reset
  over = "experts"     coefficients over the initial experts: a candidate is always the merge
                       sum_j c_j * expert_j (PSO, CMA-ES, random search). With --merge_method weighted_average
                       (merging LoRA factors linearly) every BWR candidate is such a merge too; the other
                       optimizers search the coefficient vector directly.

The interface (state() must hold everything from_state() needs; it goes into state.json):
    start(coefficients, utilities, rng)   after the initial evaluation; coefficients: each member's vector over
                                          the experts (one-hot for an expert, two entries for a crossover child)
    begin(utilities, step_length, rng)    once per iteration, before the proposals
    propose(i, rng) -> update             member i's update for this iteration (over the members, then
                                          global_best/ and global_worst/ when extremes is set)
    end(outcomes)                         {member: (utility, accepted)} of the members evaluated this iteration
    restart(i, best, n_members, n_experts, rng) -> weights over members + experts  (restarts = True only)
    state() -> dict ; from_state(args, n_experts, state)

An optimizer owns its settings: `flags` declares its command-line flags (search.py adds them to its parser, one
argument group per optimizer) and `check(args, merge_params)` refuses the combinations of the search's arguments it
cannot honour; check_args runs both before the search starts. @register makes a class an --optimizer choice.

Draws come from the search's numpy Generator in a fixed order (the search's own state is restored bit for bit
on resume). CMA-ES keeps its own state; it is restored by replaying its recorded generations (ask, tell the
recorded utilities) from its seed, which gives back the identical internal state on the same machine.
"""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import bwr


class OptimizerArgsError(ValueError):
    """An optimizer's flag out of range, or a combination it refuses: search.py reports it in one line (exit 2)."""


@dataclass(frozen=True)
class Flag:
    """A command-line flag an optimizer owns, declared on its class: search.py's -h lists it in that optimizer's
    group; check_args checks its range, and refuses it (set to anything but its default) with another optimizer."""
    name: str                       # --name, and the attribute of the parsed arguments
    type: type                      # float, int or str
    default: object
    help: str
    valid: Callable = None          # value -> True when it is in range (None: any value of `type`)
    valid_text: str = ""            # what is valid, for the error: "a number >= 0"
    choices: tuple = None           # the values a str flag may take


NON_NEGATIVE = {"valid": lambda v: v >= 0 and math.isfinite(v), "valid_text": "a number >= 0"}
POSITIVE = {"valid": lambda v: v > 0 and math.isfinite(v), "valid_text": "a number > 0"}


class Optimizer:
    name = None
    help = ""          # one line: --optimizer's -h and this optimizer's flag group
    flags = ()         # its own command-line flags (Flag)
    over = "population"
    greedy = False     # keep an update only if it scores strictly better than the member's current utility
    rejects_early = False  # --early_reject applies: greedy, and a rejected proposal's utility is read nowhere
    restarts = False   # search.py restarts stray members with restart()
    extremes = False   # over the population: search.py appends global_best/ and global_worst/ to the sources

    @classmethod
    def check(cls, args, merge_params):
        """Raise OptimizerArgsError for a combination of the search's arguments this optimizer cannot honour (refused
        rather than silently ignored). Its flags' ranges are checked before, from their declarations."""

    def start(self, coefficients, utilities, rng):
        pass

    def begin(self, utilities, step_length, rng):
        pass

    def propose(self, i, rng):
        raise NotImplementedError

    def end(self, outcomes):
        pass

    def state(self):
        return {}


# --rule (a BWR flag): BWR's step as the seed README states it, or as the published code runs it
RULES = ("readme", "published_code")

CLASSES = {}  # --optimizer's choices: name -> class, in registration order


def register(cls):
    """Class decorator: makes cls an --optimizer choice and its flags search.py's options."""
    if cls.name in CLASSES:
        raise ValueError(f"optimizer {cls.name!r} is already registered")
    taken = {flag.name for other in CLASSES.values() for flag in other.flags}
    clash = sorted(taken & {flag.name for flag in cls.flags})
    if clash:
        raise ValueError(f"optimizer {cls.name!r}: --{clash[0]} is already another optimizer's flag")
    CLASSES[cls.name] = cls
    return cls


def check_args(args, merge_params):
    """Every optimizer's flags in range; another optimizer's flag left at its default (it would be ignored; a
    --resume of a search that recorded one before this check existed still runs); then what --optimizer's class
    refuses. Raises OptimizerArgsError."""
    chosen = CLASSES[args.optimizer]
    for cls in CLASSES.values():
        for flag in cls.flags:
            value = getattr(args, flag.name)
            if flag.valid is not None and not flag.valid(value):
                raise OptimizerArgsError(f"--{flag.name} {value} is out of range: it must be {flag.valid_text}")
            if cls is not chosen and value != flag.default and not getattr(args, "resume", None):
                raise OptimizerArgsError(f"--{flag.name} is a {cls.name} setting; --optimizer {args.optimizer} does "
                                         f"not use it: use --optimizer {cls.name} or leave --{flag.name} out")
    chosen.check(args, merge_params)
    if getattr(args, "early_reject", None) is not None and not (chosen.rejects_early and args.greedy):
        able = ", ".join(name for name, cls in CLASSES.items() if cls.rejects_early)
        raise OptimizerArgsError(f"--early_reject stops scoring proposals that cannot be kept, so it needs greedy "
                                 f"acceptance whose rejected proposals no optimizer state reads: --optimizer {able} "
                                 f"with --greedy 1 (not --optimizer {args.optimizer} --greedy {args.greedy})")


def optimizers_help():
    """--optimizer's -h text, from the registered classes."""
    over_experts = [name for name, cls in CLASSES.items() if cls.over == "experts"]
    return "; ".join(f"{name}: {cls.help}" for name, cls in CLASSES.items()) + (
        f" ({', '.join(over_experts)} search coefficient vectors over the initial experts)" if over_experts else "")


# ----------------------------------------------------------------------------------------------------------------
# BWR: the seed README's rule (bwr.py), over the population

@register
class BWR(Optimizer):
    """Best-Worst-Random (bwr.bwr_update): best and worst are the current population's (seed README: "identify the
    best and worst models" among the evaluated candidates). Greedy by default (--greedy); stray members restarted
    by search.py as a crossover of the population's best and a random initial expert. --rule published_code runs
    PublishedBWR instead (make())."""
    name = "bwr"
    rejects_early = True
    help = "the Best-Worst-Random rule"
    flags = (
        Flag("reset_mode", str, "scaled_random", "BWR reset branch: random * r3 (seed README) or uniform between "
             "population min and max (Rao)", choices=bwr.RESET_MODES),
        Flag("rule", str, "readme", "bwr's step: 'readme', the seed README's rule; 'published_code', the published "
             "search.py's (r4 > 0.2 moves in three merges, else every tensor uniform in +-max|t| of a random member; "
             "best and worst are the global best and the worst ever; a stray member's restart, a copy of another "
             "member, replaces its move). The merge methods stay this project's (the published TIES ignores its "
             "weights)", choices=RULES),
    )
    restarts = True

    @classmethod
    def check(cls, args, merge_params):
        if args.reset_mode == "bounds" and not args.fast_merge:
            raise OptimizerArgsError("--reset_mode bounds needs adapter experts (--fast_merge 1)")
        if args.rule != "published_code":
            return
        if args.reset_mode != "scaled_random":
            raise OptimizerArgsError(
                f"--reset_mode {args.reset_mode} is the seed README rule's reset; --rule published_code explores with "
                f"its own draw (uniform in +-max|t| of a random member): leave --reset_mode at scaled_random "
                f"(search_demo.sh: add --reset_mode scaled_random)")
        if not args.fast_merge:
            raise OptimizerArgsError("--rule published_code needs adapter experts (--fast_merge 1)")
        base_index = merge_params.get("base_model_idx")
        if base_index is not None and base_index > 1:
            raise OptimizerArgsError(f"--merge_params base_model_idx {base_index} is out of range for --rule "
                                     f"published_code, whose merges have two inputs first (best, random; worst, "
                                     f"random): use 0 or 1")

    def __init__(self, args, n_experts, state=None):
        self.greedy = bool(args.greedy)
        self.reset_mode = args.reset_mode
        self.best = self.worst = self.n = self.step = None

    def begin(self, utilities, step_length, rng):
        self.n = len(utilities)
        self.best = max(range(self.n), key=lambda i: (utilities[i], -i))
        self.worst = min(range(self.n), key=lambda i: (utilities[i], i))
        self.step = step_length

    def propose(self, i, rng):
        return bwr.bwr_update(i, self.best, self.worst, self.n, self.step, rng, self.reset_mode)

    def restart(self, i, best, n_members, n_experts, rng):
        partner = int(rng.integers(0, n_experts))
        w, w2 = bwr.crossover(rng)
        weights = [0.0] * (n_members + n_experts)
        weights[best] += w
        weights[n_members + partner] += w2
        return weights


class PublishedBWR(Optimizer):
    """BWR as the published code runs it (--rule published_code; bwr.published_update): best and worst are the
    global best and the worst-ever model (the published best/ and worst/ folders: search.py's global_best/ and
    global_worst/, sources n and n + 1); a member without improvement for restart_patience * patience history
    entries (the published count: the entries since its best first appeared, this iteration's start included)
    is restarted as a copy of another random member *instead of* this iteration's move, compared with the original
    like any update, the best not exempt. Its staleness is its own state: the same rule as search.py's for the
    seed README's restarts (a member is fresh again when a kept update scores strictly higher)."""
    name = "bwr"
    rejects_early = True
    extremes = True

    def __init__(self, args, n_experts, state=None):
        self.greedy = bool(args.greedy)
        self.restart_after = args.restart_patience * args.patience if args.restart_stray_candidates else None
        self.s = state or {}
        self.n = self.step = self.utilities = None

    def start(self, coefficients, utilities, rng):
        self.s = {"stale": [0] * len(utilities)}

    def begin(self, utilities, step_length, rng):
        self.n, self.step, self.utilities = len(utilities), step_length, list(utilities)

    def propose(self, i, rng):
        # the published test: len(history) - first index of its best >= restart_patience * patience, where the
        # history holds stale + 1 entries from that index on
        stray = self.restart_after is not None and self.s["stale"][i] + 1 >= self.restart_after
        return bwr.published_update(i, self.n, self.n, self.n + 1, self.step, rng, restart=stray)

    def end(self, outcomes):
        for i in range(self.n):
            utility, accepted = outcomes.get(i, (math.nan, False))
            self.s["stale"][i] = 0 if accepted and utility > self.utilities[i] else self.s["stale"][i] + 1

    def state(self):
        return self.s


# ----------------------------------------------------------------------------------------------------------------
# PSO as in Model Swarms (Feng et al., 2024), over the experts' coefficient vector

@register
class PSO(Optimizer):
    """Model Swarms' particle update, with its published defaults (inertia 0.4, cognitive 0.3, social 0.3,
    repel 0.3, random weights, a random starting velocity towards another particle, step length 1 decaying by
    0.95 to at least 0.1, stray particles restarted at their personal best with zero velocity):

        r_v, r_p, r_g, r_w ~ U(0, 1);  a = inertia*r_v, b = cognitive*r_p, c = social*r_g, d = repel*r_w
        v <- (a*v + b*(p - x) + c*(g - x) + d*(x - g_worst)) / (a + b + c + d)
        x <- x + step_length * v

    p: the particle's personal best, g: the global best, g_worst: the global worst ever (as Model Swarms).
    Particles always move (--greedy does not apply); a particle whose merge is not finite stays where it was,
    with zero velocity. A particle is restarted (x <- p, v <- 0, then updated) when its personal best is
    restart_patience * patience history entries old, Model Swarms' rule."""
    name = "pso"
    help = "Model Swarms' particle swarm"
    flags = (
        Flag("inertia", float, 0.4, "weight of the particle's velocity (Model Swarms' default)", **NON_NEGATIVE),
        Flag("cognitive_coeff", float, 0.3, "weight of the pull to the personal best", **NON_NEGATIVE),
        Flag("social_coeff", float, 0.3, "weight of the pull to the global best", **NON_NEGATIVE),
        Flag("repel_coeff", float, 0.3, "weight of the push away from the global worst", **NON_NEGATIVE),
    )
    over = "experts"

    @classmethod
    def check(cls, args, merge_params):
        if sum((args.inertia, args.cognitive_coeff, args.social_coeff, args.repel_coeff)) <= 0:
            raise OptimizerArgsError("--inertia, --cognitive_coeff, --social_coeff and --repel_coeff are all 0: pso "
                                     "needs one > 0")

    def __init__(self, args, n_experts, state=None):
        self.weights = (args.inertia, args.cognitive_coeff, args.social_coeff, args.repel_coeff)
        self.restart_after = args.restart_patience * args.patience if args.restart_stray_candidates else None
        self.s = state or {}
        self.pending = {}

    def start(self, coefficients, utilities, rng):
        n = len(coefficients)
        x = [list(map(float, c)) for c in coefficients]
        v = []
        for i in range(n):  # Model Swarms' "random" starting velocity: towards another random particle
            k = int(rng.integers(0, n - 1))
            j = k if k < i else k + 1
            v.append([b - a for a, b in zip(x[i], x[j])])
        self.s = {"x": x, "v": v, "p": [list(c) for c in x], "p_utility": list(map(float, utilities)),
                  "p_age": [0] * n}
        self._global(list(range(n)), x, utilities)

    def _global(self, members, positions, utilities):
        """Global best and global worst ever (strictly better / worse replaces; ties keep the earlier one)."""
        s = self.s
        for i, pos, u in zip(members, positions, utilities):
            if math.isnan(u):
                continue
            if "g" not in s or u > s["g_utility"]:
                s["g"], s["g_utility"] = list(pos), float(u)
            if "g_worst" not in s or u < s["g_worst_utility"]:
                s["g_worst"], s["g_worst_utility"] = list(pos), float(u)

    def begin(self, utilities, step_length, rng):
        self.step = step_length
        self.pending = {}

    def propose(self, i, rng):
        s = self.s
        x, v = s["x"][i], s["v"][i]
        if self.restart_after is not None and s["p_age"][i] + 1 >= self.restart_after:
            x, v = s["p"][i], [0.0] * len(x)
        r = rng.random(4)
        a, b, c, d = (float(w * ri) for w, ri in zip(self.weights, r))
        total = a + b + c + d
        new_v = [(a * vj + b * (pj - xj) + c * (gj - xj) + d * (xj - wj)) / total
                 for vj, xj, pj, gj, wj in zip(v, x, s["p"][i], s["g"], s["g_worst"])]
        new_x = [xj + self.step * vj for xj, vj in zip(x, new_v)]
        self.pending[i] = (new_x, new_v)
        return {"kind": "combine", "weights": new_x, "seed": int(rng.integers(0, 2**63 - 1))}

    def end(self, outcomes):
        s = self.s
        moved = []
        for i in range(len(s["x"])):
            if i not in outcomes:
                s["p_age"][i] += 1  # skipped (--dropN/--dropK) or cut by --max_evaluations: stays where it was
                continue
            utility, accepted = outcomes[i]
            if not accepted:  # not finite: it stays, without momentum
                s["v"][i] = [0.0] * len(s["v"][i])
                s["p_age"][i] += 1
                continue
            s["x"][i], s["v"][i] = self.pending[i]
            if utility > s["p_utility"][i]:
                s["p"][i], s["p_utility"][i], s["p_age"][i] = list(s["x"][i]), float(utility), 0
            else:
                s["p_age"][i] += 1
            moved.append(i)
        self._global(moved, [s["x"][i] for i in moved], [outcomes[i][0] for i in moved])

    def state(self):
        return self.s


# ----------------------------------------------------------------------------------------------------------------
# CMA-ES over the experts' coefficient vector (the cma package)

@register
class CMAES(Optimizer):
    """CMA-ES (Hansen's cma package) on the coefficient vector, population size = the search's population, mean
    started at the best initial member's coefficients (one-hot on the best expert), initial sigma --cma_sigma0.
    Each iteration asks one generation (candidate_i is its i-th sample) and tells it the dev utilities (negated:
    cma minimises; a sample whose merge is not finite counts as the worst of its generation). Its normal draws
    come from a Generator of its own, seeded from --seed, so its state is its seed plus the told utilities."""
    name = "cma_es"
    help = "CMA-ES"
    flags = (Flag("cma_sigma0", float, 0.5, "initial standard deviation of the coefficients", **POSITIVE),)
    over = "experts"

    @classmethod
    def check(cls, args, merge_params):
        if args.dropK > 0 or args.dropN > 0:
            raise OptimizerArgsError("--dropK/--dropN skip evaluations, and CMA-ES needs every sample of a generation "
                                     "scored: use them with --optimizer bwr, pso or random")

    def __init__(self, args, n_experts, state=None):
        self.sigma0 = args.cma_sigma0
        self.s = state or {}
        self.es = None
        self.asked = None
        if state:
            self._replay()

    def _new(self):
        import cma
        gen = np.random.Generator(np.random.PCG64(self.s["seed"]))
        opts = {"popsize": self.s["popsize"], "randn": lambda lam, n: gen.standard_normal((lam, n)),
                "seed": np.nan, "verbose": -9, "verb_disp": 0, "verb_log": 0}
        return cma.CMAEvolutionStrategy(np.asarray(self.s["x0"], dtype=float), self.s["sigma0"], opts)

    def _replay(self):
        self.es = self._new()
        for fitness in self.s["told"]:
            self.es.tell(self.es.ask(), fitness)

    def start(self, coefficients, utilities, rng):
        best = max(range(len(utilities)), key=lambda i: (utilities[i], -i))
        self.s = {"seed": int(rng.integers(0, 2**63 - 1)), "popsize": len(coefficients),
                  "x0": list(map(float, coefficients[best])), "sigma0": float(self.sigma0), "told": []}
        self._replay()

    def begin(self, utilities, step_length, rng):
        self.asked = self.es.ask()

    def propose(self, i, rng):
        return {"kind": "combine", "weights": [float(c) for c in self.asked[i]],
                "seed": int(rng.integers(0, 2**63 - 1))}

    def end(self, outcomes):
        if len(outcomes) < len(self.asked):
            return  # a generation cut short by --max_evaluations: the search stops here, nothing to tell
        utilities = [outcomes[i][0] for i in range(len(self.asked))]
        finite = [u for u in utilities if not math.isnan(u)]
        floor = (min(finite) if finite else 0.0) - 1.0
        fitness = [-(floor if math.isnan(u) else u) for u in utilities]
        self.es.tell(self.asked, fitness)
        self.s["told"].append(fitness)

    def state(self):
        return self.s


# ----------------------------------------------------------------------------------------------------------------
# Random search over the experts' coefficient vector

@register
class RandomSearch(Optimizer):
    """Each member draws a fresh coefficient vector every iteration: a direction uniform on the simplex
    (Dirichlet(1, ..., 1)) times a total weight uniform in [0, 2] (so the weights sum to 1 on average, as a
    weighted average, with up to 2x extrapolation of the total, as BWR's crossover draws w in [0, 2]). Greedy by
    default (--greedy): a member keeps the better of its current and new vector."""
    name = "random"
    rejects_early = True
    help = "random search"
    over = "experts"

    def __init__(self, args, n_experts, state=None):
        self.greedy = bool(args.greedy)
        self.n_experts = n_experts

    def propose(self, i, rng):
        direction = rng.dirichlet(np.ones(self.n_experts))
        total = float(rng.uniform(0.0, 2.0))
        return {"kind": "combine", "weights": [float(total * d) for d in direction],
                "seed": int(rng.integers(0, 2**63 - 1))}


def make(args, n_experts, state=None):
    """The optimizer named by args.optimizer (bwr under --rule published_code: PublishedBWR), fresh (state None)
    or restored from its state()."""
    if args.optimizer == "bwr" and getattr(args, "rule", "readme") == "published_code":
        return PublishedBWR(args, n_experts, state)
    return CLASSES[args.optimizer](args, n_experts, state)
