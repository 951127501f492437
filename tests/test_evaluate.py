"""evaluate.py on the tiny population, on CPU, with small slices of the evaluation sets in a tmp data dir.

Perspective and Vertex AI are replaced at the network boundary only (an httplib2-like object handed to
googleapiclient, a fake Gemini client class); everything of ours runs for real.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluate as ev  # noqa: E402
import generation as gen  # noqa: E402
import services  # noqa: E402
from data import tiny_demo  # noqa: E402

torch.set_num_threads(1)
N_DEV, N_TEST = 8, 6


def _write(data_dir, name, dev, test, **extra):
    (data_dir / f"{name}.json").write_text(json.dumps({"dataset": name, "dev": dev, "test": test, **extra}))


@pytest.fixture(scope="session")
def tiny(tiny_population):
    return SimpleNamespace(base=tiny_population / "base_model", experts=tiny_population / "experts",
                           reward=tiny_population / "reward_model")


@pytest.fixture(scope="session")
def data(tiny_demo_path):
    """data/eval with the generated sets (data/build.py leaves unchanged files alone)."""
    subprocess.run([sys.executable, "data/build.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return Path(tiny_demo_path).parent


SLICES = {"tiny_demo": N_DEV, "tiny_mc": N_DEV, "tiny_mc_icl": N_DEV, "tiny_em": N_DEV, "tiny_rm": N_DEV,
          "tiny_human": 3, "nlgraph": 4}


@pytest.fixture(scope="session")
def data_dir(data, tmp_path_factory):
    """The first items of the generated evaluation sets (data/build.py, data/tiny_demo.py) in a tmp data dir."""
    out = tmp_path_factory.mktemp("eval_data")
    for name, n_dev in SLICES.items():
        full = json.loads((Path(data) / f"{name}.json").read_text())
        extra = {"icl_prompt": full["icl_prompt"]} if "icl_prompt" in full else {}
        _write(out, name, full["dev"][:n_dev], full["test"][:N_TEST], **extra)
    return out


@pytest.fixture(autouse=True)
def options(data_dir, tiny):
    """Every test starts from the default options, pointed at the small data sets and the tiny reward model."""
    ev.configure(reset=True, data_dir=str(data_dir), reward_model=str(tiny.reward), api_backoff_s=0.0,
                 perspective_qps=1000.0, judge_qps=1000.0)
    yield
    services.PERSPECTIVE_HTTP = None
    services.JUDGE_MODEL_FACTORY = None
    ev.configure(reset=True)


@pytest.fixture(scope="session")
def experts(tiny):
    return sorted(p for p in Path(tiny.experts).iterdir() if (p / "adapter_config.json").is_file())


def _eval(candidate, eval_type, dataset, tiny, **kw):
    return ev.evaluate(candidate, eval_type, dataset, "cpu", str(tiny.base), **kw)


def _eval_details(candidate, eval_type, dataset, tiny, split="dev", **kw):
    """(utility, per-item details) of one evaluation, as the search's workers get them."""
    return ev.evaluate_split(candidate, eval_type, dataset, "cpu", str(tiny.base), split, **kw)


# ----------------------------------------------------------------------------------------------------------------
# generation


def test_left_padding_same_answer_alone_and_in_mixed_batch(tiny, experts):
    host = ev.get_host(str(tiny.base), "cpu")
    model = host.load(str(experts[0]))
    prompts = ["max 3 9 2 5 =", "deg 2 in 0-1 1-2 2-3 0-4 3-4 =", "rev kqd =", "nbr 0 3 in 0-1 1-3 2-3 2-4 =",
               "cnt b in abcbd ="]
    alone = [ev.batch_generate(model, host.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    mixed = ev.batch_generate(model, host.tokenizer, prompts, max_new_tokens=6, batch_size=5)
    split = ev.batch_generate(model, host.tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert mixed == alone == split
    assert any(out for out in alone), "the tiny expert should produce answers"


def test_chat_template_generation_runs_and_needs_a_template(tiny, experts):
    host = ev.get_host(str(tiny.base), "cpu")
    model = host.load(str(experts[0]))
    outs = ev.batch_generate_chat_template(model, host.tokenizer, ["hi", "tell me a fact"], max_new_tokens=8)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs == [ev.batch_generate_chat_template(model, host.tokenizer, [p], max_new_tokens=8)[0]
                    for p in ["hi", "tell me a fact"]]


def test_greedy_loop_gives_the_tokens_of_generate(tiny, experts, data):
    """_greedy_decode (the model's forward in a loop, shared prefixes run once) returns the very tokens of
    generate() with do_sample=False, for every tiny expert and a mixed merge of them, on batches whose rows end at
    different steps."""
    host = ev.get_host(str(tiny.base), "cpu")
    assert gen._plain_decoder(host.model) and gen._layers_take_holes(host.model)
    demo = json.loads((Path(data) / "tiny_demo.json").read_text())
    ids = ev.encode(host.tokenizer, [item["question"] for item in demo["dev"][:300]])
    # the demo's prompts share their first words ("fst 9 ..."): the prefill runs in several levels
    assert len(gen._prefix_levels(ids, host.tokenizer.pad_token_id)) > 1
    from safetensors.torch import load_file
    merged = {k: sum(load_file(str(e / "adapter_model.safetensors"))[k] for e in experts[:3]) / 3
              for k in load_file(str(experts[0] / "adapter_model.safetensors"))}
    ended_early = False
    for candidate in [*experts, merged]:
        model = host.load(candidate)
        greedy = gen._greedy_decode(model, ids, 8, host.tokenizer.pad_token_id, [2], 1)
        reference = gen._generate_decode(model, ids, 8, host.tokenizer.pad_token_id, [2], 1)
        assert torch.equal(greedy, reference), candidate if not isinstance(candidate, dict) else "merge"
        ended_early |= greedy.shape[1] < 8
    assert ended_early, "the tiny experts answer one digit and stop: decoding should end before the budget"


def test_shared_prefix_prefill_on_ragged_rows(tiny, experts):
    """Rows of different lengths that share long prefixes, one a prefix of another, a duplicate, a one-token row
    and rows shorter than the cuts: the levelled prefill gives each row the last-position logits of its own
    left-padded forward pass (to float rounding) and the same greedy tokens as generate()."""
    host = ev.get_host(str(tiny.base), "cpu")
    model = host.load(str(experts[1]))
    pad = host.tokenizer.pad_token_id
    stem = ev.encode(host.tokenizer, ["max 3 9 2 5 1 4 0 7 3 8 2 6 ="])[0]
    words = ev.encode(host.tokenizer, [f"{a} {b} =" for a in range(10) for b in range(6)], add_special_tokens=False)
    rows = [stem[:-2] + w for w in words] + [stem[:9] + w for w in words[:30]]
    rows += [stem, stem[:-3], rows[0], stem[:1], stem[:3]]
    levels = gen._prefix_levels(list(dict.fromkeys(map(tuple, rows))), pad)
    assert len(levels) >= 3 and sum(level[0].numel() for level in levels) < 0.6 * sum(map(len, rows))

    distinct = list(dict.fromkeys(map(tuple, rows)))
    with torch.inference_mode():
        shared = gen._prefill(model, levels)[0]
        for j, row in enumerate(distinct):
            alone = model(input_ids=torch.tensor([row])).logits[0, -1]
            torch.testing.assert_close(shared[j], alone, rtol=1e-4, atol=1e-4)
    greedy = gen._greedy_decode(model, rows, 6, pad, [2], 1)
    reference = gen._generate_decode(model, rows, 6, pad, [2], 1)
    assert greedy.shape[0] == len(rows) and torch.equal(greedy, reference)


def test_prefix_levels_only_where_sharing_pays(tiny):
    """Prompts without a common prefix get one level, the plain left-padded batch (the tokens and positions of
    _left_pad); a long shared instruction is run once."""
    tok = ev.get_host(str(tiny.base), "cpu").tokenizer
    pad = tok.pad_token_id
    plain = ev.encode(tok, [f"{w} {a} {b} =" for w in ("fst", "snd", "max", "min", "sum") for a in range(3)
                            for b in range(2)])
    (only,) = gen._prefix_levels(plain, pad)
    ids, mask = gen._left_pad(plain, pad, "cpu")
    assert torch.equal(only[0], ids) and torch.equal(only[1], mask) and only[3] is None
    assert torch.equal(only[2], (mask.cumsum(-1) - 1).clamp(min=0))
    instructed = ev.encode(tok, ["answer the question with one digit and nothing else: " + p for p in
                                 [f"{w} {a} {b} =" for w in ("fst", "snd", "max") for a in range(10) for b in range(4)]])
    levels = gen._prefix_levels(instructed, pad)
    assert levels[0][0].shape[0] == 1 and levels[0][0].shape[1] >= 50, "the instruction is one row of the first level"
    assert gen._prefix_levels(instructed, pad, shared=False)[0][0].shape[0] == len(instructed)


def test_prefix_levels_rebuild_every_row_from_distinct_nodes():
    """On random ragged rows (shared stems, rows that are prefixes of others, one-token rows): following each row's
    parents down the levels gives back exactly its tokens, at positions 0 .. len - 1, every node of a level is a
    distinct prefix, and the last level has one row per row, in the rows' order."""
    rng = random.Random(7)
    for trial in range(200):
        stem = [rng.randrange(1, 6) for _ in range(rng.randrange(1, 12))]
        rows = [tuple(stem[:rng.randrange(0, len(stem) + 1)] + [rng.randrange(1, 6) for _ in range(rng.randrange(1, 6))])
                for _ in range(rng.randrange(2, 40))]
        rows = list(dict.fromkeys(rows))
        levels = gen._prefix_levels(rows, 0)
        node_tokens = None  # the tokens each node of the previous level stands for
        for input_ids, mask, positions, parents in levels:
            tokens = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
            starts = [0] * len(tokens) if parents is None else [len(node_tokens[p]) for p in parents.tolist()]
            for j, (new, start) in enumerate(zip(tokens, starts)):
                assert positions[j][mask[j].bool()].tolist() == list(range(start, start + len(new)))
            node_tokens = tokens if parents is None else [node_tokens[p] + new for p, new in
                                                         zip(parents.tolist(), tokens)]
            assert len(set(map(tuple, node_tokens))) == len(node_tokens), trial
        assert [tuple(t) for t in node_tokens] == rows, trial


def test_automatic_batch_size_is_bounded_by_memory_and_overridden(tiny, monkeypatch):
    """Without --batch_size a batch holds as many rows as a share of the free memory allows (all of them here);
    --batch_size overrides it; little free memory means smaller batches, never fewer than one row."""
    monkeypatch.setattr(gen, "_OOM_CAP", {})
    model = ev.get_host(str(tiny.base), "cpu").model
    row = gen._row_bytes(model, 40, 10)
    config = model.config
    assert row >= 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 50 * 4
    assert gen._rows_that_fit(model, 100, 40, 10) == 100
    sizes = []
    gen._in_batches(model, 100, list(range(100)), None, lambda chunk: sizes.append(len(chunk)),
                   fits=gen._rows_that_fit(model, 100, 40, 10))
    assert sizes == [100]
    ev.configure(batch_size=32)
    sizes.clear()
    gen._in_batches(model, 100, list(range(100)), None, lambda chunk: sizes.append(len(chunk)), fits=100)
    assert sizes == [32, 32, 32, 4]
    monkeypatch.setattr(gen, "_free_memory", lambda device: 10 * row)
    assert gen._rows_that_fit(model, 100, 40, 10) == 2   # a quarter of 10 rows' memory on CPU
    monkeypatch.setattr(gen, "_free_memory", lambda device: 0)
    assert gen._rows_that_fit(model, 100, 40, 10) == 1


# ----------------------------------------------------------------------------------------------------------------
# hot swap


def _first_in_fresh_process(tiny, data_dir, adapter):
    code = ("import sys, json; sys.path.insert(0, %r); import evaluate as ev; "
            "ev.configure(data_dir=%r); "
            "u, d = ev.evaluate_split(%r, 'exact_match', 'tiny_demo', 'cpu', %r, 'dev'); "
            "print(json.dumps([u, d['preds']]))") % (str(REPO), str(data_dir), str(adapter),
                                                                     str(tiny.base))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hot_swap_matches_first_evaluation_and_fresh_peft_model(tiny, experts, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    x, y = experts[0], experts[1]
    first_u, first_preds = _first_in_fresh_process(tiny, data_dir, x)

    _eval(str(y), "exact_match", "tiny_demo", tiny)
    u, d = _eval_details(str(x), "exact_match", "tiny_demo", tiny)
    assert u == first_u and d["preds"] == first_preds
    assert u == ev.evaluate(str(x), "exact_match", "tiny_demo", "cpu", str(tiny.base))

    base = AutoModelForCausalLM.from_pretrained(str(tiny.base), dtype=torch.float32)
    fresh = PeftModel.from_pretrained(base, str(x)).eval()
    data = ev.split_data(json.loads((data_dir / "tiny_demo.json").read_text()), "dev", "tiny_demo", "exact_match")
    result = ev.score_exact_match(fresh, ev.get_host(str(tiny.base), "cpu").tokenizer, data)
    assert result.utility == u and result.preds == first_preds


def test_in_memory_state_dict_equals_folder(tiny, experts):
    import merge
    state, config = merge.load_adapter(str(experts[2]))
    u_folder, d = _eval_details(str(experts[2]), "exact_match", "tiny_demo", tiny)
    assert _eval((state, config), "exact_match", "tiny_demo", tiny) == u_folder
    u_bare, d_bare = _eval_details(state, "exact_match", "tiny_demo", tiny)  # bare state reuses the slot's layout
    assert u_bare == u_folder and d_bare["preds"] == d["preds"]


def test_bare_state_dict_without_slot_asks_for_config(tiny, experts):
    import merge
    state, _ = merge.load_adapter(str(experts[0]))
    host = ev.ModelHost(str(tiny.base), torch.device("cpu"), torch.float32)
    with pytest.raises(ev.EvalError, match=r"pass \(state, adapter_config\)"):
        host.load(state)


def test_rank_change_rebuilds_slot(tiny, experts):
    import merge
    state, config = merge.load_adapter(str(experts[0]))
    u_before = _eval(str(experts[0]), "exact_match", "tiny_demo", tiny)
    # a rank-4 adapter: keep the first 4 ranks; alpha scales with r so the product B @ A is just truncated
    small = {k: (v[:4] if "lora_A" in k else v[:, :4]).contiguous() for k, v in state.items()}
    small_config = dict(config, r=4, lora_alpha=config["lora_alpha"] * 4 / config["r"])
    _eval((small, small_config), "exact_match", "tiny_demo", tiny)
    host = ev.get_host(str(tiny.base), "cpu")
    assert host.peft.peft_config["default"].r == 4
    assert _eval(str(experts[0]), "exact_match", "tiny_demo", tiny) == u_before
    assert host.peft.peft_config["default"].r == config["r"]


def test_full_model_candidate_and_base_restore(tiny, experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    x, y = experts[3], experts[4]
    u_y, d_y = _eval_details(str(y), "exact_match", "tiny_demo", tiny)
    u_x, d_x = _eval_details(str(x), "exact_match", "tiny_demo", tiny)

    base = AutoModelForCausalLM.from_pretrained(str(tiny.base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(x)).merge_and_unload()
    full = tmp_path / "full_x"
    merged.save_pretrained(str(full), max_shard_size="200KB")  # several shards: loaded one at a time
    assert (full / "model.safetensors.index.json").is_file()

    u_full, d_full = _eval_details(str(full), "exact_match", "tiny_demo", tiny)
    assert u_full == u_x and d_full["preds"] == d_x["preds"]
    host = ev.get_host(str(tiny.base), "cpu")
    assert host.base_backup is not None and host.base_dirty
    # the next adapter candidate runs on the true base weights again
    u_again, d_again = _eval_details(str(y), "exact_match", "tiny_demo", tiny)
    assert u_again == u_y and d_again["preds"] == d_y["preds"] and not host.base_dirty


def test_bad_candidates(tiny, tmp_path):
    with pytest.raises(ev.EvalError, match="not found"):
        _eval(str(tmp_path / "nope"), "exact_match", "tiny_demo", tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvalError, match="neither an adapter"):
        _eval(str(tmp_path / "empty"), "exact_match", "tiny_demo", tiny)
    with pytest.raises(ev.EvalError, match="model_path must be"):
        _eval(42, "exact_match", "tiny_demo", tiny)


# ----------------------------------------------------------------------------------------------------------------
# the objectives


def test_multiple_choice_generate_and_logits(tiny, experts):
    u, d = _eval_details(str(experts[0]), "multiple_choice", "tiny_mc", tiny)
    assert 0.0 <= u <= 1.0 and len(d["golds"]) == N_DEV == len(d["preds"])
    assert u == sum(p == g for p, g in zip(d["preds"], d["golds"])) / N_DEV
    ev.configure(mc_scoring="logits")
    u, d = _eval_details(str(experts[0]), "multiple_choice", "tiny_mc", tiny)
    assert all(p in "ABCD" for p in d["preds"]) and u == sum(d["scores"]) / N_DEV


def test_multiple_choice_icl_prompt_is_prepended(tiny, data_dir):
    data = json.loads((data_dir / "tiny_mc_icl.json").read_text())
    prompt = ev.multiple_choice_prompt(data["dev"][0], "tiny_mc_icl", data["icl_prompt"])
    assert prompt.startswith(data["icl_prompt"] + "\n") and prompt.endswith("The answer is")
    kc = ev.multiple_choice_prompt({"question": "Q?", "choices": {"A": "x", "B": "y"}}, "knowledge_crosswords", "EX")
    assert kc == "EX\nQuestion: Q?\nA: x\nB: y\nThe answer is"
    hs = ev.multiple_choice_prompt({"question": "He", "choices": {"A": "x"}}, "hellaswag")
    assert hs.startswith("Please choose an option that best completes the sentence.\nQuestion: He\n")
    assert 0.0 <= _eval(None, "multiple_choice", "tiny_mc_icl", tiny) <= 1.0


# Trains the sanity model in its own process with the tiny build's pinned CPU kernels, so that its bytes, and with
# them its letter margins, are the same on every x86-64 machine (a LoRA adapter trained for 150 steps on each
# machine's own kernels had margins of 0.003-0.19 and answered "A" everywhere on one of two machines). All weights
# are tuned, on a rule the base can pick up (the skill -> letter rule used before, which has to look back to the
# question, left this population answering "A" everywhere after 300 steps, LoRA or full).
MC_ADAPTER_TRAINING = r"""
import json, random, sys
import torch
sys.path.insert(0, sys.argv[1])
import evaluate as ev
from data import tiny_demo
from transformers import AutoModelForCausalLM, AutoTokenizer
base, out, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(base)
rng = random.Random(0)

def item(x):
    # 2, 3 or 4 options and the gold is the last: its letter sits at a fixed distance before the answer, which a
    # character-level model trained to copy digits from fixed places learns in a few dozen steps
    n = rng.choice((2, 3, 4))
    options = rng.sample([a for a in "0123456789" if a != x["answer"]], n - 1) + [x["answer"]]
    return {"question": x["question"], "choices": dict(zip("ABCD", options)), "answer": "ABCD"[n - 1]}

train = [item(x) for x in tiny_demo.make_items(200, seed=77)]
held_out = [item(x) for x in tiny_demo.make_items(12, seed=78)]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
model.train()
for _ in range(steps):
    batch = rng.sample(train, 16)
    rows = [tok(ev.multiple_choice_prompt(b, "tiny_mc") + " " + b["answer"]).input_ids + [tok.eos_token_id]
            for b in batch]
    ids, mask = ev._left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    labels = ids.clone()
    labels[:, :-3] = -100  # learn " X<eos>" only
    loss = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.save_pretrained(out)
json.dump(held_out, open(out + "/held_out.json", "w"))
"""
MC_ADAPTER_STEPS = 80


@pytest.fixture(scope="module")
def mc_adapter(tiny, tmp_path_factory):
    """A full-model candidate (the tiny base, fine-tuned) that answers tiny multiple-choice prompts with " <letter>"
    and stops. Items have 2-4 options and the gold is the last, so predictions vary across items (B, C, D).
    Returns (model folder, held-out items)."""
    sys.path.insert(0, str(REPO / "initial_experts"))
    from expert_init import PINNED_KERNELS
    out = tmp_path_factory.mktemp("mc_adapter") / "adapter"
    env = dict(os.environ, **PINNED_KERNELS)
    subprocess.run([sys.executable, "-c", MC_ADAPTER_TRAINING, str(REPO), str(tiny.base), str(out),
                    str(MC_ADAPTER_STEPS)], cwd=REPO, env=env, check=True, timeout=1800)
    return out, json.loads((out / "held_out.json").read_text())


def test_mc_logits_matches_generate_on_sanity_example(tiny, mc_adapter, data_dir):
    adapter, held_out = mc_adapter
    _write(data_dir, "tiny_mc_sanity", held_out, held_out)
    _, generated = _eval_details(str(adapter), "multiple_choice", "tiny_mc_sanity", tiny)
    assert all(o in "ABCD" and o for o in generated["outputs"]), generated["outputs"]
    ev.configure(mc_scoring="logits")
    assert _eval_details(str(adapter), "multiple_choice", "tiny_mc_sanity", tiny)[1]["preds"] == generated["preds"]
    assert len(set(generated["preds"])) > 1, "the sanity adapter should not answer one letter everywhere"
    # No knife edge: every item's chosen letter leads the next one by a clear log-prob margin, far above what
    # other CPU kernels change (about 1e-6), so generate and logits agree on any machine.
    host = ev.get_host(str(tiny.base), "cpu")
    scores = ev.option_logprobs(host.load(str(adapter)), host.tokenizer, held_out, "tiny_mc_sanity")
    margins = [sorted(s.values())[-1] - sorted(s.values())[-2] for s in scores]
    assert min(margins) > 0.1, margins


def test_parse_choice():
    choices = {"A": "Paris", "B": "London", "C": "Rome", "D": "New York"}
    assert ev.parse_choice(choices, " B") == "B"
    assert ev.parse_choice(choices, "(C) Rome") == "C"
    assert ev.parse_choice(choices, "I think the answer is D.") == "D"
    assert ev.parse_choice(choices, "it must be london") == "B"
    assert ev.parse_choice(choices, "Answer unclear") is None
    many = {k: str(i) for i, k in enumerate("ABCDEFGHIJ")}
    assert ev.parse_choice(many, "J: 9") == "J"


def test_exact_match_rules():
    assert ev.exact_match_rule("gsm8k") == "last_number" and ev.exact_match_rule("nlgraph_mini") == "yes_no_or_number"
    assert ev.exact_match_rule("tiny_demo") == "first_token"
    pred = ev.extract_answer("first_token", "dqk", " dqk\nmore")
    assert pred == "dqk" and ev.exact_match_score("first_token", "dqk", pred) == 1.0
    assert ev.exact_match_score("first_token", "9", ev.extract_answer("first_token", "9", "19")) == 0.0
    pred = ev.extract_answer("last_number", "1,150", "10 dimes is 100 and so 1,150 pennies")
    assert ev.exact_match_score("last_number", "1150", pred) == 1.0
    assert ev.exact_match_score("yes_no_or_number", "Yes", ev.extract_answer("yes_no_or_number", "Yes", "yes.")) == 1
    assert ev.exact_match_score("yes_no_or_number", "3", ev.extract_answer("yes_no_or_number", "3", "13")) == 0.0


# The published evaluator's readings (--scoring published, the default) against the strict ones, on the outputs the
# two rule sets disagree on. Each row: (gold, output, published score, strict score).
EXACT_MATCH_CASES = {
    "tiny_demo": [("3", "13", 1.0, 0.0),                          # a substring, not the answer
                  ("3", "3", 1.0, 1.0),
                  ("dqk", "the answer: dqk", 1.0, 0.0),           # strict reads the first words only
                  ("dqk", " dqk\nmore", 1.0, 1.0),
                  ("ab", "a b", 0.0, 0.0)],
    "nlgraph": [("3", "The shortest path is 0->3->5 with length 11", 1.0, 0.0),
                ("11", "The shortest path is 0->3->5 with length 11", 1.0, 0.0),  # strict: the first number
                ("Yes", "yes", 0.0, 1.0),                         # published is case-sensitive
                ("No", "No, they are not connected", 1.0, 1.0)],
}


@pytest.mark.parametrize("dataset", sorted(EXACT_MATCH_CASES))
def test_exact_match_published_and_strict_readings(dataset):
    for gold, output, published, strict in EXACT_MATCH_CASES[dataset]:
        assert ev.published_exact_match(dataset, "dev", gold, output)[1] == published, (gold, output)
        rule = ev.exact_match_rule(dataset)
        assert ev.exact_match_score(rule, gold, ev.extract_answer(rule, gold, output)) == strict, (gold, output)


def test_exact_match_published_gsm8k_reads_the_last_words_5_on_dev_10_on_test():
    output = "So she pays 42 dollars in total for the seven new books she bought"  # 42 is 12th from the end
    assert ev.published_exact_match("gsm8k", "dev", "42", output) == ("for the seven new books she bought"
                                                                       .split(" ", 2)[2], 0.0)
    assert ev.published_exact_match("gsm8k", "test", "42", output)[1] == 0.0
    near = "So she pays 42 dollars in total for the new books"  # 42 is 8th from the end
    assert ev.published_exact_match("gsm8k", "dev", "42", near)[1] == 0.0
    assert ev.published_exact_match("gsm8k", "test", "42", near) == ("42", 1.0)
    # split on single spaces, as published: a newline does not separate words
    assert ev.published_exact_match("gsm8k", "dev", "7", "x y z\n7 a b c d")[1] == 1.0
    # other datasets (mgsm included) search the whole output
    assert ev.published_exact_match("mgsm_hindi", "dev", "42", near)[1] == 1.0


def test_parse_choice_published_reproduces_the_published_rules():
    choices = {"A": "Paris", "B": "London", "C": "Rome", "D": "New York"}
    cases = [(" B", "B", "B"),
             ("All of them", "A", None),                              # "A" in "All o"
             ("ABCD", "A", None),
             ("Actually, I think the answer is D.", "A", "D"),        # "Actua" holds an A
             ("I think the answer is D.", "D", "D"),                  # last five characters "is D."
             ("The capital is london", "B", "B"),                     # option text, lower-cased
             ("B, A", "A", "B"),                                      # keys in listed order: A before B
             ("Hmm, maybe rome or paris", "A", "A"),                  # first listed option whose text matches
             ("none", None, None)]
    for output, published, strict in cases:
        assert ev.parse_choice_published(choices, output) == published, output
        assert ev.parse_choice(choices, output) == strict, output
        ev.configure(scoring="published")
        assert ev.read_choice(choices, output) == published
        ev.configure(scoring="strict")
        assert ev.read_choice(choices, output) == strict


def test_scoring_option_is_validated():
    assert ev.OPTIONS["scoring"] == "published"
    with pytest.raises(ev.EvalError, match="scoring='loose' is invalid: expected 'published' or 'strict'"):
        ev.configure(scoring="loose")


def test_published_scoring_on_the_model_follows_the_rule(tiny, experts):
    """Real generations: every item scores 1 exactly when its gold is in the output (10 new tokens), and the
    strict rules score a subset of those items on tiny_demo (they read the first words only)."""
    u, d = _eval_details(str(experts[0]), "exact_match", "tiny_demo", tiny)
    assert d["scores"] == [float(g in o) for g, o in zip(d["golds"], d["outputs"])]
    assert u == sum(d["scores"]) / N_DEV
    ev.configure(scoring="strict")
    strict = _eval_details(str(experts[0]), "exact_match", "tiny_demo", tiny)[1]["scores"]
    assert all(p >= s for p, s in zip(d["scores"], strict))
    ev.configure(scoring="published")
    _, d = _eval_details(str(experts[1]), "multiple_choice", "tiny_mc", tiny)
    items = json.loads((Path(ev.OPTIONS["data_dir"]) / "tiny_mc.json").read_text())["dev"]
    assert d["preds"] == [ev.parse_choice_published(item["choices"], o) for item, o in zip(items, d["outputs"])]


def test_exact_match_nlgraph(tiny, experts):
    ev.configure(scoring="strict")
    u, d = _eval_details(str(experts[0]), "exact_match", "nlgraph", tiny)
    assert len(d["scores"]) == 4 and u == sum(d["scores"]) / 4
    assert all(p is None or p in ("yes", "no") or p.lstrip("-").replace(".", "").isdigit() for p in d["preds"])


def test_exact_match_tiny_demo_and_budget(tiny, experts):
    ev.configure(scoring="strict")
    u, d = _eval_details(str(experts[0]), "exact_match", "tiny_demo", tiny)
    assert len(d["scores"]) == N_DEV and u == sum(d["scores"]) / N_DEV
    tok = ev.get_host(str(tiny.base), "cpu").tokenizer
    golds = [x for x in d["golds"]]
    assert ev.exact_match_budget(tok, golds, "first_token") == max(len(" " + g) for g in golds) + 8
    assert ev.exact_match_budget(tok, golds, "last_number") == 200


def test_multitask_harmonic_mean_and_one_two(tiny, experts):
    a = experts[0]
    u_mc = _eval(str(a), "multiple_choice", "tiny_mc", tiny)
    u_em = _eval(str(a), "exact_match", "tiny_em", tiny)
    u, d = _eval_details(str(a), "multitask", "tiny_domain", tiny)
    expected = 0.0 if u_mc + u_em == 0 else 2 * u_mc * u_em / (u_mc + u_em)
    assert u == pytest.approx(expected)
    assert len(d["golds"]) == 2 * N_DEV and set(d["parts"]) == {"tiny_mc", "tiny_em"}
    assert _eval(str(a), "multitask", "tiny_domain", tiny, only_one_or_two="one") == u_mc
    assert _eval(str(a), "multitask", "tiny_domain", tiny, only_one_or_two="two") == u_em
    with pytest.raises(ev.EvalError, match="only_one_or_two"):
        _eval(str(a), "multitask", "tiny_domain", tiny, only_one_or_two="three")


def test_abstainqa_effective_reliability(tiny, experts):
    u, d = _eval_details(str(experts[1]), "AbstainQA", "tiny_mc", tiny)
    correct = [int(p == g) for p, g in zip(d["preds"], d["golds"])]
    assert u == pytest.approx(ev.effective_reliability(correct, d["abstain"]))
    assert u == pytest.approx(sum(d["scores"]) / N_DEV)
    assert ev.effective_reliability([1, 0, 1, 0], [0, 0, 1, 1]) == 0.0
    assert ev.effective_reliability([1, 1, 0, 1], [0, 0, 0, 1]) == 0.25


# -- Perspective API, faked at the HTTP layer googleapiclient talks to

DISCOVERY = {
    "kind": "discovery#restDescription", "discoveryVersion": "v1", "id": "commentanalyzer:v1alpha1",
    "name": "commentanalyzer", "version": "v1alpha1", "rootUrl": "https://commentanalyzer.googleapis.com/",
    "servicePath": "", "baseUrl": "https://commentanalyzer.googleapis.com/", "batchPath": "batch",
    "parameters": {"key": {"type": "string", "location": "query"}},
    "schemas": {"AnalyzeCommentRequest": {"id": "AnalyzeCommentRequest", "type": "object"},
                "AnalyzeCommentResponse": {"id": "AnalyzeCommentResponse", "type": "object"}},
    "resources": {"comments": {"methods": {"analyze": {
        "id": "commentanalyzer.comments.analyze", "path": "v1alpha1/comments:analyze",
        "flatPath": "v1alpha1/comments:analyze", "httpMethod": "POST", "parameters": {}, "parameterOrder": [],
        "request": {"$ref": "AnalyzeCommentRequest"}, "response": {"$ref": "AnalyzeCommentResponse"}}}}}}


class FakePerspectiveHttp:
    """httplib2.Http stand-in: serves the discovery document, then answers analyze calls (429 first if asked)."""

    def __init__(self, fail_first=0, status=429):
        self.requests, self.fail_first, self.status = [], fail_first, status
        self.follow_redirects = True

    @staticmethod
    def toxicity_of(text):
        return (len(text) % 7) / 10

    def request(self, uri, method="GET", body=None, headers=None, redirections=1, connection_type=None):
        import httplib2
        if "$discovery" in uri:
            return httplib2.Response({"status": "200"}), json.dumps(DISCOVERY).encode()
        self.requests.append((uri, method, json.loads(body)))
        if self.fail_first:
            self.fail_first -= 1
            return httplib2.Response({"status": str(self.status)}), b'{"error": {"message": "quota"}}'
        text = json.loads(body)["comment"]["text"]
        reply = {"attributeScores": {"TOXICITY": {"summaryScore": {"value": self.toxicity_of(text)}}}}
        return httplib2.Response({"status": "200"}), json.dumps(reply).encode()


def test_external_api_perspective_requests(tiny, experts, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    http = FakePerspectiveHttp(fail_first=2)
    services.PERSPECTIVE_HTTP = http
    u, d = _eval_details(str(experts[0]), "external_api", "tiny_rm", tiny)
    texts = [o.split("\n", 1)[0].strip() for o in d["preds"]]
    scored = [t for t in texts if t]
    bodies = [b for _, _, b in http.requests]
    assert len(bodies) == len(scored) + 2  # two 429s retried
    for uri, method, body in http.requests:
        assert method == "POST" and "comments:analyze" in uri and "key=test-key" in uri
        assert body["requestedAttributes"] == {"TOXICITY": {}}
    assert [b["comment"]["text"] for b in bodies[2:]] == scored
    expected = [0.5 if not t else 1 - FakePerspectiveHttp.toxicity_of(t) for t in texts]
    assert d["scores"] == pytest.approx(expected) and u == pytest.approx(sum(expected) / len(expected))


def test_external_api_gives_up_with_one_line(tiny, experts, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    ev.configure(api_retries=1)
    services.PERSPECTIVE_HTTP = FakePerspectiveHttp(fail_first=100, status=503)
    with pytest.raises(ev.EvalError, match="Perspective API request failed: HTTP 503"):
        _eval(str(experts[0]), "external_api", "tiny_rm", tiny)


# -- reward models


@pytest.mark.parametrize("eval_type", ["rm_default", "rm_verbose", "rm_concise"])
def test_reward_model_objectives(tiny, experts, eval_type):
    ev.configure(max_new_tokens=12)
    u, d = _eval_details(str(experts[0]), eval_type, "tiny_rm", tiny)
    assert len(d["scores"]) == N_DEV and u == pytest.approx(sum(d["scores"]) / N_DEV)
    assert d["scores"] == pytest.approx(ev.rm_utility(eval_type, d["rewards"], d["lengths"], 12))
    if eval_type != "rm_default":
        assert all(0.0 <= s <= 1.0 for s in d["scores"])


def test_reward_model_matches_direct_scoring(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny.reward), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny.reward))
    pairs = [("hi", "hello there"), ("tell me a fact", "ok")]
    got = ev.reward_scores([p for p, _ in pairs], [r for _, r in pairs], torch.device("cpu"))
    for (p, r), score in zip(pairs, got):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        with torch.no_grad():
            want = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert score == pytest.approx(want, abs=1e-4)


def test_rm_length_normalisation():
    assert ev.rm_utility("rm_verbose", [0.0], [6], 12) == [0.5 * (0.5 + 0.5)]
    assert ev.rm_utility("rm_concise", [0.0], [3], 12) == [0.5 * (0.5 + 0.75)]
    assert ev.rm_utility("rm_default", [2.5], [3], 12) == [2.5]
    assert 0.0 <= ev.rm_utility("rm_verbose", [-1000.0], [50], 12)[0] <= 1.0


def _remote_code_reward_model(tiny, tmp_path):
    """The tiny reward model repackaged as a remote-code model with get_score(), like internlm2-7b-reward."""
    path = tmp_path / "remote_rm"
    shutil.copytree(tiny.reward, path)
    (path / "modeling_tiny_reward.py").write_text(
        "import torch\n"
        "from transformers import GemmaForSequenceClassification\n"
        "class TinyRewardModel(GemmaForSequenceClassification):\n"
        "    def get_score(self, tokenizer, conversation):\n"
        "        text = tokenizer.apply_chat_template(conversation, tokenize=False)\n"
        "        ids = tokenizer(text, return_tensors='pt', add_special_tokens=False).to(self.device)\n"
        "        return self(**ids).logits[0, 0].item() + 100.0\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_tiny_reward.TinyRewardModel"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_remote_code_reward_model_needs_trust_and_uses_get_score(tiny, tmp_path):
    path = _remote_code_reward_model(tiny, tmp_path)
    ev.configure(reward_model=str(path))
    with pytest.raises(ev.EvalError, match="pass --trust_remote_code"):
        ev.reward_scores(["hi"], ["hello"], torch.device("cpu"))
    ev.configure(trust_remote_code=True)
    ev.configure(reward_model=str(tiny.reward))
    plain = ev.reward_scores(["hi"], ["hello"], torch.device("cpu"))
    ev.configure(reward_model=str(path))
    remote = ev.reward_scores(["hi"], ["hello"], torch.device("cpu"))
    assert remote[0] == pytest.approx(plain[0] + 100.0, abs=1e-4)


# -- Gemini judge, faked at the client object


class FakeGemini:
    instances = []

    def __init__(self, name):
        self.name, self.prompts = name, []
        FakeGemini.instances.append(self)

    def generate_content(self, prompt, generation_config=None):
        self.prompts.append(prompt)
        reply = "I refuse to rate." if len(self.prompts) == 2 else f"Rating: {len(self.prompts) + 5}/10\nFine."

        class Response:
            text = reply
        return Response()


def test_human_gemini_judge(tiny, experts, data_dir, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    FakeGemini.instances.clear()
    services.JUDGE_MODEL_FACTORY = FakeGemini
    ev.configure(max_new_tokens=10, judge_model="gemini-test")
    u, d = _eval_details(str(experts[0]), "human", "tiny_human", tiny)
    judge = FakeGemini.instances[-1]
    assert judge.name == "gemini-test" and len(judge.prompts) == 3
    item_prompts = [x["prompt"] for x in json.loads((data_dir / "tiny_human.json").read_text())["dev"]]
    for prompt, item_prompt, response in zip(judge.prompts, item_prompts, d["preds"]):
        assert "Rating: N/10" in prompt and f"Instruction: {item_prompt}\n" in prompt
        assert prompt.endswith(f"Response: {response}")
    assert d["scores"] == [6.0, 1.0, 8.0] and d["unparseable_judgements"] == 1
    assert u == pytest.approx(5.0)


def test_parse_rating():
    assert services.parse_rating("Rating: 7/10 because") == 7
    assert services.parse_rating("**Rating:** 12/10") == 10
    assert services.parse_rating("Rating: 0/10") == 1 and services.parse_rating("seven") is None


# ----------------------------------------------------------------------------------------------------------------
# errors, credentials, devices


def test_missing_credentials(monkeypatch, tiny):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(ev.EvalError, match="set PERSPECTIVE_API_KEY"):
        ev.check_credentials("external_api")
    with pytest.raises(ev.EvalError, match="set GOOGLE_CLOUD_PROJECT"):
        ev.check_credentials("human")
    ev.check_credentials("multiple_choice")
    # checked before any model work: a base model that does not exist is never reached
    with pytest.raises(ev.EvalError, match="PERSPECTIVE_API_KEY"):
        ev.evaluate(None, "external_api", "tiny_rm", "cpu", "/nonexistent/base")


def test_nonexistent_gpu():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = "no CUDA GPU visible; use -g cpu" if count == 0 else f"only {','.join(map(str, range(count)))} visible"
    with pytest.raises(ev.EvalError, match=expected.replace("(", r"\(")):
        ev.get_host("/nonexistent/base", count + 3)
    with pytest.raises(ev.EvalError, match="gpu_id must be"):
        ev.resolve_device("gpu0")


def test_bad_options_and_eval_type(tiny):
    with pytest.raises(ev.EvalError, match="mc_scoring"):
        ev.configure(mc_scoring="vote")
    with pytest.raises(ev.EvalError, match="unknown evaluate option"):
        ev.configure(batchsize=3)
    with pytest.raises(ev.EvalError, match="unknown eval_type 'nope'"):
        _eval(None, "nope", "tiny_demo", tiny)
    with pytest.raises(ev.EvalError):
        _eval(None, "exact_match", "no_such_dataset", tiny)


def test_details_files_and_data_cache(tiny, experts, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(experts[0], cand)
    u = _eval(str(cand), "exact_match", "tiny_demo", tiny, save_dev_flag=True)
    saved = json.loads((cand / "golds_preds_dev.json").read_text())
    u_again, d = _eval_details(str(cand), "exact_match", "tiny_demo", tiny)
    assert saved["utility"] == u == u_again and saved["golds"] == d["golds"] and saved["preds"] == d["preds"]
    assert d["forward_seconds"] > 0 and d["total_seconds"] >= d["forward_seconds"]
    ut = ev.evaluate_test(str(cand), "exact_match", "tiny_demo", "cpu", str(tiny.base))
    saved = json.loads((cand / "golds_preds_test.json").read_text())
    assert saved["split"] == "test" and saved["utility"] == ut and len(saved["scores"]) == N_TEST
    assert not [p for p in os.listdir(cand) if ".tmp" in p]
    assert ev.load_data("tiny_demo", "exact_match") is ev.load_data("tiny_demo", "exact_match")
    assert ev.evaluate(str(cand), "exact_match", "tiny_demo", "cpu", str(tiny.base), skip_flag=True) is None


def test_every_objective_on_test_split(tiny, experts, monkeypatch, tmp_path):
    # a copy: evaluate_test writes golds_preds_test.json into the candidate folder, not into the shipped population
    candidate = shutil.copytree(experts[0], tmp_path / experts[0].name)
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "p")
    services.PERSPECTIVE_HTTP = FakePerspectiveHttp()
    services.JUDGE_MODEL_FACTORY = FakeGemini
    ev.configure(max_new_tokens=8)
    for eval_type, dataset in [("multiple_choice", "tiny_mc"), ("exact_match", "tiny_demo"),
                               ("multitask", "tiny_domain"), ("AbstainQA", "tiny_mc"),
                               ("external_api", "tiny_rm"), ("rm_default", "tiny_rm"), ("rm_verbose", "tiny_rm"),
                               ("rm_concise", "tiny_rm"), ("human", "tiny_human")]:
        u, d = _eval_details(str(candidate), eval_type, dataset, tiny, split="test", save=True)
        assert isinstance(u, float) and d["split"] == "test" and len(d["scores"]) == len(d["preds"]), eval_type
        assert json.loads((candidate / "golds_preds_test.json").read_text()) == d, eval_type


# ----------------------------------------------------------------------------------------------------------------
# a user-added objective, added exactly as docs/extending.md's "Data, models and evaluation types" says


def _readme_recipe():
    """(entry, scorer) of the evaluation recipe in docs/extending.md: its two python blocks, as a user would copy
    them (the entry indented as the other entries of EVAL_TYPES, the scorer at the top level)."""
    readme = (REPO / "docs" / "extending.md").read_text()
    section = readme[readme.index("- **Evaluation**: one entry and its scorer"):]
    entry, scorer = (textwrap.dedent(block[:block.index("```")]) for block in section.split("```python\n")[1:3])
    return textwrap.indent(entry, "    "), scorer


def _insert_before(path, after, stop, text):
    """Insert text above the first line equal to `stop` that follows the line starting with `after`."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip("\n") == stop)
    path.write_text("".join(lines[:end]) + text + "".join(lines[end:]))


def test_readme_recipe_adds_an_eval_type(tiny, experts, data_dir, tmp_path):
    """The recipe applied to a copy of the repository's code: the entry at the end of EVAL_TYPES, the scorer at the
    end of evaluate.py; then search.py validates the new type's data, checks its prompts' lengths and runs it end to
    end."""
    entry, scorer = _readme_recipe()
    assert 'EvalType(' in entry and scorer.startswith("def score_keyword(")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for source in list(REPO.glob("*.py")) + list((REPO / "data").glob("*.py")):
        shutil.copy(source, repo / source.relative_to(REPO))
    _insert_before(repo / "data" / "schema.py", "EVAL_TYPES = {", "}", entry)
    with open(repo / "evaluate.py", "a") as f:
        f.write("\n\n" + scorer)

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    help_text = subprocess.run([sys.executable, "search.py", "-h"], cwd=repo, env=env, capture_output=True,
                               text=True, check=True).stdout
    assert "keyword (the gold answer appears in the output" in " ".join(help_text.split())
    run_args = ["-g", "cpu", "-i", str(tiny.experts), "-b", str(tiny.base), "--output_root", str(tmp_path / "out"),
                "--seed", "3"]
    common = [*run_args, "--data_dir", str(data_dir)]
    # validation reads the row: prompt-only items are refused for an exact-match kind, in one line
    refused = subprocess.run([sys.executable, "search.py", "-n", "kw", "-e", "keyword", "-d", "tiny_rm", *common],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "keyword needs exact match items" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # the entry's prompts and max_new_tokens are length-checked: a question as long as the tiny model's context
    long_dir = tmp_path / "long_data"
    long_dir.mkdir()
    _write(long_dir, "tiny_long", [{"question": "x" * 2040, "answer": "y"}], [{"question": "Q?", "answer": "y"}])
    too_long = subprocess.run([sys.executable, "search.py", "-n", "kw", "-e", "keyword", "-d", "tiny_long",
                               *run_args, "--data_dir", str(long_dir)],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert too_long.returncode == 2 and not (tmp_path / "out").exists(), too_long.stderr
    assert re.search(r"dataset tiny_long \(dev split\) item 0: its prompt is \d+ tokens \+ 20 to generate, more than "
                     r"the 2048 positions", too_long.stderr), too_long.stderr

    proc = subprocess.run([sys.executable, "search.py", "-n", "kw", "-e", "keyword", "-d", "tiny_demo", "-m", "1",
                           *common], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (directory,) = (tmp_path / "out").iterdir()
    metrics = json.loads((directory / "final_metrics.json").read_text())
    assert 0.0 <= metrics["ending_best_validation_utility"] <= 1.0
    assert "top3_ensemble_test_accuracy" in metrics  # vote=True: the ensembles vote on predictions
    saved = json.loads((directory / "global_best" / "golds_preds_test.json").read_text())
    items = json.loads((data_dir / "tiny_demo.json").read_text())["test"]
    assert saved["eval_type"] == "keyword" and saved["golds"] == [item["answer"] for item in items]
    assert saved["scores"] == [float(g in p) for g, p in zip(saved["golds"], saved["preds"])]
    assert saved["utility"] == sum(saved["scores"]) / len(items)


def test_cuda_oom_halves_the_batch_and_retries(tiny, monkeypatch):
    """A CUDA OOM (raised here by the batch runner, as the device would) halves the batch; the smaller size is
    kept for later calls."""
    monkeypatch.setattr(gen, "_OOM_CAP", {})
    model = ev.get_host(str(tiny.base), "cpu").model
    seen = []

    def run(chunk):
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.append(list(chunk))

    gen._in_batches(model, 10, list(range(10)), 16, run)
    assert [i for c in seen for i in c] == list(range(10)) and max(map(len, seen)) == 2
    assert gen._batch_size(None, torch.device("cpu")) == 2

    def always(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ev.EvalError, match="even at batch size 1"):
        gen._in_batches(model, 4, list(range(4)), 4, always)


def test_multitask_unknown_domain(tiny):
    with pytest.raises(ev.EvalError, match="tiny_domain"):
        _eval(None, "multitask", "no_such_domain", tiny)


def test_option_logprobs_equal_a_plain_forward_per_item(tiny, mc_adapter, data_dir):
    """Shared-prefix scoring (one cached prefix, left-padded rows after it) gives the log-probs of a plain forward of
    each full prompt on its own, for plain and in-context (long shared prefix) prompts alike."""
    adapter, held_out = mc_adapter
    icl = json.loads((data_dir / "tiny_mc_icl.json").read_text())
    host = ev.get_host(str(tiny.base), "cpu")
    model, tok = host.load(str(adapter)), host.tokenizer
    for items, dataset, prefix in ((held_out, "tiny_mc", None), (icl["dev"][:8], "tiny_mc_icl", icl["icl_prompt"])):
        got = ev.option_logprobs(model, tok, items, dataset, prefix, batch_size=3)
        for item, scores in zip(items, got):
            # char-level tokenizer: " A" is the space then the letter, so the letter is scored after prompt + " "
            ids = tok(ev.multiple_choice_prompt(item, dataset, prefix) + " ", return_tensors="pt").input_ids
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            want = {k: logprobs[tok.convert_tokens_to_ids(k)].item() for k in item["choices"]}
            assert scores.keys() == want.keys()
            assert all(abs(scores[k] - want[k]) < 1e-4 for k in want), (scores, want)
