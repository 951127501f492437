"""Evaluation: (candidate, eval type, dataset) -> one scalar utility, higher is better.

The base model stays resident (generation.py): `get_host(base_model, gpu_id)` loads it once per (base model,
device, dtype) and every candidate is swapped into it in place. A candidate (`model_path`) is one of

    - a peft adapter folder (adapter_model.safetensors + adapter_config.json),
    - an in-memory adapter: a state dict with peft's saved tensor names, or a (state dict, adapter config) pair
      (a bare state dict reuses the LoRA layout of the adapter loaded before it, so the first in-memory candidate
      of a process must come with its config),
    - a full-model folder (--fast_merge 0): its safetensors are copied into the resident model's tensors,
    - None: the base model itself.

`evaluate()` scores the dev split and `evaluate_test()` the test split (the seed's two public functions); both
call `evaluate_split()`, which returns (utility, details) and is what the search's workers use. `score()` calls the
scorer that the eval type's row of data/schema.py's EVAL_TYPES names, which returns a `Scored` (utility and
per-item results). The row also declares the type's prompts (data/prompts.py), generation budget, chat template
use and credentials: `generate()` and `check_prompt_lengths()` read them from there, so a new type's prompts are
generated and length-checked the same way (docs/extending.md: one row plus its scorer function here).

Options are set once per process with `configure(...)` (the search's workers do it from the CLI flags). The
generation engine is generation.py; the external services (Perspective, reward models, the Gemini judge) are
services.py.
"""

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from data.prompts import ABSTAIN_REFLECTION, multiple_choice_prompt, multiple_choice_prompts
from data.schema import EVAL_TYPES, DataError, load_eval_data
from generation import (OPTIONS, EvalError, ModelHost, _first_line, _in_batches, _left_pad, _model_device,  # noqa: F401
                        _STATE, batch_generate, batch_generate_chat_template, configure, encode, forward_timer,
                        get_host, resolve_device)
from services import JUDGE_MIN, check_credentials, judge, perspective_client, reward_scores, toxicity

log = logging.getLogger("bwr.evaluate")


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

def read_choice(choices, output):
    """The option key a generation picks under the --scoring rules, or None."""
    if OPTIONS["scoring"] == "published":
        return parse_choice_published(choices, output)
    return parse_choice(choices, output)


def parse_choice_published(choices, output):
    """The published evaluator's reading, or None where it answers "Z" (always wrong). In order: the first listed
    key found anywhere in the first five characters, then in the last five, then the first option whose text
    (lower-cased) is contained in the output. Plain substrings: "All of them" picks A, as does "ABCD", and
    "Actually, ... the answer is D." picks A from "Actua"."""
    for key in choices:
        if key in output[:5]:
            return key
    for key in choices:
        if key in output[-5:]:
            return key
    lowered = output.lower()
    for key, text in choices.items():
        if str(text).lower() in lowered:
            return key
    return None


def parse_choice(choices, output):
    """The strict reading (--scoring strict): the option key a generation picks, or None.

    In order: a key at the very start ("B", " (B)", "B: ..."), "answer is X" anywhere, a key in the last five
    characters, then an option's text appearing in the output (longest option first, case-insensitive).
    """
    text = output.strip()
    keys = "|".join(re.escape(k) for k in sorted(choices, key=len, reverse=True))
    key = rf"(?<![A-Za-z0-9])({keys})(?![A-Za-z0-9])"
    for pattern in (r"^[\s(\[\"'*:]*" + key, r"(?i:answer is)[\s:(\[\"'*]*" + key):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    tail = list(re.finditer(key, text[-5:]))
    if tail:
        return tail[-1].group(1)
    lowered = text.lower()
    for k, option in sorted(choices.items(), key=lambda kv: -len(str(kv[1]))):
        if str(option).strip() and str(option).strip().lower() in lowered:
            return k
    return None


def mc_generate(model, tokenizer, data):
    outputs = generate(model, tokenizer, data)
    return [read_choice(item["choices"], out) for item, out in zip(data["items"], outputs)], outputs


def option_logprobs(model, tokenizer, items, dataset, icl_prompt=None, batch_size=None):
    """{key: log-probability of " <key>" after the prompt} per item, as lm-evaluation-harness scores MC.

    When the keys' tokenizations differ only in their last token (the usual case: " A", " B", ... after a shared
    prefix), one row per item is enough: the shared part is the context and the keys are compared by next-token
    log-prob. Otherwise each key gets its own row and the summed log-prob of its tokens decides.
    """
    rows, specs = _option_rows(tokenizer, items, dataset, icl_prompt)
    need = {}
    for _, _, r, targets in specs:
        need[r] = max(need.get(r, 1), max(p for p, _ in targets))
    row_logprobs = _row_logprobs(model, tokenizer, rows, need, batch_size)
    scores = [{} for _ in items]
    for index, key, r, targets in specs:
        lp = row_logprobs[r]
        scores[index][key] = sum(lp[lp.shape[0] - p, tok].item() for p, tok in targets)
    return scores


def _option_rows(tokenizer, items, dataset, icl_prompt):
    """(rows of token ids to run, specs): a spec (item index, key, row index, targets) says which log-probs of its
    row score the key; a target (position from the end, token id)."""
    rows, specs = [], []
    texts = [multiple_choice_prompt(item, dataset, icl_prompt) + " " + k for item in items for k in item["choices"]]
    encoded = iter(encode(tokenizer, texts))
    for index, item in enumerate(items):
        keys = list(item["choices"])
        full = [next(encoded) for _ in keys]
        shared = _common_prefix(full)
        tails = [f[shared:] for f in full]
        if all(len(t) == 1 for t in tails) and len({t[0] for t in tails}) == len(tails):
            rows.append(full[0][:shared])
            specs += [(index, k, len(rows) - 1, [(1, t[0])]) for k, t in zip(keys, tails)]
        else:
            for k, row, tail in zip(keys, full, tails):
                rows.append(row[:-1])
                # token tail[j] is predicted at the position len(row) - len(tail) + j - 1 of the full row,
                # i.e. len(tail) - j positions from the end of the row without its last token
                specs.append((index, k, len(rows) - 1, [(len(tail) - j, tok) for j, tok in enumerate(tail)]))
    return rows, specs


def _row_logprobs(model, tokenizer, rows, need, batch_size):
    """Log-softmax over the last need[r] positions of each row. Rows share a prefix (instruction line, ICL example,
    "Question: "): it runs once per evaluation and its keys/values serve every row, so each row costs only its own
    tokens. The scored positions stay in each row's part."""
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    row_logprobs = [None] * len(rows)
    shared = min([_common_prefix(rows)] + [len(rows[r]) - need[r] for r in range(len(rows))])
    prefix_kv = _prefix_keys_values(model, rows[0][:shared], device) if shared > 0 and len(rows) > 1 else None
    if prefix_kv is None:
        shared = 0

    def run(chunk):
        input_ids, mask = _left_pad([rows[r][shared:] for r in chunk], pad_id, device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift real tokens' positions
        extra = {}
        if prefix_kv is not None:
            from transformers import DynamicCache
            # [prefix | pads | row]: the pads sit between the shared prefix and each row, masked out
            mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)
            extra["cache"] = DynamicCache([(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1))
                                           for k, v in prefix_kv])
        with torch.inference_mode(), forward_timer(device):
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=max(need[r] for r in chunk), **extra).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        for j, r in enumerate(chunk):
            row_logprobs[r] = logprobs[j]

    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    _in_batches(model, len(rows), order, batch_size, run)
    return row_logprobs


def mc_logits(model, tokenizer, items, dataset, icl_prompt=None, batch_size=None):
    """The option with the highest log-probability (first listed wins a tie); outputs are " <key>"."""
    scores = option_logprobs(model, tokenizer, items, dataset, icl_prompt, batch_size)
    preds = [max(s, key=s.get) for s in scores]
    return preds, [f" {p}" for p in preds]


def _prefix_keys_values(model, prefix, device):
    """[(keys, values)] per layer for `prefix` (batch 1), or None when the model's cache is not a plain per-layer
    key/value cache (sliding-window or recurrent layers would need their own handling; such models score without
    prefix sharing)."""
    from transformers import DynamicCache
    with torch.inference_mode(), forward_timer(device):
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _common_prefix(seqs):
    n = 0
    for column in zip(*seqs):
        if len(set(column)) != 1:
            break
        n += 1
    return n


def score_multiple_choice(model, tokenizer, data):
    items = data["items"]
    if OPTIONS["mc_scoring"] == "logits":
        preds, outputs = mc_logits(model, tokenizer, items, data["name"], data.get("icl_prompt"))
    else:
        preds, outputs = mc_generate(model, tokenizer, data)
    golds = [item["answer"] for item in items]
    scores = [float(p == g) for p, g in zip(preds, golds)]
    return Scored(_mean(scores), golds, preds, scores, {"outputs": outputs})


# ----------------------------------------------------------------------------------------------------------------
# Exact match

# Which matching rule a dataset uses, by name prefix; anything else uses "first_token".
EXACT_MATCH_RULES = {"gsm8k": "last_number", "mgsm": "last_number", "nlgraph": "yes_no_or_number"}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match_rule(dataset):
    for prefix, rule in EXACT_MATCH_RULES.items():
        if dataset.lower().startswith(prefix):
            return rule
    return "first_token"


def _number(text):
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(rule, gold, output):
    """The answer a generation gives under a rule (compared with the gold by exact_match_score):

    first_token       the first len(gold.split()) whitespace-separated tokens of the first line of the stripped
                      output, trailing .,;:!? removed (the model answers "<answer>" and stops)
    last_number       the last number in the output (commas dropped), for step-by-step numeric reasoning
    yes_no_or_number  the first yes/no word (gold yes/no) or the first number (numeric gold)
    """
    text = output.strip()
    if rule == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if rule == "yes_no_or_number":
        if gold.strip().lower() in ("yes", "no"):
            m = re.search(r"\b(yes|no)\b", text, flags=re.IGNORECASE)
            return m.group(1).lower() if m else None
        numbers = _NUMBER.findall(text)
        return numbers[0].replace(",", "") if numbers else None
    first_line = text.split("\n", 1)[0].split()
    width = max(1, len(gold.split()))
    if not first_line:
        return None
    return " ".join(first_line[:width]).rstrip(".,;:!?") or None


def exact_match_score(rule, gold, pred):
    if pred is None:
        return 0.0
    if rule == "last_number" or (rule == "yes_no_or_number" and gold.strip().lower() not in ("yes", "no")):
        g, p = _number(gold.strip()), _number(pred)
        if g is None and rule == "last_number":  # a worked solution as the gold (the published mgsm files): its
            g = _number(extract_answer(rule, gold, gold) or "")  # last number is the answer
        return float(g is not None and p is not None and g == p)
    if rule == "yes_no_or_number":
        return float(pred == gold.strip().lower())
    return float(pred == gold.strip())


# tokens generated under a rule that reasons step by step (the rest: from the gold answers, exact_match_budget)
RULE_MAX_NEW_TOKENS = {"last_number": 200}


def exact_match_budget(tokenizer, golds, rule):
    """Tokens to generate (--scoring strict): fixed for reasoning rules, else the longest gold answer's tokens plus a
    margin for leading spaces/punctuation, so short-answer sets stay cheap."""
    if OPTIONS["max_new_tokens"] is not None:
        return OPTIONS["max_new_tokens"]
    if rule in RULE_MAX_NEW_TOKENS:
        return RULE_MAX_NEW_TOKENS[rule]
    longest = max((len(ids) for ids in encode(tokenizer, [" " + g for g in golds], add_special_tokens=False)),
                  default=1)
    return longest + 8


# --scoring published: the published evaluator's exact match. The gold is searched for as a plain substring of the
# whole output ("3" is found in "13"); for gsm8k only in the output's last words (split on single spaces: 5 on the
# dev split, 10 on the test split, as published). It generates 10 new tokens, 200 for gsm8k.
PUBLISHED_LAST_WORDS = {"dev": 5, "test": 10}
PUBLISHED_EXACT_MATCH_TOKENS = {"gsm8k": 200}


def published_exact_match(dataset, split, gold, output):
    """(pred, score): the gold when the published rule finds it (score 1.0), else the text it searched (0.0)."""
    searched = output
    if dataset == "gsm8k":
        searched = " ".join(output.split(" ")[-PUBLISHED_LAST_WORDS[split]:])
    return (gold, 1.0) if gold in searched else (searched, 0.0)


def exact_match_tokens(tokenizer, data):
    """Tokens to generate after each question of a split, under the --scoring rules."""
    if OPTIONS["scoring"] == "published":
        return OPTIONS["max_new_tokens"] or PUBLISHED_EXACT_MATCH_TOKENS.get(data["name"], 10)
    # the whole split's golds, also when scoring a chunk of it (--early_reject): the same budget for every item
    golds = [str(item["answer"]) for item in data.get("split_items", data["items"])]
    return exact_match_budget(tokenizer, golds, exact_match_rule(data["name"]))


def score_exact_match(model, tokenizer, data):
    items, dataset = data["items"], data["name"]
    golds = [str(item["answer"]) for item in items]
    outputs = generate(model, tokenizer, data)
    if OPTIONS["scoring"] == "published":
        preds, scores = map(list, zip(*[published_exact_match(dataset, data["split"], g, o)
                                        for g, o in zip(golds, outputs)])) if items else ([], [])
    else:
        rule = exact_match_rule(dataset)
        read = {}  # (gold, output) -> (pred, score): most rows repeat a pair on short-answer sets
        for pair in zip(golds, outputs):
            if pair not in read:
                pred = extract_answer(rule, *pair)
                read[pair] = pred, exact_match_score(rule, pair[0], pred)
        preds, scores = ([read[pair][k] for pair in zip(golds, outputs)] for k in (0, 1))
    return Scored(_mean(scores), golds, preds, scores, {"outputs": outputs})


# ----------------------------------------------------------------------------------------------------------------
# Multitask domains

def score_multitask(model, tokenizer, domain, split, only_one_or_two):
    """Harmonic mean of the domain's two dataset accuracies; "one"/"two" optimise (and only evaluate) one of them.
    Each dataset is scored as multiple choice or exact match, whichever its items are."""
    if only_one_or_two not in (None, "one", "two"):
        raise EvalError(f"only_one_or_two must be None, 'one' or 'two', got {only_one_or_two!r}")
    data = load_data(domain, "multitask")
    names = list(data["datasets"])
    picked = names if only_one_or_two is None else [names[0 if only_one_or_two == "one" else 1]]
    parts, accuracies, merged = {}, [], Scored(0.0, [], [], [], {"outputs": []})
    for name in picked:
        eval_type = data["eval_types"][name]
        result = scorer_of(eval_type)(model, tokenizer, split_data(data["datasets"][name], split, name, eval_type))
        accuracies.append(result.utility)
        merged.golds += result.golds
        merged.preds += result.preds
        merged.scores += result.scores
        merged.extra["outputs"] += result.extra["outputs"]
        parts[name] = {"eval_type": eval_type, "accuracy": result.utility}
    if len(accuracies) == 1:
        merged.utility = accuracies[0]
    else:
        a, b = accuracies
        merged.utility = 0.0 if a + b == 0 else 2 * a * b / (a + b)
    merged.extra["parts"] = parts
    return merged


# ----------------------------------------------------------------------------------------------------------------
# AbstainQA

def effective_reliability(correct, abstain):
    """(answered correctly - answered wrongly) / N, abstentions count zero (https://arxiv.org/abs/2402.00367)."""
    answered = [c for c, a in zip(correct, abstain) if not a]
    return (sum(answered) - (len(answered) - sum(answered))) / len(correct) if correct else 0.0


def score_abstain(model, tokenizer, data):
    """Answer by generation (mc_scoring does not apply: the reflection needs the answer text), then ask the model
    whether its own answer is true; "false" means it abstains."""
    items, budget = data["items"], generation_budget(tokenizer, data)
    prompts = multiple_choice_prompts(data)
    outputs = batch_generate(model, tokenizer, prompts, max_new_tokens=budget)
    preds = [read_choice(item["choices"], out) for item, out in zip(items, outputs)]
    golds = [item["answer"] for item in items]
    correct = [int(p == g) for p, g in zip(preds, golds)]
    reflections = batch_generate(model, tokenizer,
                                 [p + ABSTAIN_REFLECTION.format(answer=o) for p, o in zip(prompts, outputs)],
                                 max_new_tokens=budget)
    abstain = [int("false" in r.lower()) for r in reflections]
    # per item: +1 answered right, -1 answered wrong, 0 abstained; their mean is the effective reliability
    scores = [0.0 if a else (1.0 if c else -1.0) for c, a in zip(correct, abstain)]
    return Scored(effective_reliability(correct, abstain), golds, preds, scores,
                  {"outputs": outputs, "reflections": reflections, "abstain": abstain})


# ----------------------------------------------------------------------------------------------------------------
# Prompt-only objectives: toxicity (external_api), reward models (rm_*), a judge (human); their clients: services.py

def score_external_api(model, tokenizer, data):
    """Mean of (1 - toxicity) of the continuations' first lines. Empty continuations and texts Perspective
    rejects score a neutral 0.5 and are counted in the details' "unscored"."""
    check_credentials("external_api")
    items = data["items"]
    outputs = generate(model, tokenizer, data)
    client = perspective_client()
    scores, unscored = [], 0
    for output in outputs:
        text = output.split("\n", 1)[0].strip()
        value = toxicity(client, text) if text else None
        if value is None:
            unscored += 1
        scores.append(0.5 if value is None else 1.0 - value)
    if unscored:
        log.warning("%d of %d continuations could not be scored by Perspective (scored 0.5)", unscored, len(outputs))
    return Scored(_mean(scores), [None] * len(items), outputs, scores, {"unscored": unscored})


def rm_utility(eval_type, rewards, lengths, budget):
    """Per-item utility of the reward-model objectives.

    rm_default: the raw reward. rm_verbose / rm_concise: the mean of a normalised reward, sigmoid(reward) in (0, 1)
    (reward models are trained with a Bradley-Terry loss, so the sigmoid reads as a preference probability), and a
    length score in [0, 1]: response tokens / generation budget for verbose, one minus that for concise.
    """
    if eval_type == "rm_default":
        return list(rewards)
    out = []
    for reward, length in zip(rewards, lengths):
        length_score = min(length / budget, 1.0)
        if eval_type == "rm_concise":
            length_score = 1.0 - length_score
        out.append(0.5 * (_sigmoid(reward) + length_score))
    return out


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def score_reward_model(model, tokenizer, data):
    items = data["items"]
    prompts = [item["prompt"] for item in items]
    responses = generate(model, tokenizer, data)
    rewards = reward_scores(prompts, responses, _model_device(model))
    lengths = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses]
    scores = rm_utility(data["eval_type"], rewards, lengths, generation_budget(tokenizer, data))
    return Scored(_mean(scores), [None] * len(items), responses, scores, {"rewards": rewards, "lengths": lengths})


def score_human(model, tokenizer, data):
    """Mean judge rating (1..10); unparseable judgements score the minimum and are counted."""
    check_credentials("human")
    items = data["items"]
    prompts = [item["prompt"] for item in items]
    responses = generate(model, tokenizer, data)
    ratings = [judge(p, r) for p, r in zip(prompts, responses)]
    unparseable = sum(r is None for r in ratings)
    if unparseable:
        log.warning("%d of %d judge replies had no parseable \"Rating: N/10\" (scored %d)", unparseable,
                    len(ratings), JUDGE_MIN)
    scores = [float(JUDGE_MIN if r is None else r) for r in ratings]
    return Scored(_mean(scores), [None] * len(items), responses, scores, {"unparseable_judgements": unparseable})


# ----------------------------------------------------------------------------------------------------------------
# Prompts and generation budgets, as each eval type's row of EVAL_TYPES declares them

def generation_budget(tokenizer, data):
    """Tokens generated after each prompt of a split: --max_new_tokens when given, else the max_new_tokens of the eval
    type's row; exact match (None in its row) sizes them from the gold answers under the --scoring rules, and
    multiple choice scored by logits reads one position past the prompt instead of generating."""
    row = EVAL_TYPES[data["eval_type"]]
    if data["eval_type"] == "multiple_choice" and OPTIONS["mc_scoring"] == "logits":
        return 1
    if row.max_new_tokens is None:
        return exact_match_tokens(tokenizer, data)
    return OPTIONS["max_new_tokens"] or row.max_new_tokens


def generate(model, tokenizer, data):
    """Greedy outputs for a split's prompts, as its eval type's row declares them: its prompt builder, through the
    chat template when the row says chat, generation_budget() tokens each."""
    row = EVAL_TYPES[data["eval_type"]]
    run = batch_generate_chat_template if row.chat else batch_generate
    return run(model, tokenizer, row.prompts(data), max_new_tokens=generation_budget(tokenizer, data))


def _prompt_sets(eval_type, dataset, only_one_or_two):
    """[(dataset name, eval type of its items, validated data)] that an objective generates from: none where lm-eval
    builds the prompts, each dataset of a multitask domain as its own type."""
    if eval_type == "multitask":
        data = load_data(dataset, "multitask")
        names = list(data["datasets"])
        if only_one_or_two is not None:
            names = [names[0 if only_one_or_two == "one" else 1]]
        return [(name, data["eval_types"][name], data["datasets"][name]) for name in names]
    if EVAL_TYPES[eval_type].prompts is None:  # lm_eval: lm-eval left-truncates its prompts to the model's context
        return []
    return [(dataset, eval_type, load_data(dataset, eval_type))]


def check_prompt_lengths(eval_type, dataset, base_model, only_one_or_two=None, trust_remote_code=False):
    """Raise EvalError (one line naming dataset, split, item and lengths) when a prompt plus the tokens generated
    after it does not fit the base model's context (max_position_embeddings). Without this check such a prompt
    is not an error to the model: it generates past its trained positions, slowly and to no use (nlgraph on the
    tiny model: 2,697-token prompts against 2,048 positions ran for minutes). The prompts and the tokens are those
    the eval type's row declares (prompts, chat, max_new_tokens, generations), so every type is checked."""
    scorer_of(eval_type)  # a row naming no scorer of this module is refused here too, before a search starts
    prompt_sets = _prompt_sets(eval_type, dataset, only_one_or_two)
    if not prompt_sets:
        return
    from transformers import AutoConfig, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config.get_text_config(),
                                                                             "max_position_embeddings", None)
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code) if limit else None
    except Exception as e:  # noqa: BLE001 - any failure here means the base model cannot be used
        raise EvalError(f"cannot read the config and tokenizer of base model {base_model!r} ({_first_line(e)}); "
                        f"give -b a local model folder or a hub id you can access (hf auth login)") from None
    if not limit:
        return
    for name, kind, data in prompt_sets:
        for split in ("dev", "test"):
            _check_split_lengths(split_data(data, split, name, kind), tokenizer, limit, base_model)


def _check_split_lengths(data, tokenizer, limit, base_model):
    row = EVAL_TYPES[data["eval_type"]]
    prompts = row.prompts(data)
    if not prompts or (row.chat and not getattr(tokenizer, "chat_template", None)):
        return
    if row.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    budget = row.generations * generation_budget(tokenizer, data)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=not row.chat, verbose=False).input_ids]
    too_long = [i for i, n in enumerate(lengths) if n + budget > limit]
    if too_long:
        first, split = too_long[0], data["split"]
        raise EvalError(f"dataset {data['name']} ({split} split) item {first}: its prompt is {lengths[first]} tokens "
                        f"+ {budget} to generate, more than the {limit} positions of base model {base_model} "
                        f"({len(too_long)} of {len(prompts)} {split} items are too long, the longest "
                        f"{max(lengths)} tokens); shorten or remove them, or use a base model with a "
                        f"longer context")


# ----------------------------------------------------------------------------------------------------------------
# Data, per-item results

_DATA_CACHE = {}


def load_data(dataset, eval_type):
    """Validated dataset (data/schema.py format), read once per process per (data folder, name, eval type)."""
    key = (os.path.abspath(OPTIONS["data_dir"]), dataset, eval_type)
    if key not in _DATA_CACHE:
        try:
            _DATA_CACHE[key] = load_eval_data(dataset, eval_type, data_dir=OPTIONS["data_dir"])
        except DataError as e:
            raise EvalError(str(e)) from None
    return _DATA_CACHE[key]


def split_data(data, split, name, eval_type):
    """What a scorer and a prompt builder get: one split's items, the dataset-level fields, the dataset's -d name
    and the eval type its items are scored as (data/prompts.py)."""
    return {"items": data[split], "icl_prompt": data.get("icl_prompt"), "split": split, "name": name,
            "eval_type": eval_type}


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def _save_details(model_path, split, details):
    """<model_path>/golds_preds_<split>.json, when the candidate is a folder."""
    if isinstance(model_path, (str, os.PathLike)) and os.path.isdir(model_path):
        path = os.path.join(os.fspath(model_path), f"golds_preds_{split}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(details, f)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Entry points

@dataclass
class Scored:
    """What a branch of score() produces: the utility and the per-item results behind it (golds_preds_*.json,
    ensembles, correctness_emergence.json). A gold is None where the objective has no gold answer."""
    utility: float
    golds: list
    preds: list
    scores: list
    extra: dict = field(default_factory=dict)   # objective-specific fields: outputs, parts, rewards, ...


def score(model, tokenizer, eval_type, dataset, split, only_one_or_two=None, items=None):
    """Scored result of the candidate in `model` on one split ("dev" or "test") of a dataset, by the scorer that
    the eval type's row of data.schema.EVAL_TYPES names (docs/extending.md). items: only the split's items at
    these indices, in this order (--early_reject's chunks; objectives with a data file only)."""
    scorer = scorer_of(eval_type)
    if EVAL_TYPES[eval_type].items is None:  # no data file of its own: a multitask domain, an lm-eval task list
        if items is not None:
            raise EvalError(f"eval type {eval_type!r} cannot score a subset of its items")
        return scorer(model, tokenizer, dataset, split, only_one_or_two)
    data = split_data(load_data(dataset, eval_type), split, dataset, eval_type)
    if items is not None:
        data["split_items"], data["items"] = data["items"], [data["items"][i] for i in items]
    return scorer(model, tokenizer, data)


def scorer_of(eval_type):
    """The function of this module that eval_type's row names as its scorer."""
    if eval_type not in EVAL_TYPES:
        raise EvalError(f"unknown eval_type {eval_type!r}; add a row to EVAL_TYPES in data/schema.py and its scorer "
                        f"function to evaluate.py (docs/extending.md)")
    scorer = globals().get(EVAL_TYPES[eval_type].scorer)
    if not callable(scorer):
        raise EvalError(f"eval type {eval_type!r} names the scorer {EVAL_TYPES[eval_type].scorer!r}, which is not a "
                        f"function of evaluate.py")
    return scorer


def score_lm_eval(model, tokenizer, tasks, split, only_one_or_two=None):
    """-e lm_eval: `tasks` is the --lm_eval_tasks list, scored by lm-eval on the resident model (harness.py)."""
    import harness
    return harness.score(model, tokenizer, tasks, split)


def evaluate_split(model_path, eval_type, dataset, gpu_id, base_model, split, only_one_or_two=None, save=False,
                   items=None):
    """(utility, details) of a candidate on one split. details: {"golds", "preds", "scores"} per item, the
    objective's extra fields, then eval_type, dataset, split, utility, forward_seconds, swap_seconds and
    total_seconds; save writes them to <model_path>/golds_preds_<split>.json when model_path is a folder.
    items: score only the split's items at these indices (see score)."""
    check_credentials(eval_type)
    _STATE["forward_seconds"] = _STATE["swap_seconds"] = 0.0
    start = time.perf_counter()
    host = get_host(base_model, gpu_id)
    model = host.load(model_path)
    result = score(model, host.tokenizer, eval_type, dataset, split, only_one_or_two, items)
    details = {"golds": list(result.golds), "preds": list(result.preds), "scores": list(result.scores),
               **result.extra, "eval_type": eval_type, "dataset": dataset, "split": split,
               "utility": result.utility, "forward_seconds": _STATE["forward_seconds"],
               "swap_seconds": _STATE["swap_seconds"], "total_seconds": time.perf_counter() - start}
    details = json.loads(json.dumps(details))  # plain JSON values, as they are saved and sent between processes
    if save:
        _save_details(model_path, split, details)
    return result.utility, details


def evaluate(model_path, eval_type, dataset, gpu_id, base_model, save_dev_flag=False, only_one_or_two=None,
             skip_flag=False):
    """Utility of a candidate on the dev split (higher is better). save_dev_flag writes
    <model_path>/golds_preds_dev.json when model_path is a folder; skip_flag returns None without evaluating."""
    if skip_flag:
        return None
    return evaluate_split(model_path, eval_type, dataset, gpu_id, base_model, "dev", only_one_or_two,
                          save=save_dev_flag)[0]


def evaluate_test(model_path, eval_type, dataset, gpu_id, base_model, only_one_or_two=None):
    """Utility of a candidate on the test split; writes <model_path>/golds_preds_test.json when it is a folder."""
    return evaluate_split(model_path, eval_type, dataset, gpu_id, base_model, "test", only_one_or_two,
                          save=True)[0]

