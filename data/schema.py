"""Evaluation data: the file format, and the one validator every evaluator goes through.

`-d NAME` names data/eval/NAME.json:

    {"dataset": "mmlu",            # optional (the upstream mgsm files have none); defaults to NAME
     "icl_prompt": "...",          # optional: few-shot text placed before every multiple-choice prompt
     "dev":  [item, ...],          # the search optimises this split
     "test": [item, ...]}          # reported at the start and end of a search

Three item kinds; extra keys (id, domain, ...) are kept and ignored:

    multiple choice   {"question": str, "choices": {"A": str, "B": str, ...}, "answer": "B"}
                      keys are consecutive capital letters from A (two or more; mmlu_pro uses up to J,
                      truthfulqa's mc1 sets up to M), the answer is one of them
    exact match       {"question": str, "answer": str}     (no "choices")
    prompt only       {"prompt": str}                      (reward-model, judge and toxicity objectives)

Which kind each objective (eval type) needs is the `items` column of EVAL_TYPES below (lm_eval reads no file here);
multitask has none:
NAME is a domain of MULTITASK_DOMAINS, and each of its two datasets is multiple choice or exact match (whichever
its items are), scored as such by the evaluator.

Every problem raises DataError with one line naming the file, the split and the item index, before any
model is loaded.
"""

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data.prompts import abstain_prompts, multiple_choice_prompts, plain_prompts, question_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = "data/eval"


# domain -> (dataset one, dataset two); search.py's --only_one_or_two picks one of the pair
MULTITASK_DOMAINS = {
    "legal": ("hearsay", "citation_prediction_classification"),
    "medical": ("medqa", "medmcqa"),
    "science": ("scifact", "stem"),
    "culture": ("normad_country", "normad_value"),
    "tiny_domain": ("tiny_mc", "tiny_em"),
}

MC, EM, PROMPT = "multiple choice", "exact match", "prompt-only"


@dataclass(frozen=True)
class EvalType:
    """One row of EVAL_TYPES: everything about an objective, declared together so that validation, the generation
    budget, the prompt-length check, scoring and the ensembles cannot drift apart."""
    items: str | None          # item kind its dataset must hold (MC, EM, PROMPT); None: no data file of its own
    metric: str                # what the utility is, for -h
    help: str                  # one line for -h
    scorer: str                # its function in evaluate.py, by name (evaluate imports torch, -h must not):
                               # scorer(model, tokenizer, data) -> Scored, data one split (data/prompts.py);
                               # without items: scorer(model, tokenizer, dataset, split, only_one_or_two)
    prompts: Callable | None = None  # builder of the prompt texts it generates from (data/prompts.py), which
                                     # check_prompt_lengths measures; None: it builds none (multitask: its parts')
    chat: bool = False         # prompts are sent as one user turn through the tokenizer's chat template
    max_new_tokens: int | None = None  # tokens generated after each prompt (--max_new_tokens overrides);
                                       # None: sized from the gold answers (evaluate.exact_match_budget)
    generations: int = 1       # generations per item, each after the last (AbstainQA answers, then judges it)
    vote: bool = False         # items have gold answers: top-k ensembles (final_metrics.json) vote on predictions;
                               # otherwise they average per-item scores
    published_vote: bool = False  # the published whole-population ensemble votes (else averages scores)
    credentials: dict = field(default_factory=dict)  # environment variable -> what it holds and where to get it,
                                                     # checked before a search starts
    score_range: tuple | None = None  # (low, high) of a per-item score when the utility is their mean: what
                                      # --early_reject needs; None: not a bounded mean (it is refused)
    integer_scores: bool = False  # every per-item score is a whole number, so sums are exact in floats and equal
                                  # sums are equal utilities: --early_reject stops a proposal that can at best tie

    def __post_init__(self):
        if self.items == PROMPT and self.prompts is not None and self.max_new_tokens is None:
            raise ValueError(f"{self.help!r}: prompt-only items have no gold answers to size the generation from; "
                             f"give the row a max_new_tokens")


# The evaluation types: search.py's -e choices and help, data validation (ITEM_KIND), the prompt-length check, the
# generation budgets, evaluate.score()'s dispatch, the credentials check and the ensembles all read this table.
_REWARD_MODEL_ROW = dict(prompts=plain_prompts, chat=True, max_new_tokens=200, scorer="score_reward_model")
EVAL_TYPES = {
    "multiple_choice": EvalType(MC, "accuracy", "pick an option letter", "score_multiple_choice",
                                multiple_choice_prompts, max_new_tokens=10, vote=True, published_vote=True,
                                score_range=(0.0, 1.0), integer_scores=True),
    "exact_match": EvalType(EM, "accuracy", "generate the answer", "score_exact_match", question_prompts,
                            vote=True, score_range=(0.0, 1.0), integer_scores=True),
    "multitask": EvalType(None, "harmonic mean of the two accuracies",
                          "a domain of two datasets, -d DOMAIN, --only_one_or_two picks one", "score_multitask",
                          published_vote=True),
    "AbstainQA": EvalType(MC, "effective reliability", "multiple choice where the model may abstain",
                          "score_abstain", abstain_prompts, max_new_tokens=10, generations=2, vote=True,
                          published_vote=True, score_range=(-1.0, 1.0), integer_scores=True),
    "external_api": EvalType(PROMPT, "1 - toxicity", "continuations scored by the Perspective API",
                             "score_external_api", plain_prompts, max_new_tokens=20, score_range=(0.0, 1.0),
                             credentials={
                                 "PERSPECTIVE_API_KEY": "a Perspective API key "
                                                        "(https://developers.perspectiveapi.com/s/docs-get-started)"}),
    "rm_default": EvalType(PROMPT, "reward", "chat replies scored by the --reward_model", **_REWARD_MODEL_ROW),
    "rm_verbose": EvalType(PROMPT, "mean of sigmoid(reward) and length", "reward model, longer replies preferred",
                           score_range=(0.0, 1.0), **_REWARD_MODEL_ROW),
    "rm_concise": EvalType(PROMPT, "mean of sigmoid(reward) and brevity", "reward model, shorter replies preferred",
                           score_range=(0.0, 1.0), **_REWARD_MODEL_ROW),
    "human": EvalType(PROMPT, "judge rating 1..10", "chat replies rated by a Gemini judge on Vertex AI",
                      "score_human", plain_prompts, chat=True, max_new_tokens=512, score_range=(1.0, 10.0),
                      credentials={
                          "GOOGLE_CLOUD_PROJECT": "a Google Cloud project for the Gemini judge on Vertex AI "
                                                  "(GOOGLE_CLOUD_LOCATION optional, default us-central1)"}),
    # no data/eval file: lm-eval loads the tasks named by --lm_eval_tasks and builds their prompts (harness.py);
    # golds are given, and the top-k ensembles vote, only where the tasks' metric is per-item accuracy
    "lm_eval": EvalType(None, "mean of the tasks' primary metrics (lower-is-better ones negated)",
                        "lm-evaluation-harness tasks, --lm_eval_tasks T1,T2 (no -d)", "score_lm_eval", vote=True),
}
ITEM_KIND = {name: row.items for name, row in EVAL_TYPES.items() if row.items is not None}
KIND_KEYS = {MC: ("question", "choices", "answer"), EM: ("question", "answer"), PROMPT: ("prompt",)}
SPLITS = ("dev", "test")
CHOICE_LETTERS = string.ascii_uppercase


class DataError(ValueError):
    """A dataset that cannot be used: one line naming the file, split and item at fault."""


def load_eval_data(name, eval_type, data_dir=DEFAULT_DATA_DIR):
    """Read and validate data_dir/NAME.json for an eval type.

    Returns, for every eval type but multitask, the file's content with "dataset" filled in:
        {"dataset": str, "dev": [item, ...], "test": [item, ...], "icl_prompt": str (only when the file has it)}
    For multitask, NAME is a domain of MULTITASK_DOMAINS and the result is
        {"domain": NAME,
         "datasets": {dataset1: <as above>, dataset2: <as above>},      # in MULTITASK_DOMAINS order
         "eval_types": {dataset1: "multiple_choice" | "exact_match", dataset2: ...}}
    where each dataset's eval type is the one its items fit (multiple choice when they have "choices").

    A relative data_dir is taken from the working directory, or from the repository root when the working
    directory has no such folder (so the default works wherever the CLI is started from).
    Raises DataError (one line) on any problem.
    """
    if eval_type not in EVAL_TYPES:
        raise DataError(f"unknown eval type {eval_type!r}; valid: {', '.join(EVAL_TYPES)}")
    if eval_type == "lm_eval":
        raise DataError("-e lm_eval reads no data/eval file: name lm-eval tasks with --lm_eval_tasks")
    check_name(name)
    folder = resolve_data_dir(data_dir)
    if eval_type != "multitask":
        return validate(read_json(dataset_path(name, folder)), eval_type, dataset_path(name, folder), name)

    if name not in MULTITASK_DOMAINS:
        hint = ""
        if dataset_path(name, folder).exists():
            hint = f" ({name!r} is a single dataset: use -e multiple_choice or exact_match)"
        raise DataError(f"multitask needs a domain, not {name!r}{hint}; domains: "
                        + ", ".join(f"{d} = {a} + {b}" for d, (a, b) in MULTITASK_DOMAINS.items()))
    result = {"domain": name, "datasets": {}, "eval_types": {}}
    for part in MULTITASK_DOMAINS[name]:
        path = dataset_path(part, folder)
        if not path.exists():
            raise DataError(f"{path}: missing dataset {part!r} of multitask domain {name!r}; "
                            + available_hint(folder))
        raw = read_json(path)
        kind = multitask_eval_type(raw)
        result["datasets"][part] = validate(raw, kind, path, part)
        result["eval_types"][part] = kind
    return result


def multitask_eval_type(raw):
    """multiple_choice when the dataset's first item has choices, else exact_match (the rest must agree)."""
    for split in SPLITS:
        items = raw.get(split) if isinstance(raw, dict) else None
        if isinstance(items, list) and items and isinstance(items[0], dict):
            return "multiple_choice" if "choices" in items[0] else "exact_match"
    return "multiple_choice"  # nothing to go by: validate() reports what is missing


def check_name(name):
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"dataset name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or (os.sep in name) or name in (".", ".."):
        raise DataError(f"dataset name {name!r} must be a plain name (no path separators): -d NAME reads "
                        f"<data_dir>/NAME.json; use --data_dir for another folder")
    if name.endswith(".json"):
        raise DataError(f"dataset name {name!r} must be a plain name: use {name[:-5]!r}")


def resolve_data_dir(data_dir):
    folder = Path(data_dir)
    if not folder.is_absolute() and not folder.is_dir() and (REPO_ROOT / folder).is_dir():
        folder = REPO_ROOT / folder
    return folder


def dataset_path(name, folder):
    return Path(folder) / f"{name}.json"


def available_datasets(data_dir=DEFAULT_DATA_DIR):
    """Names of the datasets in data_dir (files NAME.json), sorted."""
    folder = resolve_data_dir(data_dir)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def available_hint(folder):
    names = available_datasets(folder)
    listing = f"available: {', '.join(names)}" if names else f"no datasets in {folder}"
    return (f"{listing} (generated sets: python data/build.py; benchmarks: python data/prepare_data.py NAME)")


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset file; " + available_hint(path.parent))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8 JSON") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def validate(raw, eval_type, source="<data>", name=None):
    """Check parsed JSON against an eval type (not multitask: validate each dataset of a domain); returns
    the data with "dataset" filled in. source names the file in messages."""
    if eval_type not in ITEM_KIND:
        valid = [t for t in EVAL_TYPES if t in ITEM_KIND]
        raise DataError(f"{source}: cannot validate a single dataset for eval type {eval_type!r}; "
                        f"valid: {', '.join(valid)}")
    if not isinstance(raw, dict):
        raise DataError(f"{source}: top level must be an object with \"dev\" and \"test\" lists, "
                        f"got {type(raw).__name__}")
    for split in SPLITS:
        if split not in raw:
            raise DataError(f"{source}: missing split {split!r} (the file needs \"dev\" and \"test\" lists)")
        if not isinstance(raw[split], list):
            raise DataError(f"{source}: split {split!r} must be a list of items, got {type(raw[split]).__name__}")
        if not raw[split]:
            raise DataError(f"{source}: split {split!r} is empty")
    for key in ("dataset", "icl_prompt"):
        if key in raw and not isinstance(raw[key], str):
            raise DataError(f"{source}: {key!r} must be a string, got {type(raw[key]).__name__}")
    kind = ITEM_KIND[eval_type]
    if "icl_prompt" in raw and text_problem(raw["icl_prompt"]):
        raise DataError(f"{source}: 'icl_prompt' {text_problem(raw['icl_prompt'])}")
    for split in SPLITS:
        for index, item in enumerate(raw[split]):
            problem = item_problem(item, kind, eval_type)
            if problem:
                raise DataError(f"{source}: {split} item {index}: {problem}")
    data = dict(raw)
    data["dataset"] = raw.get("dataset") or name or Path(str(source)).stem
    return data


def item_kind(item):
    """The kind an item looks like (MC, EM, PROMPT), or None."""
    if "choices" in item:
        return MC
    if "prompt" in item and "question" not in item:
        return PROMPT
    if "question" in item:
        return EM
    return None


def fitting_eval_types(kind):
    names = ", ".join(t for t, k in ITEM_KIND.items() if k == kind)
    return names + " (or multitask through a domain)" if kind in (MC, EM) else names


def item_problem(item, kind, eval_type):
    """What is wrong with one item for a kind, or None."""
    if not isinstance(item, dict):
        return f"must be an object, got {type(item).__name__}"
    looks = item_kind(item)
    if kind == MC and looks == EM:
        return ("missing key 'choices' (multiple choice items need question, choices, answer; question/answer "
                f"items without choices are exact match data, which fits {fitting_eval_types(EM)})")
    if looks is not None and looks != kind:
        return (f"{eval_type} needs {kind} items ({', '.join(KIND_KEYS[kind])}) but this is {_a(looks)} item; "
                f"{looks} data fits {fitting_eval_types(looks)}")
    for key in KIND_KEYS[kind]:
        if key not in item:
            return f"missing key {key!r} ({kind} items need {', '.join(KIND_KEYS[kind])})"
    text_key = "prompt" if kind == PROMPT else "question"
    if not isinstance(item[text_key], str) or not item[text_key].strip():
        return f"{text_key!r} must be a non-empty string"
    if kind == EM:
        if not isinstance(item["answer"], str) or not item["answer"].strip():
            return f"'answer' must be a non-empty string, got {item['answer']!r}"
    if kind == MC:
        problem = choices_problem(item["choices"], item["answer"])
        if problem:
            return problem
    for key, value in item.items():
        problem = text_problem(value)
        if problem:
            return f"{key!r} {problem}"
    return None


def text_problem(value):
    """What makes a string (or the strings in a list or object) untokenizable, or None. JSON's \\ud800 escapes
    decode to lone UTF-16 surrogates, which no tokenizer can encode: found here, before any model is loaded."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"holds a lone surrogate {ascii(value[e.start])} at character {e.start} (a broken \\u escape "
                    f"in the JSON): fix or drop the text")
        return None
    if isinstance(value, (list, tuple)):
        return next((p for p in map(text_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(text_problem, value.values()) if p), None)
    return None


def _a(kind):
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def choices_problem(choices, answer):
    if not isinstance(choices, dict):
        return f"'choices' must be an object {{letter: text}}, got {type(choices).__name__}"
    keys = list(choices)
    expected = list(CHOICE_LETTERS[:len(keys)])
    if len(keys) < 2 or keys != expected:
        return (f"'choices' keys must be consecutive letters from A (at least two), got "
                f"{', '.join(map(str, keys)) or 'none'}")
    for key, text in choices.items():
        if not isinstance(text, str):
            return f"choice {key} must be a string, got {type(text).__name__}"
    if answer not in choices:
        return f"answer {answer!r} is not among the choices {', '.join(keys)}"
    return None
