"""Merging of LoRA adapters (and full checkpoints) for BWR_model.

Merges work in LoRA factor space: every saved tensor (each ``lora_A`` and each
``lora_B`` separately) is combined on its own. Arithmetic is done in float32 and
the result is cast back to the dtype the first input uses for that tensor.

Layers:
  * the method registry: ``@merge_method`` with declared ``Param``s, ``MERGE_METHODS``, ``parse_merge_params``,
  * pure math: ``merge_state_dicts`` and the four registered methods,
  * I/O: ``load_adapter`` / ``save_adapter`` (safetensors only, atomic saves),
  * entry point kept from the published toolkit: ``lora_merge``, plus a small CLI:

    python merge.py --weights 0.5,0.5 --adapters a b --output out \
        [--merge_method ties] [--merge_params '{"threshold": 0.01}'] [--fast_merge 1] [--gpu cpu]

Every problem with the inputs raises ``MergeError`` with a one-line message naming the
adapter and the tensor at fault (a NaN/inf result: its subclass ``NonFiniteMergeError``);
nothing is skipped silently.
"""

import argparse
import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Callable

from safetensors import safe_open

import fileio

# torch (about 2 s to import) is imported inside the functions that use it: search.py reads this module's method
# registry to check its arguments and starts the workers before it needs torch, so that import overlaps theirs

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
# files never copied verbatim from the first input of a full-checkpoint merge: they are weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# adapter_config.json fields that change how the factors are scaled into the model: merging
# factors trained under different values would silently mean something else.
_CONFIG_MUST_MATCH = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora")


class MergeError(ValueError):
    """Bad merge input. The message is one line naming the adapter and tensor at fault."""


class NonFiniteMergeError(MergeError):
    """The merged result holds NaN/inf. The inputs were well formed, so a search rejects that candidate and goes on
    (every other MergeError is a mistake in the inputs and stops it)."""


# ----------------------------------------------------------------------------- the method registry
# A merge method is one function fn(tensors, weights, params, key, seed) -> float32 tensor, registered with
# @merge_method(name, Param(...), ...) (the shape of mergekit's @merge_method). Its parameters are declared once:
# parse_merge_params validates and fills defaults from the declaration, the -h texts of merge.py and search.py are
# written from it, and tests/test_merge.py runs every registered method through the same identity and linearity
# checks.

class InputIndex(int):
    """Parameter type: the position of one of the merged inputs (0-based), checked against their number at merge time."""


REQUIRED = object()  # Param default: the key must be given (when its variant is in use)

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@dataclass
class Param:
    """One declared parameter of a merge method.

    type:    float, int or InputIndex. Values arrive from JSON: bools are never numbers, an int is a valid float.
    default: the value when the key is absent; None means "off" and makes null a valid value; REQUIRED: no default.
    help:    one line for -h.
    valid:   the interval values must lie in, written as in maths: "[0, inf)", "(0, 1]" ("" = any finite value).
             InputIndex has its own range, 0 .. number of inputs - 1.
    variant: label of the alternative this key belongs to ("" = always used). Keys of different variants exclude
             each other; when none is given, the method's first variant is used.
    """
    name: str
    type: type
    default: object
    help: str
    valid: str = ""
    variant: str = ""

    def __post_init__(self):
        if self.type not in (float, int, InputIndex):
            raise ValueError(f"merge parameter {self.name!r}: type must be float, int or InputIndex, got {self.type!r}")
        if self.type is InputIndex and self.valid:
            raise ValueError(f"merge parameter {self.name!r}: an InputIndex has no 'valid' interval of its own")
        self.bounds = (-math.inf, math.inf, False, False)  # low, high, low included, high included
        if self.valid:
            m = _INTERVAL.match(self.valid)
            try:
                low, high = float(m.group(2)), float(m.group(3))
            except (AttributeError, ValueError):
                raise ValueError(f"merge parameter {self.name!r}: valid={self.valid!r} is not an interval "
                                 f"like '[0, 1)' or '(0, inf)'") from None
            self.bounds = (low, high, m.group(1) == "[", m.group(4) == "]")
        if self.default is not REQUIRED and self.default is not None:
            try:
                self.check(self.default, "")
            except MergeError:
                raise ValueError(f"merge parameter {self.name!r}: default {self.default!r} is not "
                                 f"{self.describe()}") from None

    def describe(self):
        """What a valid value is, e.g. 'a number in (0, 1]' or 'a non-negative integer or null'."""
        if self.type is InputIndex:
            text = "a non-negative integer"
        else:
            low, high, low_in, high_in = self.bounds
            text = "a number" if self.type is float else "an integer"
            if high == math.inf and low > -math.inf:
                text += f" {'>=' if low_in else '>'} {low:g}"
            elif low == -math.inf and high < math.inf:
                text += f" {'<=' if high_in else '<'} {high:g}"
            elif low > -math.inf:
                text += f" in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        return text + (" or null" if self.default is None else "")

    def check(self, value, method):
        """``value`` as this parameter's type, or MergeError saying what is valid."""
        if value is None and self.default is None:
            return None
        if self.type is float:
            ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
            try:
                ok = ok and math.isfinite(float(value))
            except OverflowError:  # float() of a huge JSON integer
                ok = False
        else:
            ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
        if ok:
            low, high, low_in, high_in = (0, math.inf, True, False) if self.type is InputIndex else self.bounds
            ok = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
        if not ok:
            raise MergeError(f"merge_params {self.name!r} for {method} must be {self.describe()}, got {value!r}")
        return float(value) if self.type is float else int(value)


@dataclass
class MergeMethod:
    """A registered merge method: what @merge_method stores in MERGE_METHODS."""
    name: str
    fn: Callable       # fn(tensors, weights, params, key, seed) -> float32 tensor; see "methods" below
    params: tuple      # of Param, in declaration order
    summary: str       # the first line of fn's docstring
    linear_in_weights: bool
    identity_params: dict

    @property
    def variants(self):
        return list(dict.fromkeys(p.variant for p in self.params if p.variant))


MERGE_METHODS = {}  # name -> MergeMethod, in registration order


def merge_method(name, *params, linear_in_weights=False, identity_params=None):
    """Register ``fn(tensors, weights, params, key, seed)`` as merge method ``name`` with the declared ``params``.

    fn gets one tensor name's inputs (in input order, any float dtype, on one device), the weights, the parsed
    params (declared keys only, defaults filled in; only the variant in use), the tensor name and the merge seed,
    and returns the merged float32 tensor. Its docstring's first line is its one-line description in -h.
    The tests hold every method to two promises (tests/test_merge.py):
      identity:          one input with weight 1 merges to itself, under ``identity_params`` (default: the defaults);
      linear_in_weights: True when merge(w) - merge(0) is linear in w (an affine map; merge(0) is the base or zero).
    """
    def register(fn):
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"merge method {name!r}: give {fn.__name__} a docstring; its first line is the -h text")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"merge method {name!r} declares a parameter twice: {names}")
        method = MergeMethod(name, fn, tuple(params), fn.__doc__.strip().splitlines()[0].strip(), linear_in_weights,
                             dict(identity_params or {}))
        MERGE_METHODS[name] = method
        try:
            method.identity_params = parse_merge_params(name, method.identity_params)
        except MergeError:
            del MERGE_METHODS[name]
            raise
        return fn
    return register


def parse_merge_params(method, params=None):
    """Validate ``params`` for ``method`` against its declaration and return a new dict with defaults filled in.

    ``params`` is a dict, a JSON object string, or None. Unknown keys, wrong types, out-of-range values and keys
    of two variants raise MergeError. The result holds the keys of the variant in use, in declaration order;
    parsing an already-parsed dict returns it unchanged, so callers may parse early and pass the result on.
    The keys of each method: ``python merge.py -h`` (describe_methods()).
    """
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge_method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if params is None:
        params = {}
    elif isinstance(params, str):
        text = params.strip()
        if not text:
            params = {}
        else:
            try:
                params = json.loads(text)
            except json.JSONDecodeError as e:
                raise MergeError(f"merge_params is not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(params, dict):
        raise MergeError(f"merge_params must be a JSON object / dict, got {type(params).__name__}: {params!r}")

    declared = MERGE_METHODS[method].params
    allowed = [p.name for p in declared]
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        ok = ", ".join(allowed) if allowed else "none"
        raise MergeError(f"unknown merge_params key(s) {', '.join(map(repr, unknown))} for {method}; allowed: {ok}")

    given = {}  # variant -> its keys that were given
    for p in declared:
        if p.variant and p.name in params:
            given.setdefault(p.variant, []).append(p.name)
    if len(given) > 1:
        parts = [f"{'/'.join(map(repr, keys))} ({variant})" for variant, keys in given.items()]
        raise MergeError(f"merge_params for {method}: {' cannot be combined with '.join(parts)}; "
                         f"give the keys of one variant only")
    in_use = next(iter(given), None) or next(iter(MERGE_METHODS[method].variants), None)

    out = {}
    for p in declared:
        if p.variant and p.variant != in_use:
            continue
        if p.name in params:
            out[p.name] = p.check(params[p.name], method)
        elif p.default is REQUIRED:
            with_variant = f" with {p.variant}" if p.variant else ""
            raise MergeError(f"merge_params for {method} needs {p.name!r}{with_variant} ({p.describe()})")
        else:
            out[p.name] = p.default
    return out


def _check_input_indices(method, params, n):
    for p in MERGE_METHODS[method].params:
        i = params.get(p.name)
        if p.type is InputIndex and i is not None and i >= n:
            raise MergeError(f"{p.name} {i} is out of range for {n} adapters (valid: 0..{n - 1})")


def methods_help():
    """One line for a --merge_method option: every method with its summary."""
    return "; ".join(f"{m.name}: {m.summary.rstrip('.')}" for m in MERGE_METHODS.values()).replace("%", "%%")


def params_help():
    """One paragraph for a --merge_params option: every method's keys, "|" between variants, [default]."""
    def key(p):
        default = "" if p.default is REQUIRED else f" [{json.dumps(p.default)}]"
        return f"{p.name} ({p.describe()}){default}"

    def keys(method):
        groups = [[key(p) for p in method.params if p.variant == v] for v in method.variants]
        parts = [" | ".join(", ".join(g) for g in groups)] if groups else []
        parts += [key(p) for p in method.params if not p.variant]
        return "; ".join(parts) or "none"

    text = ". ".join(f"{m.name}: {keys(m)}" for m in MERGE_METHODS.values())
    return (f"JSON object of merge parameters; keys per method, [default], '|' between alternatives: {text} "
            f"(what each key does: python merge.py -h)").replace("%", "%%")


def describe_methods():
    """Several lines: every method, its summary and each key with its range, default and help."""
    lines = ["merge methods and their --merge_params keys:"]
    for m in MERGE_METHODS.values():
        lines.append(f"  {m.name}: {m.summary}")
        if not m.params:
            lines.append("      (no parameters)")
        for p in m.params:
            default = "required" if p.default is REQUIRED else f"default {json.dumps(p.default)}"
            variant = f" [variant: {p.variant}{', the default' if p.variant == m.variants[0] else ''}]" if p.variant else ""
            lines.append(f"      {p.name}: {p.describe()}, {default}{variant}; {p.help}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks

def _labels(n, names):
    if names is None:
        return [f"adapter {i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise MergeError(f"got {len(names)} names for {n} adapters")
    return [f"adapter {str(x)!r}" for x in names]


def _check_weights(weights, n):
    try:
        weights = list(weights)
    except TypeError:
        raise MergeError(f"weights must be a list of numbers, got {weights!r}") from None
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} adapters; give exactly one weight per adapter")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise MergeError(f"weight {i} must be a finite number, got {w!r}")
        out.append(float(w))
    return out


def _rank_dim(key):
    # peft stores A as [r, in(, k, k)] and B as [out, r(, 1, 1)]; embeddings use the same layout
    if ".lora_A." in key or ".lora_embedding_A" in key:
        return 0
    if ".lora_B." in key or ".lora_embedding_B" in key:
        return 1
    return None


def check_states(states, names=None):
    """Check that all state dicts hold the same tensor names, shapes (LoRA ranks) and kinds.

    Returns the adapter labels used in messages. Raises MergeError naming adapter and tensor.
    """
    import torch
    if not isinstance(states, (list, tuple)) or not states:
        raise MergeError("need at least one adapter state dict to merge")
    labels = _labels(len(states), names)
    for i, s in enumerate(states):
        if not isinstance(s, dict):
            raise MergeError(f"{labels[i]} is not a state dict (got {type(s).__name__})")
    ref = states[0]
    ref_keys = set(ref)
    if not ref_keys:
        raise MergeError(f"{labels[0]} holds no tensors")
    for i, s in enumerate(states[1:], 1):
        missing = sorted(ref_keys - set(s))
        if missing:
            raise MergeError(f"{labels[i]} is missing tensor {missing[0]!r} (present in {labels[0]}); "
                             f"{len(missing)} tensor(s) missing in total")
        extra = sorted(set(s) - ref_keys)
        if extra:
            raise MergeError(f"{labels[i]} has tensor {extra[0]!r} not present in {labels[0]}; "
                             f"{len(extra)} extra tensor(s) in total")
    for key, t0 in ref.items():
        if not isinstance(t0, torch.Tensor):
            raise MergeError(f"{labels[0]} tensor {key!r} is not a torch.Tensor (got {type(t0).__name__})")
        for i, s in enumerate(states[1:], 1):
            t = s[key]
            if not isinstance(t, torch.Tensor):
                raise MergeError(f"{labels[i]} tensor {key!r} is not a torch.Tensor (got {type(t).__name__})")
            if t.shape != t0.shape:
                d = _rank_dim(key)
                if d is not None and t.dim() == t0.dim() and t.dim() > d and t.shape[d] != t0.shape[d]:
                    raise MergeError(f"rank mismatch at tensor {key!r}: {labels[i]} has rank {t.shape[d]} but "
                                     f"{labels[0]} has rank {t0.shape[d]} (shapes {list(t.shape)} vs {list(t0.shape)})")
                raise MergeError(f"shape mismatch at tensor {key!r}: {labels[i]} has {list(t.shape)} but "
                                 f"{labels[0]} has {list(t0.shape)}")
            if t.is_floating_point() != t0.is_floating_point():
                raise MergeError(f"dtype mismatch at tensor {key!r}: {labels[i]} has {t.dtype} but "
                                 f"{labels[0]} has {t0.dtype}")
    return labels


# ----------------------------------------------------------------------------- methods
# Each method takes the inputs for one tensor name (in input order, any float dtype, already on
# one device) and returns the merged float32 tensor; see merge_method() for the whole contract.

_BASE_HELP = "the input theta_b the others are taken relative to (its own weight is not used)"


@merge_method("weighted_average", linear_in_weights=True)
def _weighted_average(tensors, weights, params, key, seed):
    """sum_i w_i theta_i (weights are coefficients: not normalised, may be negative)."""
    import torch
    # zero-filled float32 accumulator + add_(alpha=w): each input is read once and widened to
    # float32 inside the kernel, measurably faster than .float() copies on CPU
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for t, w in zip(tensors, weights):
        if w != 0.0:  # BWR coefficient vectors are mostly zeros; skipping saves whole passes
            acc.add_(t, alpha=w)
    return acc


@merge_method("task_arithmetic", Param("base_model_idx", InputIndex, 0, _BASE_HELP), linear_in_weights=True)
def _task_arithmetic(tensors, weights, params, key, seed):
    """theta_b + sum_{i != b} w_i (theta_i - theta_b), b = base_model_idx.

    The base's own weight w_b is not used: the base enters with coefficient 1 by definition.
    """
    import torch
    b = params["base_model_idx"]
    base = tensors[b].to(torch.float32)
    acc = base.clone()
    for i, (t, w) in enumerate(zip(tensors, weights)):
        if i == b or w == 0.0:
            continue
        # difference first, then scale: keeps precision when theta_i is close to theta_b
        acc.add_(t.to(torch.float32) - base, alpha=w)
    return acc


@merge_method(
    "ties",
    Param("threshold", float, 0.01, "trim the entries of w_i tau_i whose magnitude is below it",
          valid="[0, inf)", variant="trim by threshold"),
    Param("density", float, REQUIRED, "keep the int(density * numel) largest entries of each |w_i tau_i|, zero the rest",
          valid="(0, 1]", variant="trim by density"),
    Param("base_model_idx", InputIndex, None,
          "tau_i = theta_i - theta_b around this input; null: tau_i = theta_i (a LoRA adapter already is a delta)"),
    identity_params={"threshold": 0.0},  # the default threshold trims small entries of even a single input
)
def _ties(tensors, weights, params, key, seed):
    """TIES-merging (Yadav et al. 2023) of the weighted task vectors w_i tau_i.

    Task vectors: without base_model_idx (default) the adapters' tensors themselves
    (a LoRA adapter already is a delta from the frozen base model: the zero adapter is the
    base), tau_i = theta_i; with base_model_idx = b, tau_i = theta_i - theta_b for i != b.
    With v_i = w_i * tau_i (weighted, so negative BWR coefficients flip the vector):
      1. trim:  v_i[j] = 0 where |v_i[j]| < threshold   (or, with density d, keep the top
                int(d * numel) entries of |v_i| per tensor and zero the rest)
      2. elect: s[j] = sign(sum_i v_i[j])   (= the sign with the larger summed magnitude;
                +1 on a tie)
      3. disjoint merge: m[j] = sum_{i: sign(v_i[j]) == s[j]} v_i[j] / max(1, #{those i})
    result = m                (no base)
    result = theta_b + m      (base_model_idx = b)
    The trim uses the weighted magnitude |w_i * tau_i| so the threshold is in the units of
    what actually enters the merge, and weights change trimming, election and the mean.
    """
    import torch
    # imported here: peft pulls in transformers (seconds of start-up) and only ties needs it,
    # so the CLI and the other methods stay quick to start
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune

    b = params.get("base_model_idx")
    base = tensors[b].to(torch.float32) if b is not None else None
    vecs = []
    for i, (t, w) in enumerate(zip(tensors, weights)):
        if i == b:
            continue
        tau = t.to(torch.float32)
        v = (tau - base) * w if base is not None else tau * w
        if "density" in params:
            # peft warns and does nothing at density >= 1, which is the intended no-op here
            if params["density"] < 1.0:
                v = prune(v, params["density"], method="magnitude")
        else:
            v = v.masked_fill_(v.abs() < params["threshold"], 0.0)
        vecs.append(v)
    if not vecs:  # only the base itself was given
        return base.clone()
    stacked = torch.stack(vecs, dim=0)
    # peft's helpers implement steps 2 and 3 exactly; peft.ties() itself is not used because it
    # elects signs on the *unweighted* vectors and only trims by density.
    mask = calculate_majority_sign_mask(stacked, method="total")
    merged = disjoint_merge(stacked, mask)
    return merged + base if base is not None else merged


def derive_seed(seed, *parts):
    """A 63-bit seed from ``seed`` and identifying parts (tensor name, member index).

    Seeding every (tensor, adapter) pair on its own makes random merges independent of the
    order tensors are visited in (whole dict vs shard by shard) and of which other tensors exist.
    """
    text = "\0".join([str(int(seed))] + [str(p) for p in parts])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@merge_method(
    "dare",
    Param("threshold", float, 0.01, "drop the entries of d_i whose magnitude is below it",
          valid="[0, inf)", variant="threshold DARE"),
    Param("amplification_factor", float, 2.0, "scale the kept entries of d_i by it",
          valid="(0, inf)", variant="threshold DARE"),
    Param("drop_rate", float, REQUIRED, "drop each entry of d_i with this probability (seeded) and rescale the rest "
          "by 1/(1 - drop_rate)", valid="[0, 1)", variant="random DARE"),
    Param("base_model_idx", InputIndex, 0, _BASE_HELP),
    linear_in_weights=True,  # the masks depend on d_i, the seed and the tensor name, never on the weights
)
def _dare(tensors, weights, params, key, seed):
    """DARE around theta_b (b = base_model_idx): theta_b + sum_{i != b} w_i * sparsified d_i, d_i = theta_i - theta_b.

    threshold variant (default, as in the seed toolkit):
        theta_b + sum_{i != b} w_i * amplification_factor * d_i * [|d_i| >= threshold]
    drop_rate variant (published DARE, Yu et al. 2023), m_i ~ Bernoulli(1 - drop_rate) per entry:
        theta_b + sum_{i != b} w_i * m_i * d_i / (1 - drop_rate)
    The masks are drawn from torch.Generator seeded by derive_seed(seed, tensor name, i) on the
    CPU, so the result depends only on (inputs, weights, params, seed), not on device or order.
    As in task_arithmetic, the base's own weight w_b is not used.
    """
    import torch
    b = params["base_model_idx"]
    base = tensors[b].to(torch.float32)
    acc = base.clone()
    for i, (t, w) in enumerate(zip(tensors, weights)):
        if i == b or w == 0.0:
            continue
        d = t.to(torch.float32) - base
        if "drop_rate" in params:
            rate = params["drop_rate"]
            # peft's random_pruning calls torch.bernoulli on the global RNG: results would depend
            # on whatever else consumed it, so the mask is drawn from a private seeded generator.
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, key, i))
            keep = torch.rand(d.shape, generator=gen) >= rate
            d.mul_(keep.to(d.device)).div_(1.0 - rate)
        else:
            d.masked_fill_(d.abs() < params["threshold"], 0.0).mul_(params["amplification_factor"])
        acc.add_(d, alpha=w)
    return acc


def all_finite(t):
    import torch
    # A single reduction instead of torch.isfinite (several times slower on bf16): any NaN/inf
    # entry makes the sum non-finite; a non-finite sum of finite entries (overflow) falls back
    # to the exact test. float16 sums are taken in float32 so they do not overflow at 65504.
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return math.isfinite(total.item()) or bool(torch.isfinite(t).all())


def _nonfinite_error(key, tensors, labels, dtype):
    import torch
    for i, t in enumerate(tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return NonFiniteMergeError(f"merged tensor {key!r} is not finite: {labels[i]} contains NaN/inf in {key!r}")
    return NonFiniteMergeError(f"merged tensor {key!r} is not finite: the weighted result overflows {dtype} "
                      f"(inputs are finite; use smaller weights)")


def merge_state_dicts(states, weights, method="weighted_average", params=None, names=None, seed=0):
    """Merge adapter state dicts tensor by tensor; returns a new state dict.

    states:  list of {tensor name: tensor}, all with the same names and shapes.
    weights: one finite coefficient per state (not normalised; negative allowed).
    method:  a name in MERGE_METHODS; params: see parse_merge_params; the formulas are in the
             docstrings of the registered functions (_weighted_average, _task_arithmetic, _ties, _dare).
    names:   labels used in error messages (default "adapter i").
    seed:    seeds DARE's random drop (drop_rate); unused by the other methods.
    A NaN/inf result raises NonFiniteMergeError; every other problem MergeError.
    Compute is float32 on the device of states[0]'s tensors; each result takes states[0]'s dtype
    for that tensor. Non-float tensors must be identical across inputs and are copied.
    """
    import torch
    params = parse_merge_params(method, params)
    labels = check_states(states, names)
    weights = _check_weights(weights, len(states))
    _check_input_indices(method, params, len(states))
    fn = MERGE_METHODS[method].fn
    out = {}
    for key, t0 in states[0].items():
        tensors = [t0] + [s[key] if s[key].device == t0.device else s[key].to(t0.device) for s in states[1:]]
        if not t0.is_floating_point():
            for i, t in enumerate(tensors[1:], 1):
                if not torch.equal(t, t0):
                    raise MergeError(f"non-float tensor {key!r} differs between {labels[i]} and {labels[0]}; "
                                     f"it cannot be merged by weights")
            out[key] = t0.clone()
            continue
        res = fn(tensors, weights, params, key, seed).to(t0.dtype)
        if not all_finite(res):
            raise _nonfinite_error(key, tensors, labels, t0.dtype)
        out[key] = res
    return out


# ----------------------------------------------------------------------------- I/O

def _output_dir(path, durable=True):
    """fileio.atomic_dir for an output folder of merge.py: refuses a path that is a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise MergeError(f"output {os.path.abspath(os.fspath(path))!r} exists and is not a folder")
    return fileio.atomic_dir(path, durable)


def _read_json(path, what):
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MergeError(f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{what} {path!r} must hold a JSON object")
    return data


def _no_safetensors_error(path, bin_name):
    return MergeError(f"{path!r} has {bin_name} but no safetensors weights; convert it once, e.g. load it with "
                      f"peft/transformers and call save_pretrained(out_dir, safe_serialization=True)")


def load_adapter(path):
    """Read a peft adapter folder -> (state dict of CPU tensors, adapter_config dict)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MergeError(f"adapter {path!r} not found (expected a folder with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise _no_safetensors_error(path, "adapter_model.bin")
        if os.path.isfile(os.path.join(path, MODEL_WEIGHTS)) or os.path.isfile(os.path.join(path, MODEL_INDEX)):
            raise MergeError(f"{path!r} is a full model, not an adapter; merge full models with "
                             f"directly_load_safetensors=0 (--fast_merge 0)")
        raise MergeError(f"adapter {path!r} has no {ADAPTER_WEIGHTS}")
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise MergeError(f"adapter {path!r} has no {ADAPTER_CONFIG}")
    config = _read_json(config_path, "adapter config")
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise MergeError(f"adapter {path!r}: cannot read {ADAPTER_WEIGHTS}: {str(e).splitlines()[0]}") from None
    return state, config


def save_adapter(path, state, config, durable=True):
    """Write a peft adapter folder atomically (temp dir in the same parent, fsync, rename).

    An existing folder at ``path`` is replaced. The result loads with PeftModel.from_pretrained.
    durable=False skips the fsyncs: the search stages candidates that way and syncs them all at once at its commit.
    """
    from safetensors.torch import save_file
    if not isinstance(config, dict):
        raise MergeError(f"adapter config for {os.fspath(path)!r} must be a dict, got {type(config).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with _output_dir(path, durable) as tmp:
        try:
            save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        except Exception as e:  # safetensors reports a failed write (a full disk) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            if isinstance(e, OSError) or not code:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))),
                          os.path.join(os.fspath(path), ADAPTER_WEIGHTS)) from None
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def _device(gpu_id):
    import torch
    if gpu_id == "cpu":
        return torch.device("cpu")
    if isinstance(gpu_id, bool) or not isinstance(gpu_id, numbers.Integral) or gpu_id < 0:
        raise MergeError(f"gpu_id must be a GPU index (0, 1, ...) or 'cpu', got {gpu_id!r}")
    if not torch.cuda.is_available():
        raise MergeError(f"gpu_id {gpu_id} requested but CUDA is not available; pass gpu_id='cpu'")
    if gpu_id >= torch.cuda.device_count():
        raise MergeError(f"gpu_id {gpu_id} out of range: {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(f"cuda:{int(gpu_id)}")


def _check_configs(configs, labels):
    for key in _CONFIG_MUST_MATCH:
        ref = configs[0].get(key)
        for i, c in enumerate(configs[1:], 1):
            if c.get(key) != ref:
                raise MergeError(f"{labels[i]} {ADAPTER_CONFIG} has {key}={c.get(key)!r} but {labels[0]} has "
                                 f"{key}={ref!r}; adapters must share it to be merged")


def _checkpoint_layout(path, label):
    """-> (weight_map {tensor name: file name}, index file name or None) of a safetensors folder."""
    if not os.path.isdir(path):
        raise MergeError(f"{label} not found: {path!r} is not a folder")
    index = os.path.join(path, MODEL_INDEX)
    if os.path.isfile(index):
        data = _read_json(index, "checkpoint index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{label}: {MODEL_INDEX} has no 'weight_map'")
        for fname in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, fname)):
                raise MergeError(f"{label}: shard {fname!r} listed in {MODEL_INDEX} is missing")
        return dict(weight_map), MODEL_INDEX
    for fname in (MODEL_WEIGHTS, ADAPTER_WEIGHTS):
        if os.path.isfile(os.path.join(path, fname)):
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                return {k: fname for k in f.keys()}, None
    for fname in ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, fname)):
            raise _no_safetensors_error(path, fname)
    raise MergeError(f"{label}: no {MODEL_WEIGHTS}, {MODEL_INDEX} or {ADAPTER_WEIGHTS} in {path!r}")


def _merge_checkpoints(weights, paths, output, device, method, params, seed, labels):
    """Merge full (possibly sharded) safetensors checkpoints one tensor at a time.

    Only the current output shard plus one tensor per input is resident; inputs are memory
    mapped through safe_open. The output reuses the first input's shard layout.
    """
    from safetensors.torch import save_file
    layouts = [_checkpoint_layout(p, labels[i]) for i, p in enumerate(paths)]
    ref_map = layouts[0][0]
    _check_same_tensors([wm for wm, _ in layouts], labels)
    with contextlib.ExitStack() as stack:
        handles = _open_checkpoints(stack, layouts, paths, labels, str(device))
        shards = {}
        for key in ref_map:
            shards.setdefault(ref_map[key], []).append(key)
        total = 0
        with _output_dir(output) as tmp:
            for fname in sorted(shards):
                merged = {}
                for key in shards[fname]:
                    ins = [{key: handles[i][layouts[i][0][key]].get_tensor(key)} for i in range(len(paths))]
                    t = merge_state_dicts(ins, weights, method, params, names=paths, seed=seed)[key]
                    merged[key] = t.to("cpu").contiguous()
                    total += merged[key].numel() * merged[key].element_size()
                save_file(merged, os.path.join(tmp, fname), metadata={"format": "pt"})
                del merged
            if layouts[0][1] is not None:
                with open(os.path.join(tmp, layouts[0][1]), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(ref_map.items()))}, f, indent=2)
                    f.write("\n")
            # config, generation config, tokenizer files: everything of the first input but its weights
            for name in sorted(os.listdir(paths[0])):
                src = os.path.join(paths[0], name)
                if os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES):
                    shutil.copyfile(src, os.path.join(tmp, name))


def _check_same_tensors(weight_maps, labels):
    """Every checkpoint lists the first one's tensors, no more and no fewer."""
    reference = weight_maps[0]
    for i, wm in enumerate(weight_maps[1:], 1):
        missing = sorted(set(reference) - set(wm))
        if missing:
            raise MergeError(f"{labels[i]} is missing tensor {missing[0]!r} (present in {labels[0]}); "
                             f"{len(missing)} tensor(s) missing in total")
        extra = sorted(set(wm) - set(reference))
        if extra:
            raise MergeError(f"{labels[i]} has tensor {extra[0]!r} not present in {labels[0]}; "
                             f"{len(extra)} extra tensor(s) in total")


def _open_checkpoints(stack, layouts, paths, labels, device):
    """Per input {file name: safe_open handle}, entered on stack; shapes are checked from the headers before
    anything is written."""
    handles = []
    for i, (wm, _) in enumerate(layouts):
        opened = {}
        for fname in sorted(set(wm.values())):
            try:
                opened[fname] = stack.enter_context(safe_open(os.path.join(paths[i], fname), framework="pt",
                                                              device=device))
            except Exception as e:
                raise MergeError(f"{labels[i]}: cannot read {fname!r}: {str(e).splitlines()[0]}") from None
        handles.append(opened)
    keysets = [{fname: set(h.keys()) for fname, h in opened.items()} for opened in handles]
    for key in sorted(layouts[0][0]):
        shapes = []
        for i, (wm, _) in enumerate(layouts):
            if key not in keysets[i][wm[key]]:
                raise MergeError(f"{labels[i]}: tensor {key!r} is listed in the index but missing from {wm[key]!r}")
            shapes.append(list(handles[i][wm[key]].get_slice(key).get_shape()))
        for i, shape in enumerate(shapes[1:], 1):
            if shape != shapes[0]:
                raise MergeError(f"shape mismatch at tensor {key!r}: {labels[i]} has {shape} but "
                                 f"{labels[0]} has {shapes[0]}")
    return handles


def lora_merge(weights, lora_name_list, output_name, gpu_id, directly_load_safetensors=1,
               merge_method="weighted_average", merge_params=None, seed=0):
    """Merge adapters (or full models) from disk and write the result to ``output_name``.

    weights: one coefficient per entry of lora_name_list. gpu_id: GPU index or "cpu".
    directly_load_safetensors=1: inputs are peft adapter folders, the output is an adapter folder
      (adapter_config.json from the first input) that PeftModel.from_pretrained loads.
    directly_load_safetensors=0: inputs are safetensors folders (full models, single file or
      sharded with model.safetensors.index.json, or adapters); merged tensor by tensor, shard by
      shard; the output follows the first input's layout and keeps its config/tokenizer files.
    seed: seeds DARE's random drop. Returns the output path.
    """
    if isinstance(lora_name_list, (str, bytes)) or not lora_name_list:
        raise MergeError("lora_name_list must be a non-empty list of adapter folders")
    paths = [os.fspath(p) for p in lora_name_list]
    labels = _labels(len(paths), paths)
    weights = _check_weights(weights, len(paths))
    params = parse_merge_params(merge_method, merge_params)
    _check_input_indices(merge_method, params, len(paths))
    if directly_load_safetensors not in (0, 1):
        raise MergeError(f"directly_load_safetensors must be 1 (adapters) or 0 (full/sharded models), "
                         f"got {directly_load_safetensors!r}")
    device = _device(gpu_id)
    if directly_load_safetensors == 0:
        _merge_checkpoints(weights, paths, output_name, device, merge_method, params, seed, labels)
        return output_name
    loaded = [load_adapter(p) for p in paths]
    _check_configs([c for _, c in loaded], labels)
    states = [{k: v.to(device) for k, v in s.items()} for s, _ in loaded]
    merged = merge_state_dicts(states, weights, merge_method, params, names=paths, seed=seed)
    save_adapter(output_name, merged, loaded[0][1])
    return output_name


# ----------------------------------------------------------------------------- CLI

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    p = _OneLineParser(prog="merge.py", description="Merge LoRA adapters (or full models) with weights.",
                       epilog=describe_methods().replace("%", "%%"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="comma-separated coefficients, one per adapter, e.g. 0.5,0.5")
    p.add_argument("--adapters", required=True, nargs="+", help="adapter (or model) folders")
    p.add_argument("--output", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--merge_method", default="weighted_average", help=f"one of {', '.join(MERGE_METHODS)}")
    p.add_argument("--merge_params", default=None, help='JSON object of the method\'s keys (listed below), '
                                                         'e.g. \'{"threshold": 0.01}\'')
    p.add_argument("--fast_merge", type=int, default=1, help="1: adapter folders; 0: full or sharded models")
    p.add_argument("--gpu", default="cpu", help="GPU index or 'cpu'")
    p.add_argument("--seed", type=int, default=0, help="seed for dare's drop_rate")
    args = p.parse_args(argv)
    try:
        weights = []
        for part in args.weights.split(","):
            try:
                weights.append(float(part))
            except ValueError:
                raise MergeError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
        gpu = args.gpu
        if gpu != "cpu":
            if not gpu.isdigit():
                raise MergeError(f"--gpu must be a GPU index or 'cpu', got {gpu!r}")
            gpu = int(gpu)
        lora_merge(weights, args.adapters, args.output, gpu, directly_load_safetensors=args.fast_merge,
                   merge_method=args.merge_method, merge_params=args.merge_params, seed=args.seed)
    except MergeError as e:
        print(f"merge.py: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.adapters)} inputs ({args.merge_method}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
