"""lm-evaluation-harness tasks as an objective: -e lm_eval --lm_eval_tasks T1,T2 [--lm_eval_include_path DIR]
[--lm_eval_dev_limit N].

Utility: the mean over the tasks of each task's primary metric, i.e. the first metric of its metric_list under its
first filter, exactly as lm-eval reports it (a group counts as its leaf tasks). A metric the task declares
lower-is-better enters negated, so higher is better throughout the search.

Splits (`plan_task`): dev is the task's validation split, test its test split. A task with only one of them has it
cut in two by a fixed seed (dev: one half, test: the other). --lm_eval_dev_limit N keeps N dev documents, drawn with
the same fixed seed. The seed is fixed rather than --seed so that searches with different seeds share their sets.

Scoring (`score`) runs lm-eval's own evaluator on an HFLM wrapped once around the worker's resident model
(generation.py's ModelHost swaps each candidate into it in place), with the seeds lm_eval.simple_evaluate sets: a
task's figure is what simple_evaluate reports for the same weights on the same documents. Tasks and their data are
loaded once per process.
Per-item results (the primary metric of each document) go back to the search for paired statistics, ensembles and
correctness_emergence.json; golds and predictions are given where the metric is per-item accuracy (acc of a
multiple-choice task, exact_match of a generate-until task), so that the top-k ensembles vote.
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path

SLICE_SEED = 1234  # the dev slice and the cut of one-split tasks
# what lm_eval.simple_evaluate seeds before it evaluates (its defaults), set before every evaluation
RANDOM_SEED, NUMPY_SEED, TORCH_SEED, FEWSHOT_SEED = 0, 1234, 1234, 1234
VOTING = {("multiple_choice", "acc"), ("generate_until", "exact_match")}  # per-item accuracy: ensembles vote


class HarnessError(ValueError):
    """A task that cannot be used: one line naming it and what is wrong."""


@dataclass(frozen=True)
class Plan:
    """How one leaf task is evaluated."""
    task: str
    splits: dict            # "dev"/"test" -> (split name, sorted document indices, or None for the whole split)
    metric: str             # lm-eval's result key of the primary metric, "<metric>,<filter>"
    higher_is_better: bool
    output_type: str
    note: str | None        # said in log.txt: a cut split, a limited dev set, a turned-around metric


# ----------------------------------------------------------------------------------------------------------------
# Loading tasks (driver and workers alike)

def task_names(text):
    names = [n.strip() for n in str(text or "").split(",") if n.strip()]
    if not names:
        raise HarnessError("-e lm_eval needs --lm_eval_tasks T1,T2 (lm-eval task or group names)")
    if len(set(names)) != len(names):
        raise HarnessError(f"--lm_eval_tasks {text!r} names a task twice")
    return names


def check_task_files(include_path):
    """Every task YAML of the user's folder parses (lm-eval's index skips one that does not, without a word)."""
    from lm_eval.tasks._yaml_loader import load_yaml
    folder = Path(include_path)
    if not folder.is_dir():
        raise HarnessError(f"--lm_eval_include_path {include_path}: no such folder")
    for path in sorted(folder.glob("**/*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # noqa: BLE001 - yaml, include and shape errors alike
            raise HarnessError(f"lm-eval task file {path} does not parse: {_first_line(e)}") from None


def task_manager(names, include_path):
    """The user's folder alone when it defines every name (0.1 s), else with lm-eval's own tasks (seconds)."""
    from lm_eval.tasks import TaskManager
    if include_path:
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in own.all_tasks for n in names):
            return own
    return TaskManager(include_path=str(include_path) if include_path else None)


def load_tasks(names, include_path):
    """{leaf task name: Task} of the named tasks and groups, each with its data loaded. HarnessError names the task
    whose name is unknown or whose data cannot be had."""
    import difflib
    import threading
    import datasets
    import tqdm
    datasets.disable_progress_bars()
    # datasets' file resolution takes tqdm's lock, by default a multiprocessing one: its semaphore outlives the
    # processes' os._exit and multiprocessing warns of a leak at the end of the search. A thread lock does here.
    tqdm.tqdm.set_lock(threading.RLock())
    manager = task_manager(names, include_path)
    tasks = {}
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
            raise HarnessError(f"unknown lm-eval task {name!r}: not in {where}"
                               + (f" (did you mean {', '.join(close)}?)" if close else ""))
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as e:  # noqa: BLE001 - datasets, network and config errors alike
            hint = " (a split or field its YAML names is not in its data)" if isinstance(e, KeyError) else ""
            raise HarnessError(f"lm-eval task {name!r} cannot be loaded: {type(e).__name__}: {_first_line(e)}"
                               f"{hint}") from None
        for leaf, task in loaded.items():
            if leaf in tasks:
                raise HarnessError(f"--lm_eval_tasks names lm-eval task {leaf!r} twice (directly or in a group)")
            if task.get_config("num_fewshot") is None:  # as simple_evaluate does
                task.set_config(key="num_fewshot", value=0)
            tasks[leaf] = task
    return tasks


def _split_size(task, name):
    """How many documents lm-eval evaluates when `name` is the task's test split (after its process_docs), or None
    when its data has no such split."""
    try:
        docs = task.dataset[name]
    except (KeyError, TypeError):
        return None
    process = task.config.process_docs
    return len(process(docs) if process is not None else docs)


def _seeded_subset(indices, count):
    import numpy as np
    picked = np.random.default_rng(SLICE_SEED).permutation(len(indices))[:count]
    return sorted(int(indices[i]) for i in picked)


def plan_task(name, task, dev_limit=None):
    """Plan of one task: which documents are dev and test, and its primary metric."""
    from lm_eval.api.task import ConfigurableTask
    if type(task) is not ConfigurableTask:  # run_tasks picks the split through a YAML task's config
        raise HarnessError(f"lm-eval task {name!r} is a Python class ({type(task).__name__}) that picks its own "
                           f"splits; -e lm_eval takes tasks defined by YAML alone")
    config = task.config
    declared = [s for s in (config.validation_split, config.test_split) if s is not None]
    sizes = {s: _split_size(task, s) for s in declared}
    usable = [s for s in declared if sizes[s]]
    if not usable:
        found = ", ".join(f"{s} ({'missing' if sizes[s] is None else 'empty'})" for s in declared) or "none declared"
        raise HarnessError(f"lm-eval task {name!r} has no usable validation or test split (validation_split/"
                           f"test_split: {found}); the search needs one to optimise and report on")
    notes = []
    if len(usable) == 2:
        dev_split, test_split = usable
        dev, test = None, None
        dev_pool = list(range(sizes[dev_split]))
    else:
        dev_split = test_split = usable[0]
        n = sizes[dev_split]
        if n < 2:
            raise HarnessError(f"lm-eval task {name!r}: its only split {dev_split!r} has {n} document; "
                               f"at least 2 are needed to carve dev and test from it")
        order = _seeded_subset(list(range(n)), n // 2)
        dev_pool, test = order, sorted(set(range(n)) - set(order))
        dev = order
        notes.append(f"only split {dev_split!r}: dev = {len(dev)} documents drawn with seed {SLICE_SEED}, "
                     f"test = the other {len(test)}")
    if dev_limit is not None and dev_limit < len(dev_pool):
        dev = _seeded_subset(dev_pool, dev_limit)
        notes.append(f"dev = {dev_limit} of the {len(dev_pool)} {dev_split} documents (--lm_eval_dev_limit, "
                     f"seed {SLICE_SEED})")
    metric = next(iter(task.aggregation()), None)
    if metric is None:
        raise HarnessError(f"lm-eval task {name!r} declares no metric")
    higher = bool(task.higher_is_better().get(metric, True))
    if not higher:
        notes.append(f"{metric} is lower-is-better: the utility counts it negated")
    filters = config.filter_list
    key = f"{metric},{filters[0]['name'] if filters else 'none'}"
    return Plan(name, {"dev": (dev_split, dev), "test": (test_split, test)}, key, higher,
                task.get_config("output_type"), f"lm-eval task {name}: " + "; ".join(notes) if notes else None)


_SUITES = {}


def load_suite(tasks_text, include_path=None, dev_limit=None):
    """(tasks, plans) of --lm_eval_tasks, loaded once per process."""
    key = (tasks_text, str(include_path) if include_path else None, dev_limit)
    if key not in _SUITES:
        names = task_names(tasks_text)
        if include_path:
            check_task_files(include_path)
        tasks = load_tasks(names, include_path)
        _SUITES[key] = tasks, [plan_task(name, task, dev_limit) for name, task in tasks.items()]
    return _SUITES[key]


def check(tasks_text, include_path=None, dev_limit=None):
    """What search.validate_args runs: loads every task and plans its splits. Returns the lines for log.txt."""
    _quiet()
    if dev_limit is not None and dev_limit < 1:
        raise HarnessError(f"--lm_eval_dev_limit {dev_limit} is out of range: it must be an integer >= 1")
    _, plans = load_suite(tasks_text, include_path, dev_limit)
    return [p.note for p in plans if p.note]


def _quiet():
    import logging
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on defaults and pre-loaded models


def _compile_templates_once():
    """lm-eval compiles a task's Jinja templates anew for every document it renders (lm_eval.utils.apply_template:
    env.from_string), a third of a tiny-model candidate's time; a compiled template is the same every time, so its
    environment keeps each one it compiled."""
    import functools
    from lm_eval import utils
    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=4096)(utils.env.from_string)


# ----------------------------------------------------------------------------------------------------------------
# Scoring a candidate

_LMS = {}


def resident_lm(model, tokenizer, batch_size):
    """One HFLM per resident model (its tokenizer identifies the host); it points at the model as it is now: the
    host swaps candidates into the same modules, and wraps them anew only when a LoRA slot is (re)built."""
    lm = _LMS.get(id(tokenizer))
    if lm is None:
        lm = _LMS[id(tokenizer)] = _resident_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._model = model
    lm.batch_size_per_gpu = batch_size
    return lm


def _resident_class():
    import generation
    from lm_eval.models.huggingface import HFLM

    class ResidentLM(HFLM):
        """HFLM without progress bars, whose model calls count as the evaluation's forward passes, and which
        tokenizes each text once per process (every candidate of a search asks for the same texts)."""
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
            cache = self.__dict__.setdefault("_encoded", {})
            if key not in cache:
                cache[key] = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            return list(cache[key])

        def loglikelihood(self, requests, disable_tqdm=True):
            with generation.forward_timer(self.device):
                return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=True):
            with generation.forward_timer(self.device):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=True):
            with generation.forward_timer(self.device):
                return super().generate_until(requests, disable_tqdm=True)
    return ResidentLM


def run_tasks(lm, tasks, plans, split):
    """lm-eval's evaluator on one split of every task, seeded as simple_evaluate seeds it: its result dict."""
    import numpy as np
    import torch
    from lm_eval import evaluator
    samples = {}
    for plan in plans:
        name, indices = plan.splits[split]
        tasks[plan.task].set_config(key="test_split", value=name)  # lm-eval evaluates a task's test_split
        tasks[plan.task].set_fewshot_seed(seed=FEWSHOT_SEED)
        if indices is not None:
            samples[plan.task] = indices
    random.seed(RANDOM_SEED)
    np.random.seed(NUMPY_SEED)
    torch.manual_seed(TORCH_SEED)
    return evaluator.evaluate(lm=lm, task_dict={"tasks": tasks, "groups": {}}, samples=samples or None,
                              bootstrap_iters=0, log_samples=True)


def score(model, tokenizer, tasks_text, split):
    """evaluate.Scored of the model in the host on one split of the tasks (what evaluate.score_lm_eval, the lm_eval
    row's scorer, returns)."""
    import generation
    from evaluate import EvalError, OPTIONS, Scored
    _quiet()
    try:
        tasks, plans = load_suite(tasks_text, OPTIONS["lm_eval_include_path"], OPTIONS["lm_eval_dev_limit"])
    except HarnessError as e:
        raise EvalError(str(e)) from None
    _compile_templates_once()
    device = generation._model_device(model)
    lm = resident_lm(model, tokenizer, generation._batch_size(None, device))
    result = run_tasks(lm, tasks, plans, split)
    parts, golds, preds, scores, outputs = {}, [], [], [], []
    for plan in plans:
        value = result["results"][plan.task].get(plan.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvalError(f"lm-eval task {plan.task}: its metric {plan.metric} came out as {value!r}")
        items = per_item(plan, tasks[plan.task], result["samples"][plan.task])
        parts[plan.task] = {"eval_type": "lm_eval", "metric": plan.metric, "value": float(value),
                            "higher_is_better": plan.higher_is_better, "items": len(items["scores"]),
                            "utility": float(value) if plan.higher_is_better else -float(value)}
        for name, values in (("golds", golds), ("preds", preds), ("scores", scores), ("outputs", outputs)):
            values += items[name]
    utility = sum(p["utility"] for p in parts.values()) / len(parts)
    # golds only where every task's metric is per-item accuracy (ensembles vote, records.ensembles); scores only
    # where each is a number (paired statistics, score-averaging ensembles)
    voting = all((p.output_type, p.metric.split(",")[0]) in VOTING for p in plans)
    numeric = all(isinstance(s, float) for s in scores)
    return Scored(utility, golds if voting else [None] * len(golds), preds, scores if numeric else [],
                  {"outputs": outputs, "parts": parts})


def per_item(plan, task, samples):
    """golds, preds, scores (the primary metric, negated when lower-is-better) and outputs of each document, in
    document order, from lm-eval's logged samples of the primary filter."""
    metric, filter_name = plan.metric.split(",", 1)
    rows = sorted((s for s in samples if s["filter"] == filter_name), key=lambda s: s["doc_id"])
    out = {"golds": [], "preds": [], "scores": [], "outputs": []}
    for s in rows:
        value = s.get(metric)
        number = isinstance(value, (int, float))
        out["scores"].append((float(value) if plan.higher_is_better else -float(value)) if number else value)
        response = s["filtered_resps"]
        if plan.output_type == "multiple_choice":
            lls = [r[0] if isinstance(r, (list, tuple)) else r for r in response]
            chosen = max(range(len(lls)), key=lambda i: lls[i])
            out["preds"].append(str(chosen))
            out["golds"].append(_gold_index(task, s))
            out["outputs"].append([float(v) for v in lls])
        else:
            text = response[0] if isinstance(response, (list, tuple)) and response else response
            out["preds"].append(str(text))
            out["golds"].append(str(s["target"]))
            out["outputs"].append(str(text))
    return out


def _gold_index(task, sample):
    target = sample["target"]
    if isinstance(target, int):
        return str(target)
    if isinstance(target, str):
        choices = task.doc_to_choice(sample["doc"])
        return str(choices.index(target)) if target in choices else target
    return str(target)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
