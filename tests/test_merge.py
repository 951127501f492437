import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flat layout: the modules live in the repository root

import merge  # noqa: E402
from merge import (  # noqa: E402
    MERGE_METHODS,
    REQUIRED,
    InputIndex,
    MergeError,
    NonFiniteMergeError,
    Param,
    load_adapter,
    lora_merge,
    merge_state_dicts,
    parse_merge_params,
    save_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_config():
    return GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Gemma base model and three real peft LoRA adapters (non-zero B) on disk."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base_dir = root / "base"
    GemmaForCausalLM(tiny_config()).save_pretrained(base_dir)
    adapters = []
    for i in range(3):
        torch.manual_seed(100 + i)
        model = GemmaForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        d = root / f"adapter{i}"
        peft_model.save_pretrained(d)
        adapters.append(d)
    return {"root": root, "base": base_dir, "adapters": adapters}


def logits_with_adapter(base_dir, adapter_dir):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.eval()
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def states(*rows):
    return [{"t": torch.tensor(r, dtype=torch.float32)} for r in rows]


# ----------------------------------------------------------------------------- every registered method
# The promises each registered method makes (merge.merge_method): these checks run on every name in
# MERGE_METHODS, so a newly registered method is held to them without a test of its own. (Tests that
# register a method of their own do it in a copy of the registry, put in place with monkeypatch.)

def assert_identity(method, state):
    """One input with weight 1 merges to itself, bit for bit, under the method's identity_params."""
    out = merge_state_dicts([state], [1.0], method, merge.MERGE_METHODS[method].identity_params)
    assert out.keys() == state.keys()
    for k in state:
        assert out[k].dtype == state[k].dtype
        assert torch.equal(out[k], state[k]), (method, k)


def assert_linear_in_weights(method, states, params):
    """merge(w) - merge(0) is linear in w: additive and homogeneous (negative factors included)."""
    def merged(w):
        return merge_state_dicts(states, w, method, params, seed=5)

    zero = merged([0.0] * len(states))
    u, v = [0.3, -1.2, 0.7][:len(states)], [1.1, 0.4, -0.25][:len(states)]
    mu, mv = merged(u), merged(v)
    muv, m2u = merged([a + b for a, b in zip(u, v)]), merged([-2.5 * a for a in u])
    for k in zero:
        assert torch.allclose(muv[k] - zero[k], (mu[k] - zero[k]) + (mv[k] - zero[k]), atol=1e-5, rtol=1e-4), (method, k)
        assert torch.allclose(m2u[k] - zero[k], -2.5 * (mu[k] - zero[k]), atol=1e-5, rtol=1e-4), (method, k)


def one_params_per_variant(method):
    """The declared defaults of each variant (a key without a default gets a value inside its interval)."""
    def inside(p):
        low, high = p.bounds[:2]
        if math.isinf(low) and math.isinf(high):
            return 1.0
        return low + 1 if math.isinf(high) else high - 1 if math.isinf(low) else (low + high) / 2

    declared = merge.MERGE_METHODS[method]
    out = []
    for variant in declared.variants or [""]:
        out.append({p.name: inside(p) for p in declared.params if p.variant == variant and p.default is REQUIRED})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_method_is_identity_on_one_input(tiny, method, dtype):
    state, _ = load_adapter(tiny["adapters"][0])
    assert_identity(method, {k: v.to(dtype) for k, v in state.items()})


@pytest.mark.parametrize("method", [m for m, d in MERGE_METHODS.items() if d.linear_in_weights])
def test_linear_methods_are_linear_in_the_weights(tiny, method):
    states = [load_adapter(a)[0] for a in tiny["adapters"]]
    for params in one_params_per_variant(method):
        assert_linear_in_weights(method, states, params)


def test_checks_catch_a_method_that_breaks_its_promises(tiny, monkeypatch):
    """The two checks above fail for methods that are not identities or not linear (so they test something)."""
    monkeypatch.setattr(merge, "MERGE_METHODS", dict(MERGE_METHODS))

    @merge.merge_method("doubled_sum", linear_in_weights=True)
    def doubled(tensors, weights, params, key, seed):
        """2 sum_i w_i theta_i."""
        return 2 * sum(w * t.float() for t, w in zip(tensors, weights))

    @merge.merge_method("squared_weights", linear_in_weights=True)
    def squared(tensors, weights, params, key, seed):
        """sum_i w_i^2 theta_i."""
        return sum(w * w * t.float() for t, w in zip(tensors, weights))

    states = [load_adapter(a)[0] for a in tiny["adapters"]]
    with pytest.raises(AssertionError):
        assert_identity("doubled_sum", states[0])
    assert_identity("squared_weights", states[0])
    with pytest.raises(AssertionError):
        assert_linear_in_weights("squared_weights", states, {})
    assert_linear_in_weights("doubled_sum", states, {})


def test_register_a_method_and_use_it_end_to_end(tiny, tiny_population, data, tmp_path, monkeypatch):
    """The README's recipe ("Adding a merge method"), its example verbatim: one decorated function; lora_merge,
    merge.py's help and search.py's parsing and help pick it up from the declaration."""
    monkeypatch.setattr(merge, "MERGE_METHODS", dict(MERGE_METHODS))
    merge_method = merge.merge_method

    @merge_method("shrunk_average",
                  Param("shrink", float, 0.0, "fraction the weighted sum is shrunk by", valid="[0, 1]"),
                  linear_in_weights=True)
    def _shrunk_average(tensors, weights, params, key, seed):
        """(1 - shrink) sum_i w_i theta_i."""
        acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
        for t, w in zip(tensors, weights):
            acc.add_(t, alpha=w)
        return acc.mul_(1.0 - params["shrink"])

    assert_identity("shrunk_average", load_adapter(tiny["adapters"][0])[0])
    assert_linear_in_weights("shrunk_average", [load_adapter(a)[0] for a in tiny["adapters"]], {"shrink": 0.3})
    a0, a1 = tiny["adapters"][0], tiny["adapters"][1]
    out = tmp_path / "shrunk"
    lora_merge([0.3, 0.7], [str(a0), str(a1)], str(out), "cpu", merge_method="shrunk_average",
               merge_params='{"shrink": 0.5}')
    s0, s1, got = load_adapter(a0)[0], load_adapter(a1)[0], load_adapter(out)[0]
    for k in s0:
        assert close(got[k], 0.5 * (0.3 * s0[k] + 0.7 * s1[k]))
    assert torch.isfinite(logits_with_adapter(tiny["base"], out)).all()
    raises("merge_params 'shrink' for shrunk_average must be a number in [0, 1], got 2", lora_merge,
           [1, 1], [str(a0), str(a1)], str(tmp_path / "never"), "cpu",
           merge_method="shrunk_average", merge_params='{"shrink": 2}')
    assert not (tmp_path / "never").exists()
    assert "shrunk_average: (1 - shrink) sum_i w_i theta_i" in merge.describe_methods()
    assert "shrink: a number in [0, 1], default 0.0" in merge.describe_methods()

    import search
    argv = ["-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu", "-i", str(tiny_population / "experts"),
            "-b", str(tiny_population / "base_model"), "--output_root", str(tmp_path), "--merge_method",
            "shrunk_average", "--merge_params", '{"shrink": 0.25}']
    _, setup, _, _, pool, _ = search.prepare(argv, start_workers=False)
    assert pool is None
    assert setup.merge_params == {"shrink": 0.25}
    with pytest.raises(search.UsageError, match=r"'shrink' for shrunk_average must be a number in \[0, 1\], got -1"):
        search.prepare(argv[:-1] + ['{"shrink": -1}'], start_workers=False)
    help_text = " ".join(search.build_parser().format_help().split())  # argparse wraps lines
    assert "shrunk_average: (1 - shrink) sum_i w_i" in help_text and "shrink (a number in [0, 1]) [0.0]" in help_text


def test_declaration_mistakes_are_refused(monkeypatch):
    monkeypatch.setattr(merge, "MERGE_METHODS", dict(MERGE_METHODS))

    def fn(tensors, weights, params, key, seed):
        """sum_i theta_i."""
        return sum(t.float() for t in tensors)

    with pytest.raises(ValueError, match="already registered"):
        merge.merge_method("ties")(fn)
    with pytest.raises(ValueError, match="not an interval"):
        Param("x", float, 0.5, "x", valid="0..1")
    with pytest.raises(ValueError, match="default 2 is not a number in \\[0, 1\\]"):
        Param("x", float, 2, "x", valid="[0, 1]")
    with pytest.raises(ValueError, match="type must be"):
        Param("x", str, "a", "x")
    with pytest.raises(ValueError, match="twice"):
        merge.merge_method("dup", Param("x", float, 0.0, "x"), Param("x", float, 1.0, "x"))(fn)
    # a declared identity that is not valid for the method's own parameters: refused, and not registered
    with pytest.raises(MergeError, match="unknown merge_params key"):
        merge.merge_method("bad_identity", identity_params={"y": 1})(fn)
    assert "bad_identity" not in merge.MERGE_METHODS
    # a key without default is demanded when its variant is in use; an int parameter keeps its type
    merge.merge_method("needs_k", Param("k", int, REQUIRED, "how many", valid="[1, inf)"),
                       Param("at", InputIndex, None, "which input"), identity_params={"k": 1})(fn)
    raises("merge_params for needs_k needs 'k' (an integer >= 1)", parse_merge_params, "needs_k", None)
    raises("'k' for needs_k must be an integer >= 1, got 1.5", parse_merge_params, "needs_k", {"k": 1.5})
    assert parse_merge_params("needs_k", {"k": 3, "at": None}) == {"k": 3, "at": None}
    raises("at 4 is out of range for 1 adapters", merge_state_dicts, states([1.0]), [1.0], "needs_k", {"k": 1, "at": 4})


# ----------------------------------------------------------------------------- algebra


def test_weighted_average_is_linear(tiny):
    a, _ = load_adapter(tiny["adapters"][0])
    b, _ = load_adapter(tiny["adapters"][1])
    out = merge_state_dicts([a, b], [0.3, -1.7])
    for k in a:
        assert close(out[k], 0.3 * a[k] - 1.7 * b[k], 1e-5)
    # linear in the weights: M(u + v) = M(u) + M(v)
    u, v = [0.25, 0.5], [-1.0, 2.0]
    mu, mv, muv = (merge_state_dicts([a, b], w) for w in (u, v, [x + y for x, y in zip(u, v)]))
    for k in a:
        assert close(muv[k], mu[k] + mv[k], 1e-5)
    # weights are coefficients, not normalised
    doubled = merge_state_dicts([a, b], [1.0, 1.0])
    for k in a:
        assert close(doubled[k], a[k] + b[k], 1e-6)


def test_task_arithmetic_around_base():
    s = states([1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [0.0, 4.0, 3.0])
    out = merge_state_dicts(s, [123.0, 0.5, 2.0], "task_arithmetic")  # base weight unused
    # theta_0 + 0.5 * (theta_1 - theta_0) + 2 * (theta_2 - theta_0)
    assert close(out["t"], torch.tensor([1 + 0.5 * 1 + 2 * -1, 2 + 0 + 2 * 2, 3 + 0.5 * 2 + 0.0]))
    out = merge_state_dicts(s, [1.0, 9.0, 1.0], "task_arithmetic", {"base_model_idx": 1})
    # theta_1 + 1 * (theta_0 - theta_1) + 1 * (theta_2 - theta_1)
    assert close(out["t"], torch.tensor([2 - 1 - 2, 2 + 0 + 2, 5 - 2 - 2.0]))
    out = merge_state_dicts(s, [1.0, 9.0, 1.0], "task_arithmetic", '{"base_model_idx": 1}')
    assert close(out["t"], torch.tensor([-1.0, 4.0, 1.0]))


def test_ties_sign_election_and_disjoint_merge_by_hand():
    s = states([0.5, -0.2, 0.05, 0.3],
               [0.3, 0.4, -0.6, -0.1],
               [-0.15, 0.3, 0.2, 0.05])
    out = merge_state_dicts(s, [1.0, 1.0, 1.0], "ties", {"threshold": 0.1})
    # trim |v| < 0.1: 0.05 (row 1) and 0.05 (row 3) go.
    # elected signs from the sums: col0 0.65 (+), col1 0.5 (+), col2 -0.4 (-), col3 0.2 (+)
    # disjoint means: col0 (0.5 + 0.3)/2, col1 (0.4 + 0.3)/2, col2 -0.6/1, col3 0.3/1 (-0.1 disagrees)
    assert close(out["t"], torch.tensor([0.4, 0.35, -0.6, 0.3]))

    # weights enter before trimming and election. w = (1, 4, 1): row 2 becomes [1.2, 1.6, -2.4, -0.4];
    # sums: col0 1.55 (+), col1 1.7 (+), col2 -2.2 (-), col3 0.3 - 0.4 = -0.1 (-) -- the sign flips.
    # means: col0 (0.5 + 1.2)/2, col1 (1.6 + 0.3)/2, col2 -2.4, col3 -0.4
    out = merge_state_dicts(s, [1.0, 4.0, 1.0], "ties", {"threshold": 0.1})
    assert close(out["t"], torch.tensor([0.85, 0.95, -2.4, -0.4]))


def test_ties_weights_matter_and_trim_is_weighted():
    s = states([0.5, -0.2, 0.3], [0.3, 0.4, -0.1])
    a = merge_state_dicts(s, [1.0, 1.0], "ties", {"threshold": 0.0})
    b = merge_state_dicts(s, [1.0, 2.0], "ties", {"threshold": 0.0})
    assert not torch.equal(a["t"], b["t"])
    # |0.5 * 0.3| = 0.15 < 0.2 is trimmed although |0.3| >= 0.2: the trim sees the weighted value
    out = merge_state_dicts(states([0.3]), [0.5], "ties", {"threshold": 0.2})
    assert torch.equal(out["t"], torch.tensor([0.0]))
    # a negative weight flips the vector that takes part in the election
    out = merge_state_dicts(states([1.0], [0.5]), [1.0, -4.0], "ties", {"threshold": 0.0})
    assert close(out["t"], torch.tensor([-2.0]))


def test_ties_density_and_base():
    s = states([0.0, 0.0, 0.0, 0.0], [0.9, -0.1, 0.2, -0.8], [0.5, 0.6, -0.05, -0.3])
    # base 0: task vectors rows 1, 2; density 0.5 keeps the 2 largest |v| per vector:
    # row1 -> [0.9, 0, 0, -0.8], row2 -> [0.5, 0.6, 0, 0]; signs (+, +, +, -)
    out = merge_state_dicts(s, [0.0, 1.0, 1.0], "ties", {"density": 0.5, "base_model_idx": 0})
    assert close(out["t"], torch.tensor([0.7, 0.6, 0.0, -0.8]))
    # a non-zero base is added back
    s[0]["t"] += 1.0
    s[1]["t"] += 1.0
    s[2]["t"] += 1.0
    out = merge_state_dicts(s, [0.0, 1.0, 1.0], "ties", {"density": 0.5, "base_model_idx": 0})
    assert close(out["t"], torch.tensor([1.7, 1.6, 1.0, 0.2]))


def test_dare_threshold_by_hand():
    s = states([1.0, 1.0, 1.0], [1.005, 1.5, 0.7], [1.2, 1.001, 1.0])
    out = merge_state_dicts(s, [7.0, 0.5, 0.25], "dare",
                            {"threshold": 0.01, "amplification_factor": 2.0, "base_model_idx": 0})
    # d1 = [0.005, 0.5, -0.3] -> [0, 0.5, -0.3]; d2 = [0.2, 0.001, 0] -> [0.2, 0, 0]
    # 1 + 0.5 * 2 * d1 + 0.25 * 2 * d2
    assert close(out["t"], torch.tensor([1.1, 1.5, 0.7]), 1e-5)
    assert parse_merge_params("dare", None) == {"threshold": 0.01, "amplification_factor": 2.0, "base_model_idx": 0}


def test_dare_drop_rate_statistics_and_seed():
    n = 200_000
    base = {"t": torch.zeros(n)}
    other = {"t": torch.full((n,), 0.5)}
    p = 0.3
    out = merge_state_dicts([base, other], [1.0, 2.0], "dare", {"drop_rate": p}, seed=7)["t"]
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    # survivors are rescaled by 1 / (1 - p) and weighted
    assert close(out[kept], torch.full((int(kept.sum()),), 2.0 * 0.5 / (1 - p)))
    again = merge_state_dicts([base, other], [1.0, 2.0], "dare", {"drop_rate": p}, seed=7)["t"]
    assert torch.equal(out, again)
    other_seed = merge_state_dicts([base, other], [1.0, 2.0], "dare", {"drop_rate": p}, seed=8)["t"]
    assert not torch.equal(out, other_seed)
    # mean preserved in expectation
    assert abs(out.mean().item() - 1.0) < 0.01


def test_dare_drop_is_per_tensor_and_order_independent(tiny):
    a, _ = load_adapter(tiny["adapters"][0])
    b, _ = load_adapter(tiny["adapters"][1])
    params = {"drop_rate": 0.5}
    whole = merge_state_dicts([a, b], [1.0, 1.0], "dare", params, seed=3)
    for k in list(a)[:5]:
        single = merge_state_dicts([{k: a[k]}, {k: b[k]}], [1.0, 1.0], "dare", params, seed=3)
        assert torch.equal(single[k], whole[k])


def test_random_methods_do_not_touch_global_rng(tiny):
    a, _ = load_adapter(tiny["adapters"][0])
    b, _ = load_adapter(tiny["adapters"][1])
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    merge_state_dicts([a, b], [1.0, 1.0], "dare", {"drop_rate": 0.2}, seed=0)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- errors

def raises(match, fn, *args, **kwargs):
    with pytest.raises(MergeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ([match] if isinstance(match, str) else match):
        assert part in msg, msg
    return msg


def test_mismatches_name_adapter_and_tensor():
    a = {"x.lora_A.weight": torch.zeros(4, 8), "x.lora_B.weight": torch.zeros(6, 4)}
    missing = {"x.lora_A.weight": torch.zeros(4, 8)}
    extra = dict(a, **{"y.lora_A.weight": torch.zeros(4, 8)})
    rank = {"x.lora_A.weight": torch.zeros(2, 8), "x.lora_B.weight": torch.zeros(6, 2)}
    shape = {"x.lora_A.weight": torch.zeros(4, 9), "x.lora_B.weight": torch.zeros(6, 4)}
    names = ["alpha", "beta"]
    raises(["adapter 'beta'", "missing tensor 'x.lora_B.weight'", "adapter 'alpha'"],
           merge_state_dicts, [a, missing], [1, 1], names=names)
    raises(["adapter 1", "'y.lora_A.weight'", "not present in adapter 0"], merge_state_dicts, [a, extra], [1, 1])
    raises(["rank mismatch", "'x.lora_A.weight'", "adapter 'beta' has rank 2", "adapter 'alpha' has rank 4"],
           merge_state_dicts, [a, rank], [1, 1], names=names)
    raises(["shape mismatch", "'x.lora_A.weight'", "adapter 1 has [4, 9]", "adapter 0 has [4, 8]"],
           merge_state_dicts, [a, shape], [1, 1])
    raises("need at least one adapter", merge_state_dicts, [], [])


def test_bad_weights_and_params():
    s = states([1.0], [2.0])
    raises("got 1 weights for 2 adapters", merge_state_dicts, s, [1.0])
    raises("weight 1 must be a finite number", merge_state_dicts, s, [1.0, float("nan")])
    raises(["unknown merge_method 'slerp'", "weighted_average"], merge_state_dicts, s, [1, 1], "slerp")
    raises(["unknown merge_params key(s) 'thresh'", "ties", "allowed: threshold, density, base_model_idx"],
           merge_state_dicts, s, [1, 1], "ties", {"thresh": 0.1})
    raises(["unknown merge_params key(s) 'base_model_idx'", "allowed: none"],
           merge_state_dicts, s, [1, 1], "weighted_average", {"base_model_idx": 0})
    raises(["'threshold'", "must be a number", "'0.1'"], merge_state_dicts, s, [1, 1], "ties", {"threshold": "0.1"})
    raises(["'base_model_idx'", "non-negative integer", "True"], parse_merge_params, "dare", {"base_model_idx": True})
    raises(["'base_model_idx'", "non-negative integer", "0.5"], parse_merge_params, "task_arithmetic", {"base_model_idx": 0.5})
    raises(["'threshold'", ">= 0"], parse_merge_params, "ties", {"threshold": -1})
    raises(["'density'", "in (0, 1]"], parse_merge_params, "ties", {"density": 1.5})
    raises(["'drop_rate'", "in [0, 1)"], parse_merge_params, "dare", {"drop_rate": 1.0})
    raises(["'amplification_factor'", "> 0"], parse_merge_params, "dare", {"amplification_factor": 0})
    raises("'threshold' (trim by threshold) cannot be combined with 'density' (trim by density)",
           parse_merge_params, "ties", {"threshold": 0.1, "density": 0.5})
    raises("'threshold'/'amplification_factor' (threshold DARE) cannot be combined with 'drop_rate' (random DARE)",
           parse_merge_params, "dare", {"drop_rate": 0.1, "threshold": 0.1, "amplification_factor": 1.0})
    raises(["'base_model_idx'", "non-negative integer or null", "-1"], parse_merge_params, "ties", {"base_model_idx": -1})
    raises(["'threshold'", "a number >= 0", "nan"], parse_merge_params, "ties", {"threshold": float("nan")})
    # defaults fill in, only the variant in use appears, and parsing the result again changes nothing
    for method, given, expect in [("ties", None, {"threshold": 0.01, "base_model_idx": None}),
                                  ("ties", {"density": 0.3}, {"density": 0.3, "base_model_idx": None}),
                                  ("dare", '{"amplification_factor": 1}', {"threshold": 0.01, "amplification_factor": 1.0,
                                                                          "base_model_idx": 0}),
                                  ("dare", {"drop_rate": 0}, {"drop_rate": 0.0, "base_model_idx": 0}),
                                  ("weighted_average", " ", {})]:
        parsed = parse_merge_params(method, given)
        assert parsed == expect and parse_merge_params(method, parsed) == parsed
    raises("not valid JSON", parse_merge_params, "ties", "{threshold: 0.1}")
    raises("must be a JSON object", parse_merge_params, "ties", "[0.1]")
    raises(["base_model_idx 2 is out of range for 2 adapters", "0..1"],
           merge_state_dicts, s, [1, 1], "task_arithmetic", {"base_model_idx": 2})
    raises("base_model_idx 5 is out of range", merge_state_dicts, s, [1, 1], "ties", {"base_model_idx": 5})


def test_nonfinite_results_are_errors():
    good = {"w": torch.ones(3)}
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0])}
    raises(["merged tensor 'w' is not finite", "adapter 'b' contains NaN/inf"],
           merge_state_dicts, [good, bad], [0.5, 0.5], names=["a", "b"])
    half = {"w": torch.full((3,), 60000.0, dtype=torch.float16)}
    with pytest.raises(NonFiniteMergeError, match="overflows torch.float16"):
        merge_state_dicts([half, half], [1.0, 1.0])


def test_worker_rejects_a_nonfinite_candidate_and_stops_on_other_merge_errors(tiny, tmp_path):
    """The search worker tells the two apart by exception type: a NaN merge is a rejected candidate, a bad
    parameter is an error."""
    from workers import CandidateTask, Source, TaskRunner

    state, config = load_adapter(tiny["adapters"][0])
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_adapter(tmp_path / "nan", nan_state, config)
    task = CandidateTask("candidate_0", (Source(str(tiny["adapters"][0]), 0), Source(str(tmp_path / "nan"), 0)),
                         {"kind": "combine", "weights": [0.5, 0.5]}, save_to=str(tmp_path / "out"))
    result = TaskRunner("cpu", {"fast_merge": 1, "merge_method": "weighted_average", "merge_params": {}}).run(task)
    assert result["accepted"] is False and math.isnan(result["utility"]) and "not finite" in result["rejected"]
    assert not (tmp_path / "out").exists()
    runner = TaskRunner("cpu", {"fast_merge": 1, "merge_method": "task_arithmetic", "merge_params": {"base_model_idx": 5}})
    with pytest.raises(MergeError, match="base_model_idx 5 is out of range"):
        runner.run(replace(task, sources=task.sources[:1] * 2))


def test_every_method_runs_on_real_adapters(tiny):
    a, _ = load_adapter(tiny["adapters"][0])
    b, _ = load_adapter(tiny["adapters"][1])
    for method in MERGE_METHODS:
        out = merge_state_dicts([a, b], [0.6, 0.4], method)
        assert out.keys() == a.keys()
        assert all(torch.isfinite(v).all() for v in out.values())


# ----------------------------------------------------------------------------- disk

def test_lora_merge_loads_in_peft_and_changes_logits(tiny, tmp_path):
    out = tmp_path / "merged"
    a0, a1 = tiny["adapters"][0], tiny["adapters"][1]
    assert lora_merge([0.5, 0.5], [str(a0), str(a1)], str(out), "cpu") == str(out)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((a0 / "adapter_config.json").read_text())
    merged = logits_with_adapter(tiny["base"], out)
    l0, l1 = logits_with_adapter(tiny["base"], a0), logits_with_adapter(tiny["base"], a1)
    assert torch.isfinite(merged).all()
    assert (merged - l0).abs().max() > 1e-4 and (merged - l1).abs().max() > 1e-4
    s0, _ = load_adapter(a0)
    s1, _ = load_adapter(a1)
    got, _ = load_adapter(out)
    for k in s0:
        assert close(got[k], 0.5 * s0[k] + 0.5 * s1[k])
    # other methods produce loadable adapters too
    lora_merge([1.0, 0.7], [str(a0), str(a1)], str(out), "cpu", merge_method="ties",
               merge_params='{"density": 0.5}')
    assert torch.isfinite(logits_with_adapter(tiny["base"], out)).all()


def test_bf16_adapters_stay_bf16(tiny, tmp_path):
    paths = []
    for i in range(2):
        state, config = load_adapter(tiny["adapters"][i])
        p = tmp_path / f"bf16_{i}"
        save_adapter(p, {k: v.to(torch.bfloat16) for k, v in state.items()}, config)
        paths.append(str(p))
    out = tmp_path / "out"
    lora_merge([0.7, 0.3], paths, str(out), "cpu", merge_method="dare", merge_params={"drop_rate": 0.1})
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert torch.isfinite(logits_with_adapter(tiny["base"], out)).all()


def test_save_adapter_replaces_atomically(tiny, tmp_path):
    state, config = load_adapter(tiny["adapters"][0])
    target = tmp_path / "cand"
    save_adapter(target, state, config)
    (target / "stale.txt").write_text("old")
    doubled = {k: 2 * v for k, v in state.items()}
    save_adapter(target, doubled, config)
    assert not (target / "stale.txt").exists()
    got, _ = load_adapter(target)
    assert all(torch.equal(got[k], doubled[k]) for k in state)
    # a failing save leaves the previous folder untouched and no temp folders behind
    with pytest.raises(Exception):
        save_adapter(target, {"a": torch.zeros(2), "b": "not a tensor"}, config)
    got, _ = load_adapter(target)
    assert all(torch.equal(got[k], doubled[k]) for k in state)
    assert sorted(os.listdir(tmp_path)) == ["cand"]


def test_disk_errors(tiny, tmp_path):
    a0, a1 = str(tiny["adapters"][0]), str(tiny["adapters"][1])
    binary = tmp_path / "bin_only"
    binary.mkdir()
    (binary / "adapter_model.bin").write_bytes(b"x")
    (binary / "adapter_config.json").write_text("{}")
    raises(["adapter_model.bin", "safe_serialization=True"], lora_merge, [1, 1], [a0, str(binary)], str(tmp_path / "o"), "cpu")
    raises(["not found", "nowhere"], lora_merge, [1, 1], [a0, str(tmp_path / "nowhere")], str(tmp_path / "o"), "cpu")
    raises("got 1 weights for 2 adapters", lora_merge, [1], [a0, a1], str(tmp_path / "o"), "cpu")
    raises("gpu_id must be a GPU index", lora_merge, [1, 1], [a0, a1], str(tmp_path / "o"), "gpu0")
    if not torch.cuda.is_available():
        raises("CUDA is not available", lora_merge, [1, 1], [a0, a1], str(tmp_path / "o"), 0)
    state, config = load_adapter(a1)
    other = tmp_path / "alpha32"
    save_adapter(other, state, dict(config, lora_alpha=32))
    raises(["lora_alpha=32", a0], lora_merge, [1, 1], [a0, str(other)], str(tmp_path / "o"), "cpu")
    # a rank-2 adapter of the same modules
    torch.manual_seed(5)
    r2 = get_peft_model(GemmaForCausalLM.from_pretrained(tiny["base"]),
                        LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    r2.save_pretrained(tmp_path / "rank2")
    r2_state, r2_config = load_adapter(tmp_path / "rank2")
    raises("rank mismatch", merge_state_dicts, [state, r2_state], [1, 1])
    raises(["has r=2", "r=4"], lora_merge, [1, 1], [a0, str(tmp_path / "rank2")], str(tmp_path / "o"), "cpu")
    assert not (tmp_path / "o").exists()


def test_fast_merge_0_sharded_full_models(tmp_path):
    dirs = []
    for i in range(2):
        torch.manual_seed(10 + i)
        d = tmp_path / f"full{i}"
        GemmaForCausalLM(tiny_config()).save_pretrained(d, max_shard_size="20KB")
        (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')
        dirs.append(d)
    assert (dirs[0] / "model.safetensors.index.json").exists()
    out = tmp_path / "merged"
    lora_merge([0.25, 0.75], [str(d) for d in dirs], str(out), "cpu", directly_load_safetensors=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    m0 = AutoModelForCausalLM.from_pretrained(dirs[0])
    m1 = AutoModelForCausalLM.from_pretrained(dirs[1])
    p0, p1, pm = m0.state_dict(), m1.state_dict(), merged.state_dict()
    for k in pm:
        assert close(pm[k], 0.25 * p0[k] + 0.75 * p1[k]), k
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=torch.arange(8)[None]).logits).all()
    # a mismatching checkpoint is rejected before anything is written
    torch.manual_seed(3)
    cfg = tiny_config()
    cfg.intermediate_size = 48
    GemmaForCausalLM(cfg).save_pretrained(tmp_path / "other", max_shard_size="20KB")
    raises(["shape mismatch", "mlp", str(tmp_path / "other")], lora_merge, [0.5, 0.5],
           [str(dirs[0]), str(tmp_path / "other")], str(tmp_path / "bad"), "cpu", directly_load_safetensors=0)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- CLI

def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_cli_bad_input_exits_2_with_one_line(tiny, tmp_path):
    a0, a1 = str(tiny["adapters"][0]), str(tiny["adapters"][1])
    for args, expect in [
        (["--weights", "0.5", "--adapters", a0, a1, "--output", str(tmp_path / "o")], "got 1 weights for 2 adapters"),
        (["--weights", "0.5,0.5", "--adapters", a0, a1, "--output", str(tmp_path / "o"),
          "--merge_method", "ties", "--merge_params", '{"treshold": 1}'], "unknown merge_params key(s) 'treshold'"),
        (["--weights", "0.5,x"], "--adapters"),  # argparse errors are one line too
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("merge.py: error:") and expect in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_cli_merges(tiny, tmp_path):
    out = tmp_path / "cli_out"
    r = run_cli("--weights", "1,-0.5", "--adapters", str(tiny["adapters"][0]), str(tiny["adapters"][2]),
                "--output", str(out), "--merge_method", "task_arithmetic")
    assert r.returncode == 0, r.stderr
    s0, _ = load_adapter(tiny["adapters"][0])
    s2, _ = load_adapter(tiny["adapters"][2])
    got, _ = load_adapter(out)
    for k in s0:
        assert close(got[k], s0[k] - 0.5 * (s2[k] - s0[k]), 1e-5)


def test_load_adapter_reads_peft_files(tiny):
    state, config = load_adapter(tiny["adapters"][0])
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)
    # a safetensors file written by hand with the same names loads the same way
    path = Path(tiny["root"]) / "copy"
    path.mkdir(exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    again, _ = load_adapter(path)
    assert all(torch.equal(again[k], state[k]) for k in state)
