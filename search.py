"""BWR_model search: evolve a population of LoRA experts with the Best-Worst-Random algorithm (or, to compare with
it, Model Swarms' PSO, CMA-ES or random search: --optimizer, optimizers.py).

    python search.py -n demo -e exact_match -d tiny_demo -g cpu \
        -i initial_experts/tiny/experts -b initial_experts/tiny/base_model

The driver (this file) validates everything up front, keeps the search state, and farms merges and evaluations out
to one persistent worker per device (workers.py). Everything needed to continue is persisted after each iteration,
so `python search.py --resume search/<dir>` carries on after a crash or Ctrl-C, bit for bit.

Search directory layout (search/<name>_<hostname>[_<time>]/):
    args.json                  the arguments (no secrets)
    log.txt                    timestamped progress, per-iteration profile, final metrics
    utility_scratchpad.json    best, worst, history, candidate_i, candidate_i_history (the published keys), worst_history
    state.json                 everything needed to resume (iteration, step length, rng state, counters)
    candidate_i/               current weights of population member i
    global_best/ global_worst/ best and worst weights ever evaluated (global_worst/ with --clean_up_on_end 0)
    best/ worst/ args.txt      the published names: links to global_best/ and global_worst/, str() of the arguments
    candidate_i/golds.json ... the published per-candidate results (golds, preds or scores; _dev twins) at the end
    final_metrics.json         the overall metrics at the end (ours and the published names)
    correctness_emergence.json per-item dev correctness of every candidate per iteration (--correctness_emergence 1)
    utility_curve.png          best, worst and every candidate over iterations
    .lock, .lock_holder.json   the running search's exclusive lock on the directory, and who holds it
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

try:
    import bwr
    import merge
    import optimizers
    from data.schema import EVAL_TYPES
    from fileio import (DirectoryBusy, DirectoryLock, apply_moves, atomic_write_text, link_tree, read_json,
                        read_json_object, sync_filesystem, write_json)
    from records import (compact_details, correctness_emergence, final_metrics, log_final_metrics,
                         published_args_text, scratchpad, write_records)
    from workers import (CandidateTask, EarlyReject, EvaluateTask, LocalPool, Source, WorkerError, crash_point,
                         describe_task)
except ModuleNotFoundError as missing:  # started by an interpreter without the requirements (not .venv's)
    if __name__ != "__main__":
        raise
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "bin", "python")
    print(f"search.py: error: {sys.executable} has no {missing.name!r} module; "
          + (f"run {os.path.relpath(venv)} search.py ..." if os.path.exists(venv)
             else "run `make demo` (it builds .venv), then .venv/bin/python search.py ...")
          + " (or pip install -r requirements.txt in your environment)", file=sys.stderr)
    sys.exit(2)

REPO = os.path.dirname(os.path.abspath(__file__))
STATE_VERSION = 1
# flags that may differ when resuming: they change where and how fast work runs, never what is computed
RESUMABLE_OVERRIDES = {"gpus", "batch_size", "wandb_mode", "project_name_wb", "num_cpu_workers", "backend",
                       "ray_address", "num_cpu_when_merging", "lock_wait"}


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python search.py -h)")


def add_search_flags(p):
    """The search: its name, objective and experts, when it stops, the step length, restarts, what it records."""
    a = p.add_argument
    a("-n", "--name", help="search name; outputs go to search/<name>_<hostname>[_<time>]/")
    a("-e", "--eval_type", help="objective, one of: " + "; ".join(
        f"{name} ({row.help}; utility: {row.metric}" + (f"; needs {', '.join(row.credentials)}" if row.credentials
                                                         else "") + ")" for name, row in EVAL_TYPES.items()))
    a("-d", "--dataset", help="dataset name in data/eval/ (a domain name for multitask; none for lm_eval)")
    a("-g", "--gpus", default="0", help="comma-separated GPU ids, one worker each (e.g. 0,1,2), or 'cpu'")
    a("-i", "--initial_expert_directory", default="initial_experts",
      help="folder whose sub-folders are the initial experts (LoRA adapters or full models)")
    a("-b", "--base_model", default="google/gemma-7b-it", help="base model (hub id or local folder) of the experts")
    a("-p", "--patience", type=int, default=10, help="stop after this many iterations without a new global best")
    a("-m", "--max_iteration", type=int, default=200, help="maximum number of iterations")
    a("--step_length", type=float, default=1.0, help="initial step length s of the BWR update")
    a("--step_length_factor", type=float, default=0.95, help="step length decay per iteration, in (0, 1]")
    a("--minimum_step_length", type=float, default=0.1, help="the step length never decays below this")
    a("--restart_stray_candidates", type=int, default=1, choices=[0, 1],
      help="re-initialise candidates that have not improved for restart_patience * patience iterations")
    a("--restart_patience", type=float, default=0.5, help="see --restart_stray_candidates")
    a("--populate_initial_experts", type=int, default=0, choices=[0, 1],
      help="fill the population up to --initial_experts_num with crossover children of random expert pairs")
    a("--initial_experts_num", type=int, default=None,
      help="population size when --populate_initial_experts 1 (required then; the published scripts use 20)")
    a("--starting_test_set_eval", type=int, default=0, choices=[0, 1],
      help="also evaluate every initial candidate on the test set at the start (logged)")
    a("--fast_merge", type=int, default=1, choices=[0, 1],
      help="1: experts are single-file LoRA adapters, merged in memory; 0: full or multi-shard models, merged on disk")
    a("--project_name_wb", default="bwr", help="Weights & Biases project")
    a("--wandb_mode", default=None, choices=["online", "offline", "disabled"],
      help="W&B mode; default: WANDB_MODE if set, else online when logged in, else offline (never prompts)")
    a("--clean_up_on_end", type=int, default=1, choices=[0, 1],
      help="1: leave no global_worst/ at the end, as the published clean-up removes worst/ (candidate_i/, "
           "global_best/ and the records are kept); 0: keep global_worst/")
    a("--only_one_or_two", default=None, choices=["one", "two"], help="multitask: optimise only one of the two sets")
    a("--lm_eval_tasks", default=None, metavar="T1,T2",
      help="lm_eval: lm-evaluation-harness task or group names; the utility is the mean of their primary metrics")
    a("--lm_eval_include_path", default=None, metavar="DIR", help="lm_eval: a folder of your own task YAMLs")
    a("--lm_eval_dev_limit", type=int, default=None, metavar="N",
      help="lm_eval: dev documents per task, drawn with a fixed seed (default: the whole validation split)")
    a("--to_visualize", type=int, default=0, choices=[0, 1],
      help="record each candidate's trajectory as a fixed random 2-D projection of its weights (trajectory.png)")
    a("--correctness_emergence", type=int, default=0, choices=[0, 1],
      help="record per-item dev correctness of every candidate at every iteration (correctness_emergence.json, "
           "rewritten each iteration)")
    a("--dropK", type=float, default=0.0, help="probability of skipping a whole iteration's updates and evaluations")
    a("--dropN", type=float, default=0.0, help="probability of skipping one candidate's update and evaluation")


def add_merge_and_evaluation_flags(p):
    """How members are merged and moved (the merge method, the optimizer and its rule) and how they are scored."""
    a = p.add_argument
    a("--merge_method", default="weighted_average", choices=list(merge.MERGE_METHODS), metavar="METHOD",
      help=merge.methods_help())
    a("--merge_params", default=None, help=merge.params_help())
    a("--num_cpu_when_merging", type=int, default=1, help="CPU threads per worker for tensor work")
    a("--seed", type=int, default=42, help="seed of every random draw of the search")
    a("--greedy", type=int, default=1, choices=[0, 1],
      help="1: keep an update only if it scores strictly better (bwr, random; pso and cma_es always move)")
    a("--optimizer", default="bwr", choices=list(optimizers.CLASSES), help=optimizers.optimizers_help())
    a("--early_reject", type=float, nargs="?", const=0.0, default=None, metavar="ALPHA",
      help="stop scoring a proposal once it cannot be kept (greedy optimizers): alone, only when it cannot beat "
           "its member even scoring the maximum on every unseen dev item (same results as without); with ALPHA, "
           "also when a Hoeffding-Serfling bound says so, wrongly with chance at most ALPHA (docs/early_reject.md)")
    a("--max_evaluations", type=int, default=None,
      help="stop after this many dev evaluations of candidates (the initial population's included; the final "
           "and the starting test evaluations are not counted)")
    a("--batch_size", type=int, default=None,
      help="generation batch size (default: as many prompts as a share of the device's free memory holds)")
    a("--mc_scoring", default="generate", choices=["generate", "logits"],
      help="multiple choice: parse generated answers, or pick the letter with the highest next-token logit")
    a("--scoring", default="published", choices=["published", "strict"],
      help="answer extraction: 'published' reproduces the published evaluator (comparable with the paper's "
           "numbers: exact match = gold contained in the output; the letter among the first or last 5 characters), "
           "'strict' reads the answer where the model gives it (docs/objectives.md, Scoring)")
    a("--reward_model", default="internlm/internlm2-7b-reward", help="reward model of the rm_* objectives")
    a("--trust_remote_code", type=int, default=0, choices=[0, 1], help="allow models that need remote code")
    a("--judge_model", default="gemini-1.5-flash", help="Gemini model of the 'human' objective (Vertex AI)")
    a("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
      help="model dtype (default: bf16 on GPUs that support it, else fp16; fp32 on CPU)")


def build_parser():
    p = _Parser(description="BWR_model: search over merges of LoRA experts with the Best-Worst-Random algorithm.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_search_flags(p)
    add_merge_and_evaluation_flags(p)
    a = p.add_argument  # where and how the work runs: workers and backend, folders, resume
    a("--num_cpu_workers", type=int, default=1, help="number of worker processes with -g cpu")
    a("--backend", default="local", choices=["local", "ray"], help="run workers as local processes or Ray actors")
    a("--ray_address", default=None, help="Ray cluster address (default: start or join a local Ray instance)")
    a("--output_root", default="search", help="folder in which the search directory is created")
    a("--data_dir", default=os.path.join(REPO, "data", "eval"), help="folder of the evaluation sets")
    a("--resume", default=None, metavar="DIR", help="continue the interrupted search in DIR")
    a("--lock_wait", type=float, default=0.0, metavar="SECONDS",
      help="--resume of a directory another search.py still holds: wait up to this long for it to end (a "
           "scheduler's requeue) instead of refusing at once")
    add_optimizer_flags(p)
    return p


def add_optimizer_flags(parser):
    """Each optimizer's own flags, declared on its class (optimizers.py), in a -h group of its own."""
    for name, cls in optimizers.CLASSES.items():
        if not cls.flags:
            continue
        group = parser.add_argument_group(f"--optimizer {name}", cls.help)
        for flag in cls.flags:
            group.add_argument(f"--{flag.name}", type=flag.type, default=flag.default, choices=flag.choices,
                               help=flag.help)


# search names become folder names (with _<hostname>_<time> appended, 255 bytes at most) and appear in shell
# commands: plain characters only
MAX_NAME_LENGTH = 100
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,%d}" % (MAX_NAME_LENGTH - 1))

# why an objective has no score range for --early_reject (data/schema.py, EvalType.score_range)
EARLY_REJECT_REFUSED = {"multitask": "a harmonic mean of two accuracies", "rm_default": "an unbounded reward",
                        "lm_eval": "a mean over tasks of metrics that may be unbounded, scored by lm-eval in one pass"}

NUMERIC_RULES = [  # (flag, test, what is valid)
    ("patience", lambda v: v >= 1, "an integer >= 1"),
    ("early_reject", lambda v: v is None or 0 <= v < 1, "a level in [0, 1) (0 or none: exact)"),
    ("max_iteration", lambda v: v >= 0, "an integer >= 0"),
    ("step_length", lambda v: v > 0 and math.isfinite(v), "a number > 0"),
    ("step_length_factor", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("minimum_step_length", lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
    ("restart_patience", lambda v: v > 0 and math.isfinite(v), "a number > 0"),
    ("initial_experts_num", lambda v: v is None or v >= 3, "an integer >= 3"),
    ("dropK", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("dropN", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("num_cpu_when_merging", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("num_cpu_workers", lambda v: v >= 1, "an integer >= 1"),
    ("seed", lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)"),
    ("max_evaluations", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("lm_eval_dev_limit", lambda v: v is None or v >= 1, "an integer >= 1"),
]


def parse_devices(gpus, num_cpu_workers, backend="local"):
    """'-g 0,2' -> [0, 2]; '-g cpu' -> ['cpu'] * num_cpu_workers. Checks the GPUs exist. With --backend ray the
    list only counts GPU actors: Ray assigns the GPUs, on any node, and RayPool checks the cluster has enough."""
    text = str(gpus).strip()
    if text.lower() == "cpu":
        if num_cpu_workers < 1:
            raise UsageError(f"--num_cpu_workers {num_cpu_workers} is out of range: it must be an integer >= 1")
        return ["cpu"] * num_cpu_workers
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise UsageError(f"-g {gpus!r} is malformed: give comma-separated GPU ids like 0,1,2 or 'cpu'")
    ids = [int(part) for part in parts]
    if len(set(ids)) != len(ids):
        raise UsageError(f"-g {gpus!r} repeats a GPU id; each GPU gets one worker")
    if backend == "ray":
        return ids
    import torch
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in ids if i >= visible]
    if missing:
        where = f"visible GPU ids are {','.join(map(str, range(visible)))}" if visible else "no CUDA GPU is visible"
        raise UsageError(f"GPU {','.join(map(str, missing))} requested but {where}; use -g cpu to run on the CPU "
                         f"(see search_demo.sh)")
    return ids


@dataclass(frozen=True)
class Setup:
    """What validate_args derives from the arguments, built once. The arguments themselves are never changed, so
    args.json and the W&B config hold what the user passed."""
    devices: tuple          # one entry per worker: a GPU id, or "cpu" (parse_devices)
    merge_params: dict      # --merge_params parsed against --merge_method's declaration, defaults filled
    experts: tuple          # the expert folders under -i, sorted (find_experts)
    ignored: tuple          # sub-folders of -i that hold no adapter or model
    wandb_mode: str         # the W&B mode the search will use (resolve_wandb_mode)
    wandb_note: str | None  # why it is not the requested one, when it is not
    notes: tuple = ()       # lines for log.txt about the objective (lm_eval: how each task's splits were made)


def validate_args(args, start_workers=None):
    """Every check that needs no model: runs before any directory is made. Returns the Setup derived from the
    arguments. start_workers(devices, merge_params), when given, is called once the arguments themselves are known
    to be usable, before the checks that read experts, tokenizer and data: the workers import their libraries and
    load the base model meanwhile (a few seconds here; minutes for a 7B model)."""
    # the device check comes first: on a machine without GPUs the GPU starter scripts stop at once
    devices = parse_devices(args.gpus, args.num_cpu_workers, args.backend)
    check_flags(args)
    from data.schema import DataError, load_eval_data
    if args.eval_type not in EVAL_TYPES:
        raise UsageError(f"unknown eval type {args.eval_type!r}; valid: {', '.join(EVAL_TYPES)}")
    check_lm_eval_flags(args)
    if args.early_reject is not None and EVAL_TYPES[args.eval_type].score_range is None:
        raise UsageError(f"--early_reject needs a utility that is the mean of bounded per-item scores; -e "
                         f"{args.eval_type}'s is not ({EARLY_REJECT_REFUSED.get(args.eval_type, 'no score range')}): "
                         f"leave --early_reject out")
    try:
        if args.eval_type != "lm_eval":
            load_eval_data(args.dataset, args.eval_type, data_dir=args.data_dir)
    except DataError as e:
        raise UsageError(str(e)) from None
    try:
        merge_params = merge.parse_merge_params(args.merge_method, args.merge_params)
    except merge.MergeError as e:
        raise UsageError(str(e)) from None
    check_optimizer_args(args, merge_params)
    import evaluate
    try:
        evaluate.check_credentials(args.eval_type)
    except evaluate.EvalError as e:
        raise UsageError(str(e)) from None
    experts, ignored = find_experts(args.initial_expert_directory, args.fast_merge)
    base_index = merge_params.get("base_model_idx")
    if base_index is not None and base_index >= len(experts):
        raise UsageError(f"--merge_params base_model_idx {base_index} is out of range: there are "
                         f"{len(experts)} experts (valid: 0..{len(experts) - 1})")
    if start_workers is not None:
        start_workers(devices, merge_params)
    check_experts(experts, args.base_model, args.fast_merge, args.trust_remote_code)
    # a prompt longer than the base model's context is no error to the model: it would generate past its trained
    # positions, for minutes and to no use, so it is found here, before any directory or worker exists
    try:
        evaluate.configure(scoring=args.scoring, mc_scoring=args.mc_scoring, data_dir=args.data_dir)
        evaluate.check_prompt_lengths(args.eval_type, args.dataset, args.base_model, args.only_one_or_two,
                                      bool(args.trust_remote_code))
    except evaluate.EvalError as e:
        raise UsageError(str(e)) from None
    notes = check_lm_eval_tasks(args) if args.eval_type == "lm_eval" else ()
    wandb_mode, wandb_note = resolve_wandb_mode(args.wandb_mode)
    size = population_size(args, len(experts))
    if args.max_evaluations is not None and args.max_evaluations < size:
        raise UsageError(f"--max_evaluations {args.max_evaluations} is smaller than the initial population's {size} "
                         f"evaluations: give at least {size}")
    return Setup(tuple(devices), merge_params, tuple(experts), tuple(ignored), wandb_mode, wandb_note, tuple(notes))


def check_flags(args):
    """What the flags say on their own: Ray installed for --backend ray, each number in its range, step lengths and
    population size consistent, the required flags given, a usable name."""
    if args.backend == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise UsageError("--backend ray needs Ray: pip install 'ray[default]' (see requirements.txt)")
    for flag, ok, valid in NUMERIC_RULES:
        value = getattr(args, flag)
        if not ok(value):
            raise UsageError(f"--{flag} {value} is out of range: it must be {valid}")
    if args.minimum_step_length > args.step_length:
        raise UsageError(f"--minimum_step_length {args.minimum_step_length} exceeds --step_length {args.step_length}")
    if args.populate_initial_experts and args.initial_experts_num is None:
        raise UsageError("--populate_initial_experts 1 needs --initial_experts_num N, the population size to fill up "
                         "to (the published scripts use 20)")
    for flag in ("name", "eval_type") + (() if args.eval_type == "lm_eval" else ("dataset",)):
        if not getattr(args, flag):
            raise UsageError(f"-{flag[0]}/--{flag} is required (or --resume DIR)")
    if os.sep in args.name or (os.altsep and os.altsep in args.name) or args.name in (".", ".."):
        raise UsageError(f"--name {args.name!r} must be a plain name without path separators")
    if not NAME_PATTERN.fullmatch(args.name):
        shown = ascii(args.name) if len(args.name) <= 40 else f"{ascii(args.name[:30])}... ({len(args.name)} characters)"
        raise UsageError(f"--name {shown} is not a usable folder name: use at most "
                         f"{MAX_NAME_LENGTH} letters, digits, '.', '_', '+' or '-', starting with a letter or digit")


def check_lm_eval_flags(args):
    """-e lm_eval takes its tasks from --lm_eval_tasks, not -d; the --lm_eval_* flags mean nothing to other types."""
    if args.eval_type == "lm_eval":
        if args.dataset:
            raise UsageError(f"-d {args.dataset} has no use with -e lm_eval: name lm-eval tasks with --lm_eval_tasks")
        if not args.lm_eval_tasks:
            raise UsageError("-e lm_eval needs --lm_eval_tasks T1,T2 (lm-eval task or group names)")
        return
    for flag in ("lm_eval_tasks", "lm_eval_include_path", "lm_eval_dev_limit"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is an -e lm_eval option; -e {args.eval_type} does not use it")


def check_lm_eval_tasks(args):
    """Loads every task and its data now (before any directory exists); returns the lines log.txt gets about it."""
    import harness
    try:
        return harness.check(args.lm_eval_tasks, args.lm_eval_include_path, args.lm_eval_dev_limit)
    except harness.HarnessError as e:
        raise UsageError(str(e)) from None


def check_optimizer_args(args, merge_params):
    """The optimizers' flags in range, and no combination --optimizer refuses (declared on its class)."""
    try:
        optimizers.check_args(args, merge_params)
    except optimizers.OptimizerArgsError as e:
        raise UsageError(str(e)) from None


def population_size(args, n_experts):
    return max(args.initial_experts_num, n_experts) if args.populate_initial_experts else n_experts


def find_experts(directory, fast_merge):
    """Sub-folders of -i that hold an adapter (fast_merge 1) or a model (fast_merge 0), and those ignored."""
    if not os.path.isdir(directory):
        raise UsageError(f"expert folder {directory!r} does not exist; set -i to a folder of LoRA experts "
                         f"(python initial_experts/expert_init.py --tiny builds a tiny one)")
    experts, ignored, adapters, models = [], [], [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        files = set(os.listdir(path))
        is_adapter = "adapter_config.json" in files
        is_model = "config.json" in files and any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                                                  for f in files)
        has_weights = any(f.endswith(WEIGHT_SUFFIXES) for f in files)
        if is_adapter and "adapter_model.safetensors" not in files:
            raise UsageError(f"expert {path} has no adapter_model.safetensors (pickle .bin adapters are refused): "
                             f"load it with peft and save_pretrained(path, safe_serialization=True)")
        if not is_adapter and "config.json" not in files and has_weights:
            # weights without a config cannot be an expert: dropping them would change the population unseen
            raise UsageError(f"expert {path} has weights but no adapter_config.json (LoRA adapter) or config.json "
                             f"(full model): restore the config or move the folder out of {directory}")
        if is_adapter:
            adapters.append(path)
            if fast_merge:
                experts.append(path)
        elif is_model:
            models.append(path)
            if fast_merge:
                raise UsageError(f"expert {path} is a full model: use --fast_merge 0 for full or multi-shard models")
            experts.append(path)
        elif "config.json" in files and any(f.endswith(".bin") for f in files):
            raise UsageError(f"expert {path} has only pickle .bin weights: re-save it with safe_serialization=True")
        else:
            ignored.append(name)
    if not experts and adapters and not fast_merge:
        raise UsageError(f"--fast_merge 0 expects full models (config.json + *.safetensors) but {directory!r} holds "
                         f"{len(adapters)} LoRA adapter(s) (adapter_config.json + adapter_model.safetensors): "
                         f"use --fast_merge 1 for adapters")
    if not experts:
        expected = ("sub-folders with adapter_config.json + adapter_model.safetensors (or full models with "
                    "--fast_merge 0)") if fast_merge else "sub-folders holding full models (config.json + *.safetensors)"
        found = f"; it has {len(ignored)} other sub-folder(s): {', '.join(ignored[:5])}" if ignored else ""
        raise UsageError(f"no experts found in {directory!r}: expected {expected}{found}")
    if len(experts) < 3:
        raise UsageError(f"found {len(experts)} expert(s) in {directory!r}; BWR needs at least 3 "
                         f"(a best, a worst and another)")
    return experts, ignored


# what the weights of a model or adapter folder can be stored in (a folder with one of these is meant as an expert)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# adapter_config.json fields that change the function an adapter computes, with peft's defaults for a missing
# field: merging factors trained under different values would silently compute something else
ADAPTER_FIELDS = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_rslora": False, "use_dora": False,
                  "target_modules": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
                  "bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                  "lora_bias": False, "layer_replication": None, "exclude_modules": None, "target_parameters": None,
                  "trainable_token_indices": None, "base_model_name_or_path": None}


def adapter_fields(config):
    """The ADAPTER_FIELDS of one adapter config, normalised so that equal meaning compares equal."""
    out = {}
    for field, default in ADAPTER_FIELDS.items():
        value = config.get(field)
        if value is None:
            value = default
        if field in ("target_modules", "modules_to_save", "layers_to_transform") and isinstance(value, list):
            value = sorted(value, key=str)
        if field == "base_model_name_or_path" and value is not None:
            value = os.path.basename(str(value).rstrip("/"))  # the same model, saved from another folder
        out[field] = value
    return out


def read_expert(path, fast_merge):
    """{tensor: (shape, dtype)} and the adapter config (None for full models) of one expert, every tensor checked to
    be finite. Any file that cannot be read is a UsageError naming the expert and the file."""
    from safetensors import safe_open
    config = None
    if fast_merge:
        config, problem = read_json_object(os.path.join(path, "adapter_config.json"))
        if problem:
            raise UsageError(f"expert {path}: adapter_config.json is damaged ({problem}); restore it from the "
                             f"adapter's source")
        if config.get("peft_type", "LORA") != "LORA":
            raise UsageError(f"expert {path}: only LoRA adapters can be merged, its peft_type is "
                             f"{config.get('peft_type')!r}")
        files = ["adapter_model.safetensors"]
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    tensors = {}
    for name in files:
        file_path = os.path.join(path, name)
        try:
            with safe_open(file_path, "pt") as handle:
                for key in handle.keys():
                    # one tensor at a time (memory-mapped): a full model need never be in memory at once
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not merge.all_finite(tensor):
                        raise UsageError(f"expert {path} has non-finite weights (NaN or inf) in tensor {key}: "
                                         f"a search cannot score or merge it; remove or repair this expert")
                    tensors[key] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
            raise UsageError(f"expert {path}: {name} is not a readable safetensors file ({first_line(e)}); "
                             f"re-save it with save_pretrained(..., safe_serialization=True)") from None
    if not tensors:
        raise UsageError(f"expert {path}: {', '.join(files)} holds no tensors")
    return tensors, config


def check_experts(experts, base_model, fast_merge, trust_remote_code):
    """Experts must be readable and finite, share tensors, shapes, dtypes and every adapter setting that changes
    what they compute, and fit the base model (-b)."""
    read = [read_expert(path, fast_merge) for path in experts]
    first, first_config = read[0]
    first_fields = adapter_fields(first_config) if fast_merge else None
    for path, (tensors, config) in zip(experts[1:], read[1:]):
        if set(tensors) != set(first):
            extra = sorted(set(tensors) ^ set(first))[0]
            raise UsageError(f"experts {experts[0]} and {path} have different tensors (e.g. {extra}): "
                             f"all experts must be adapters of the same base model and target modules")
        for key, (shape, dtype) in tensors.items():
            if shape != first[key][0]:
                raise UsageError(f"experts {experts[0]} and {path} differ in tensor {key}: {first[key][0]} vs "
                                 f"{shape} (different ranks or base models)")
            if dtype != first[key][1]:
                raise UsageError(f"expert {path} differs in dtype: tensor {key} is {dtype}, {first[key][1]} in "
                                 f"{experts[0]}; save all experts in one dtype")
        if fast_merge:
            fields = adapter_fields(config)
            for field, value in fields.items():
                if value != first_fields[field]:
                    raise UsageError(f"expert {path} differs in {field}: {value!r}, {first_fields[field]!r} in "
                                     f"{experts[0]}; experts must agree on every setting that changes what an "
                                     f"adapter computes")
    if fast_merge:  # reads the base model's config first: a base model that is not there is named as such
        _check_base_model_fits(experts[0], {k: shape for k, (shape, _) in first.items()}, base_model,
                               trust_remote_code)
    check_base_model(base_model, trust_remote_code)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")


def check_base_model(base_model, trust_remote_code):
    """A base model the workers can load: weights and tokenizer present, and a tokenizer that tells texts apart."""
    if os.path.isdir(base_model):
        files = set(os.listdir(base_model))
        if "config.json" not in files:
            raise UsageError(f"base model {base_model} has no config.json: give -b a model folder saved with "
                             f"save_pretrained or a hub id")
        index = [f for f in files if f.endswith(".index.json")]
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise UsageError(f"base model {base_model} has no weights (model.safetensors or shards): copy the "
                             f"whole model folder")
        for name in index:
            try:
                with open(os.path.join(base_model, name)) as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
                raise UsageError(f"base model {base_model}: {name} is damaged ({first_line(e)})") from None
            missing = sorted(s for s in shards if s not in files)
            if missing:
                raise UsageError(f"base model {base_model} lacks weight shard {missing[0]} listed in {name}")
        if not files & set(TOKENIZER_FILES):
            raise UsageError(f"base model {base_model} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                             f"...): save the tokenizer with the model (tokenizer.save_pretrained)")
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        def cached(name):
            try:
                return isinstance(try_to_load_from_cache(base_model, name), str)
            except Exception:  # noqa: BLE001 - not a valid hub id: the tokenizer check below names the problem
                return True
        if not any(cached(name) for name in ("model.safetensors", "model.safetensors.index.json",
                                             "pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise UsageError(f"base model {base_model!r} has no weights in the local cache and HF_HUB_OFFLINE is "
                             f"set: download it once with network, or give -b a local folder")
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=bool(trust_remote_code))
        ids = tokenizer("Question: what is 12 + 30?\nAnswer: 42")["input_ids"]
    except Exception as e:  # noqa: BLE001 - any failure here means the workers could not load it either
        raise UsageError(f"cannot load the tokenizer of base model {base_model!r} ({first_line(e)})") from None
    if len(set(ids)) < 3:
        raise UsageError(f"the tokenizer of base model {base_model!r} maps a test sentence to {len(set(ids))} "
                         f"distinct token id(s): its tokenizer files are missing or broken")


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_base_model_fits(expert, shapes, base_model, trust_remote_code):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - any failure here means the base model cannot be used
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read the config of base model {base_model!r} ({first_line}); give -b a local "
                         f"model folder or a hub id you can access (hf auth login)") from None
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    for key, shape in shapes.items():
        parts = key.split(".")
        if hidden is not None and "lora_A" in parts and any(m in parts for m in ("q_proj", "k_proj", "v_proj")):
            if shape[-1] != hidden:
                raise UsageError(f"expert {expert} does not fit base model {base_model}: {key} expects hidden size "
                                 f"{shape[-1]}, the base model has {hidden}")
        if layers is not None and "layers" in parts:
            layer = parts[parts.index("layers") + 1]
            if layer.isdigit() and int(layer) >= layers:
                raise UsageError(f"expert {expert} does not fit base model {base_model}: it adapts layer {layer}, "
                                 f"the base model has {layers} layers")


# ----------------------------------------------------------------------------------------------------------------
# Files of a search directory

def write_state(directory, state):
    """state.json: on one line, because it is rewritten every iteration and grows with them (profiles, histories,
    --correctness_emergence's per-item scores), and json's C encoder only serves unindented output (3-5x faster)."""
    atomic_write_text(os.path.join(directory, "state.json"), json.dumps(state))


class Trash:
    """Folders the search no longer needs (replaced candidates, spent staging folders) are renamed into
    <search dir>/.trash/ at once and deleted by a background thread, overlapping the next iteration's forward
    passes. Deleting is slower than it looks: on the development machine (ext4 mounted with online discard) every
    unlinked file and folder costs about 4 ms, 12 ms per candidate folder, which the driver would otherwise spend
    between iterations while the workers wait. Whatever a kill leaves in .trash/ is removed by the next close()."""

    def __init__(self, directory):
        self.root = os.path.join(directory, ".trash")
        self.pending = []
        self.lock = threading.Lock()
        self.thread = None

    def put(self, path):
        os.makedirs(self.root, exist_ok=True)
        target = os.path.join(self.root, uuid.uuid4().hex)
        os.replace(path, target)
        with self.lock:
            self.pending.append(target)
            if self.thread is None:
                self.thread = threading.Thread(target=self._delete, daemon=True)
                self.thread.start()

    def _delete(self):
        while True:
            with self.lock:
                if not self.pending:
                    self.thread = None
                    return
                path = self.pending.pop()
            shutil.rmtree(path, ignore_errors=True)

    def empty(self):
        """Waits for the deletions and removes .trash/ itself (with anything an earlier, killed run left there)."""
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join()
        shutil.rmtree(self.root, ignore_errors=True)


def new_search_dir(root, name):
    """Creates search/<name>_<hostname>, or with a time and then a counter appended when that exists. mkdir is
    atomic, so two searches started at the same instant with the same name never share a folder."""
    base = os.path.join(root, f"{name}_{socket.gethostname()}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in itertools.chain([base, f"{base}_{stamp}"], (f"{base}_{stamp}_{n}" for n in itertools.count(1))):
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def lock_search_dir(directory, wait=0.0):
    """Takes the directory's lock (fileio.DirectoryLock) or refuses in one line naming who holds it."""
    try:
        return DirectoryLock(directory, wait=wait)
    except DirectoryBusy as busy:
        h = busy.holder
        who = (f"search.py pid {h.get('pid')} on {h.get('host')} since {h.get('since')}" if h
               else "another process (its holder record is unreadable)")
        waited = f" (still, after waiting {wait:g} s)" if wait else ""
        hint = "" if wait else "; wait for it to end, or add --lock_wait SECONDS to wait for it"
        raise UsageError(f"{directory} is in use by {who}{waited}{hint}") from None
    except OSError as e:
        raise UsageError(f"cannot lock {directory} ({e.strerror})") from None


class Log:
    def __init__(self, path, quiet=False):
        self.path = path
        self.quiet = quiet

    def __call__(self, message):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if not self.quiet:
            try:
                from tqdm import tqdm
                tqdm.write(line)
            except ImportError:
                print(line, flush=True)


class SearchFiles:
    """The search directory on disk: candidate_i/, global_best/ and global_worst/, the staging folder an iteration
    writes into, and the commit that makes an iteration durable (state.json first, then the folder moves)."""

    def __init__(self, directory, args_sha256, correctness_emergence):
        self.dir = directory
        self.args_sha256 = args_sha256  # args.json's: every commit writes it into state.json
        self.correctness_emergence = correctness_emergence
        self.staging_root = os.path.join(directory, ".staging")
        self.staging = None  # .staging/<iteration>/: set by fresh_staging
        self.trash = Trash(directory)

    def cand(self, i):
        return os.path.join(self.dir, f"candidate_{i}")

    def staged(self, i, suffix=""):
        return os.path.join(self.staging, f"candidate_{i}{suffix}")

    def sources(self, state, staged=False):
        """Every member's weights as the workers read them: candidate_i/ at the member's version. staged=True: as
        the member stands mid-iteration, an update accepted in this iteration being in the staging folder until
        the commit (a worker that did not compute it would otherwise read candidate_i/'s previous weights under the
        new version, and keep them cached)."""
        out = [Source(self.cand(i), c["version"]) for i, c in enumerate(state["candidates"])]
        return [s._replace(read_from=self.staged(i)) if staged and os.path.exists(self.staged(i)) else s
                for i, s in enumerate(out)]

    def extreme_sources(self, state):
        """global_best/ and global_worst/ (the best and the worst ever; --rule published_code's best and worst):
        both change only at commits, so the iteration that wrote each is its version."""
        return [Source(os.path.join(self.dir, "global_best"), state["best"]["iteration"]),
                Source(os.path.join(self.dir, "global_worst"), state["worst"]["iteration"])]

    def fresh_staging(self, iteration):
        """Each iteration stages into a folder of its own, so the moves recorded by one commit can never pick up
        what a later iteration staged: that is what lets a commit write state.json once."""
        shutil.rmtree(self.staging_root, ignore_errors=True)
        self.staging = os.path.join(self.staging_root, str(iteration))
        os.makedirs(self.staging)

    def staged_moves(self, n):
        """The moves that install the members staged in this iteration into candidate_i/."""
        return [[self.staged(i), self.cand(i)] for i in range(n) if os.path.exists(self.staged(i))]

    def keep_restart(self, i):
        """A kept restart replaces the member's update staged in this iteration, if there is one."""
        if os.path.exists(self.staged(i)):
            self.trash.put(self.staged(i))
        os.replace(self.staged(i, ".restart"), self.staged(i))

    def stage_extreme(self, i, name):
        """Member i's current weights (staged in this iteration, else candidate_i/) linked into the staging folder
        as name (global_best or global_worst); returns the move that installs them."""
        current = self.staged(i) if os.path.exists(self.staged(i)) else self.cand(i)
        link_tree(current, os.path.join(self.staging, name))
        return [os.path.join(self.staging, name), os.path.join(self.dir, name)]

    def commit(self, state, moves):
        """State first (with its moves), then the moves: a kill anywhere leaves a state resume can complete.

        state.json is written (and fsynced) once per commit. It keeps listing the moves after they are done: resume
        re-applies them (apply_moves is idempotent, and their sources are this iteration's own staging folder,
        which no later iteration writes into), so a second write just to clear the list would buy nothing."""
        with INTERRUPTS:  # a signal waits for the commit to complete
            state["pending_moves"] = moves
            # the arguments this state belongs to: resume refuses an args.json that is not the one it started with
            state["args_sha256"] = self.args_sha256
            crash_point("before_commit")
            # what state.json is about to name must be on disk first: the workers staged it without fsync. A commit
            # that moves nothing names nothing new, so it skips the syncfs; it still writes state.json (an iteration
            # that accepted nothing changes the generator, histories and counters that resume continues from)
            if moves:
                sync_filesystem(self.staging_root)
            write_state(self.dir, state)
            for move in moves:
                crash_point("move")
                apply_moves([move], discard=self.trash.put)
            state["pending_moves"] = []
            crash_point("scratchpad")
            # derived from the state and rewritten by every commit and by finish(): written atomically but not
            # fsynced, a power cut can leave it one iteration behind until the next commit, never torn
            write_json(os.path.join(self.dir, "utility_scratchpad.json"), scratchpad(state), durable=False)
            if self.correctness_emergence:
                # one line, like state.json: it holds candidates x iterations x items numbers
                atomic_write_text(os.path.join(self.dir, "correctness_emergence.json"),
                                  json.dumps(correctness_emergence(state)), durable=False)
            self.trash.put(self.staging_root)


# ----------------------------------------------------------------------------------------------------------------
# The search

def worker_config(a, devices, merge_params):
    """What every worker is started with (the same for a search and its resume)."""
    eval_options = {"batch_size": a.batch_size, "mc_scoring": a.mc_scoring, "scoring": a.scoring,
                    "reward_model": a.reward_model,
                    "trust_remote_code": bool(a.trust_remote_code), "judge_model": a.judge_model,
                    "dtype": a.dtype, "data_dir": os.path.abspath(a.data_dir),
                    "lm_eval_include_path": a.lm_eval_include_path and os.path.abspath(a.lm_eval_include_path),
                    "lm_eval_dev_limit": a.lm_eval_dev_limit}
    threads = a.num_cpu_when_merging
    if devices and devices[0] == "cpu":
        # an explicit OMP_NUM_THREADS wins: on a machine shared with other jobs, more torch threads than free
        # cores make every small op wait for a descheduled thread (on 2 cores with one taken, the tiny model's
        # forward passes ran 40-50x slower with 2 threads than with 1)
        omp = os.environ.get("OMP_NUM_THREADS", "")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(threads, cpus // len(devices))
    return {"base_model": os.path.abspath(a.base_model) if os.path.isdir(a.base_model) else a.base_model,
            "eval_type": a.eval_type, "dataset": a.lm_eval_tasks if a.eval_type == "lm_eval" else a.dataset,
            "only_one_or_two": a.only_one_or_two,
            "fast_merge": a.fast_merge, "merge_method": a.merge_method, "merge_params": merge_params,
            "evaluate_options": eval_options, "torch_threads": threads, "to_visualize": a.to_visualize}


def start_pool(args, setup, log, pool=None):
    """The workers of a search: those prepare() started while it validated (pool), taken over, or new ones."""
    devices = list(setup.devices)
    if pool is not None:
        log(f"{len(devices)} local worker(s) on {devices} started during validation")
        pool.log = log
        return pool
    config = worker_config(args, setup.devices, setup.merge_params)
    log(f"starting {len(devices)} {args.backend} worker(s) on {devices}")
    if args.backend == "ray":
        from workers import RayPool
        return RayPool(devices, config, log=log, address=args.ray_address)
    return LocalPool(devices, config, log=log)


@dataclass
class Iteration:
    """The working values of one iteration, shared by its phases (Search.iterate): what was proposed to whom, what
    came back, what was kept."""
    number: int                # k, the iteration being run: state["iteration"] + 1
    rng: object                # the search's generator, restored from the state and saved back by the commit
    started: float             # time.perf_counter() at its start, for the profile
    budget: int | None         # dev evaluations left under --max_evaluations (None: no limit)
    members: list = field(default_factory=list)          # the members sent an update, in order
    tasks: list = field(default_factory=list)            # their candidate tasks
    results: list = field(default_factory=list)          # and their results
    accepted: int = 0                                    # updates kept
    restart_results: list = field(default_factory=list)  # results of the strays' restarts
    restarted: list = field(default_factory=list)        # the members whose restart was kept


class Search:
    """A search on its directory: run() = initialise (iteration 0), iterate until stop_reason, finish."""

    def __init__(self, args, setup, directory, args_sha256, state=None, pool=None):
        self.args = args
        self.setup = setup
        self.dir = directory
        self.files = SearchFiles(directory, args_sha256, args.correctness_emergence)
        self.log = Log(os.path.join(directory, "log.txt"))
        self.state = state
        self.pool = pool  # the local workers prepare() started, or None: run() starts them
        self.wandb = None
        self.optimizer = None  # optimizers.make(): set by initialise(), or restored from the state by run()

    # -- what the workers read and write
    def expert_sources(self):
        return [Source(os.path.abspath(p), 0) for p in self.setup.experts]

    def candidate_task(self, i, sources, update, version, accept_if_above=None, restart=False, merge_method=None):
        """The one place a candidate task is built: member i's next version (cached by the workers as version),
        staged until the commit; a restart is staged beside the iteration's update, which it replaces only once
        accepted. A NaN threshold is none: any non-NaN utility is accepted."""
        if accept_if_above is not None and math.isnan(accept_if_above):
            accept_if_above = None
        return CandidateTask(name=f"candidate_{i}" + (" (restart)" if restart else ""), sources=tuple(sources),
                             update=update, split="dev", accept_if_above=accept_if_above,
                             save_to=self.files.staged(i, ".restart" if restart else ""),
                             cache_as=(self.files.cand(i), version), merge_method=merge_method,
                             early_reject=early_rejection(self.args, self.state, i, accept_if_above, restart))

    def run_tasks(self, tasks, description):
        from tqdm import tqdm
        with tqdm(total=len(tasks), desc=description, leave=False, disable=not sys.stderr.isatty()) as bar:
            def on_result(index, result):
                bar.update(1)
                for warning in result.get("warnings", ()):  # logged in the worker, which never writes log.txt
                    self.log(f"{describe_task(tasks[index])}: warning: {warning}")
                crash_point("evaluation")  # the other workers are still merging and evaluating
            return self.pool.run(tasks, on_result=on_result)

    # -- initialisation: iteration 0
    def initialise(self):
        """The initial population (each expert as it is, then crossover children up to the population size) scored
        on dev, the best initial expert on test, the optimizer started; committed as iteration 0."""
        a, experts = self.args, self.setup.experts
        # the published search.py writes args.txt first thing; ours is rewritten at the end too (write_records)
        atomic_write_text(os.path.join(self.dir, "args.txt"),
                          published_args_text(read_json(os.path.join(self.dir, "args.json")), self.dir))
        rng = bwr.make_rng(a.seed)
        recipes = initial_recipes(len(experts), population_size(a, len(experts)), rng)
        self.files.fresh_staging(0)
        coefficients = [recipe_coefficients(recipe, len(experts)) for recipe in recipes]
        results = self.evaluate_initial(recipes, coefficients)
        self.state = initial_state(a.step_length, recipes, results, experts)
        start_early_rejection(self.state, results, a)
        for i, c in enumerate(self.state["candidates"]):
            self.log(f"candidate_{i} ({c['origin']}): dev utility {c['utility']:.4f}")
        if a.correctness_emergence:
            record_emergence(self.state, 0, dict(enumerate(results)))
        # the initial population's per-item results, for the published starting_top-k_ensemble_* metrics
        self.state["starting_details"] = {"dev": compact_details([r.get("details") for r in results]), "test": None}
        self.evaluate_starting_test()
        self.optimizer = optimizers.make(a, len(experts))
        self.optimizer.start(coefficients, member_utilities(self.state), rng)
        self.state["optimizer"] = self.optimizer.state()
        moves = [[self.files.staged(i), self.files.cand(i)] for i in range(len(recipes))]
        moves += self.best_worst_moves(None)[0]
        self.state["rng"] = bwr.rng_state(rng)
        self.files.commit(self.state, moves)
        start = self.state["starting_best"]
        self.log(f"starting best: {start['expert']} dev {start['utility']:.4f} test {start['test_utility']:.4f}")

    def evaluate_initial(self, recipes, coefficients):
        """Every initial member merged from the experts and scored on dev: their results, in order."""
        tasks = []
        for i, (recipe, weights) in enumerate(zip(recipes, coefficients)):
            # an initial expert is scored as it is: ties or dare would change even a lone expert of weight 1
            # (trim, rescale, drop), and starting_best_* must describe the experts the user gave
            lone = len(recipe["parents"]) == 1
            tasks.append(self.candidate_task(i, self.expert_sources(), {"kind": "combine", "weights": weights}, 0,
                                             merge_method="weighted_average" if lone else None))
        self.log(f"initialising {len(recipes)} candidates from {len(self.setup.experts)} experts")
        return self.run_tasks(tasks, "initial evaluation")

    def evaluate_starting_test(self):
        """The best initial expert's test utility, the baseline the search has to beat (every initial member's
        with --starting_test_set_eval 1)."""
        s, candidates = self.state, self.state["candidates"]
        start = s["starting_best"]["candidate"]
        targets = range(len(candidates)) if self.args.starting_test_set_eval else [start]
        tasks = [EvaluateTask(self.files.staged(i), 0, "test") for i in targets]
        results = self.run_tasks(tasks, "starting test evaluation")
        for i, result in zip(targets, results):
            candidates[i]["starting_test_utility"] = result["utility"]
            self.log(f"candidate_{i}: starting test utility {result['utility']:.4f}")
            if i == start:
                s["starting_best"]["test_scores"] = (result.get("details") or {}).get("scores")
        s["starting_best"]["test_utility"] = candidates[start]["starting_test_utility"]
        if self.args.starting_test_set_eval:
            s["starting_details"]["test"] = compact_details([r.get("details") for r in results])

    def best_worst_moves(self, previous_best):
        """Update the global best and the global worst (the best and the worst ever, as the published loop keeps
        them) and return the folder moves that record a new one's weights. history["worst"] is the population's
        worst per iteration (the utility curve)."""
        s = self.state
        u = member_utilities(self.state)
        best = max(range(len(u)), key=lambda i: (u[i], -i))
        worst = min(range(len(u)), key=lambda i: (u[i], i))
        moves = []
        improved = previous_best is None or u[best] > previous_best["utility"]
        if improved:
            s["best"] = {"utility": u[best], "candidate": best, "iteration": s["iteration"],
                         "version": s["candidates"][best]["version"]}
            moves.append(self.files.stage_extreme(best, "global_best"))
        if previous_best is None or u[worst] < s["worst"]["utility"]:
            s["worst"] = {"utility": u[worst], "candidate": worst, "iteration": s["iteration"]}
            moves.append(self.files.stage_extreme(worst, "global_worst"))
        s["history"]["best"].append(s["best"]["utility"])
        s["history"]["worst"].append(u[worst])
        return moves, improved

    # -- one iteration: propose, evaluate and accept, restart strays, close
    def iterate(self):
        """Every member proposes an update, the workers score it and the better ones are kept, stray members
        restart, and the commit makes the iteration durable."""
        s, a = self.state, self.args
        it = Iteration(number=s["iteration"] + 1, rng=bwr.rng_from_state(s["rng"]), started=time.perf_counter(),
                       budget=None if a.max_evaluations is None else a.max_evaluations - s["evaluations"])
        self.propose(it)
        self.evaluate_and_accept(it)
        if a.restart_stray_candidates and self.optimizer.restarts:
            self.restart_strays(it)
        self.close_iteration(it)

    def propose(self, it):
        """One update per member, as coefficients over the population or over the initial experts. Every member
        draws its proposal, so the generator advances alike; --dropK then skips the whole iteration's, --dropN a
        member's, and --max_evaluations' budget the rest."""
        a, s, opt, rng = self.args, self.state, self.optimizer, it.rng
        n = len(s["candidates"])
        skip_iteration = rng.random() < a.dropK if a.dropK > 0 else False
        self.files.fresh_staging(it.number)
        opt.begin(member_utilities(self.state), s["step_length"], rng)
        if opt.over == "population":
            sources = self.files.sources(s) + (self.files.extreme_sources(s) if opt.extremes else [])
        else:
            sources = self.expert_sources()
        for i in range(n):
            skip = rng.random() < a.dropN if a.dropN > 0 else False
            update = opt.propose(i, rng)
            if skip or skip_iteration or (it.budget is not None and len(it.tasks) >= it.budget):
                continue
            c = s["candidates"][i]
            threshold = c["utility"] if opt.greedy else None
            it.tasks.append(self.candidate_task(i, sources, update, c["version"] + 1, accept_if_above=threshold))
            it.members.append(i)

    def evaluate_and_accept(self, it):
        """The workers merge and score the proposals, and accept one (greedy: only strictly better) by staging it;
        a member takes an accepted update. A member without one (refused, skipped) is one iteration staler."""
        s = self.state
        it.results = self.run_tasks(it.tasks, f"iteration {it.number}") if it.tasks else []
        for i, task, result in zip(it.members, it.tasks, it.results):
            for line in outcome_lines(i, s["candidates"][i], task, result):
                self.log(line)
            it.accepted += bool(result["accepted"])
            take_update(s["candidates"][i], result)
        for i in set(range(len(s["candidates"]))) - set(it.members):
            s["candidates"][i]["stale"] += 1
        if self.args.correctness_emergence:
            record_emergence(s, it.number, {i: r for i, r in zip(it.members, it.results) if r["accepted"]})
        self.optimizer.end({i: (r["utility"], bool(r["accepted"])) for i, r in zip(it.members, it.results)})

    def restart_strays(self, it):
        """Members without a personal improvement for restart_patience * patience iterations restart near the
        population's best (bwr: a crossover of the best and a random expert), kept only if better than the member
        (as the published loop compares any update): a restart never erases a better record. Staged beside this
        iteration's update, it replaces it only once kept, as the version after it (a worker may hold the update)."""
        a, s = self.args, self.state
        n = len(s["candidates"])
        best = max(range(n), key=lambda i: (s["candidates"][i]["utility"], -i))
        # the budget cuts restarts too (the strays past it are left as they are)
        room = None if it.budget is None else max(it.budget - len(it.tasks), 0)
        strays = stray_members(s["candidates"], max(1, int(round(a.restart_patience * a.patience))), best, room)
        sources, tasks = self.files.sources(s, staged=True) + self.expert_sources(), []
        for i in strays:
            c = s["candidates"][i]
            weights = self.optimizer.restart(i, best, n, len(self.setup.experts), it.rng)
            tasks.append(self.candidate_task(i, sources, {"kind": "combine", "weights": weights}, c["version"] + 1,
                                             accept_if_above=c["utility"], restart=True))
        if not tasks:
            return
        it.restart_results = self.run_tasks(tasks, f"iteration {it.number} restarts")
        for i, result in zip(strays, it.restart_results):
            c = s["candidates"][i]
            if result["accepted"]:
                self.files.keep_restart(i)
                c.update(utility=result["utility"], version=c["version"] + 1, stale=0)
                remember_scores(c, result)
                it.restarted.append(i)
                self.log(f"candidate_{i}: restarted (stray), dev utility {result['utility']:.4f}")
            else:
                self.log(f"candidate_{i}: restart scored {result['utility']:.4f}{decided_by(result)}, not above "
                         f"its {c['utility']:.4f}: not kept")
        if a.correctness_emergence:
            record_emergence(s, it.number, {i: r for i, r in zip(strays, it.restart_results) if r["accepted"]})

    def close_iteration(self, it):
        """Histories, the global best and worst, counters, step length and generator into the state, committed;
        then the iteration's log line and profile. The profile covers the whole iteration, restarts and commit
        included: the entry the commit persists lacks the commit's own seconds, so it is completed in place
        afterwards (and persisted by the next commit)."""
        a, s = self.args, self.state
        for c in s["candidates"]:
            c["history"].append(c["utility"])
        s["iteration"] = it.number
        moves = self.files.staged_moves(len(s["candidates"]))
        bw_moves, improved = self.best_worst_moves(dict(s["best"]))
        s["no_improvement"] = 0 if improved else s["no_improvement"] + 1
        s["step_length"] = max(s["step_length"] * a.step_length_factor, a.minimum_step_length)
        s["rng"] = bwr.rng_state(it.rng)
        s["optimizer"] = self.optimizer.state()
        s["evaluations"] += len(it.results) + len(it.restart_results)
        s["evaluations_history"].append(len(it.results) + len(it.restart_results))
        evaluated, workers = it.results + it.restart_results, len(self.setup.devices)
        profile = iteration_profile(evaluated, time.perf_counter() - it.started, workers)
        count_dev_items(a, s, profile, evaluated)
        s["profile"].append(profile)
        start = time.perf_counter()
        self.files.commit(s, moves + bw_moves)
        profile.update(iteration_profile(evaluated, time.perf_counter() - it.started, workers,
                                         commit=time.perf_counter() - start))
        self.log(iteration_line(s, it))
        self.log(profile_line(profile))
        if self.wandb is not None:
            self.wandb.log({"best": s["best"]["utility"], "worst": s["worst"]["utility"],
                            "step_length": s["step_length"], "accepted": it.accepted,
                            **{f"candidate_{i}": c["utility"] for i, c in enumerate(s["candidates"])}}, step=it.number)

    # -- the end
    def finish(self):
        """The final evaluation (every member and the global best, on test and dev), final_metrics.json and the
        published records, the summary in log.txt."""
        a, s = self.args, self.state
        if a.clean_up_on_end:
            # the published clean-up removes worst/ (global_worst/, kept up to date by every commit)
            shutil.rmtree(os.path.join(self.dir, "global_worst"), ignore_errors=True)
        self.log("final evaluation of every candidate and the global best on the test and dev sets")
        results = self.run_tasks(final_tasks(self.dir, s), "final evaluation")
        metrics, published, published_dev = final_metrics(s, a, results)
        with INTERRUPTS:
            write_json(os.path.join(self.dir, "final_metrics.json"), metrics)
            s["stage"] = "done"
            s["final_metrics"] = metrics
            write_state(self.dir, s)
        write_records(self.dir, s, a)
        log_final_metrics(self.log, metrics, published, published_dev)
        if a.clean_up_on_end:
            self.log("clean-up (--clean_up_on_end 1): no global_worst/ kept; candidate_i/ and global_best/ are")
        if self.wandb is not None:
            self.wandb.summary.update(metrics)
        return metrics

    def run(self):
        a = self.args
        if self.state is not None and self.state["stage"] == "done":
            write_records(self.dir, self.state, a)
            self.log(f"done: best model in {os.path.join(self.dir, 'global_best')}")
            return self.state["final_metrics"]
        self.pool = start_pool(a, self.setup, self.log, self.pool)
        self.wandb = start_wandb(a, self.setup, self.dir, self.log)
        for note in self.setup.notes:
            self.log(note)
        if self.state is None:
            self.initialise()
        else:
            self.optimizer = optimizers.make(a, len(self.setup.experts), self.state.get("optimizer"))
        while self.state["stage"] == "search":
            reason = stop_reason(self.state, a)
            if reason is None:
                self.iterate()
                continue
            self.log(reason)
            self.state["stage"] = "final"
            with INTERRUPTS:
                write_state(self.dir, self.state)
        metrics = self.state.get("final_metrics") if self.state["stage"] == "done" else self.finish()
        self.log(f"done: best model in {os.path.join(self.dir, 'global_best')}")
        return metrics

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.files.trash.empty()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ----------------------------------------------------------------------------------------------------------------
# The search's steps as plain functions over the state

def member_utilities(state):
    return [c["utility"] for c in state["candidates"]]


def initial_recipes(n_experts, size, rng):
    """The initial population as recipes over the experts: each expert as it is, then (--populate_initial_experts)
    crossover children of random pairs of experts up to size members."""
    recipes = [{"parents": [i], "weights": [1.0]} for i in range(n_experts)]
    while len(recipes) < size:
        first, second = rng.choice(n_experts, size=2, replace=False)
        w, w2 = bwr.crossover(rng)
        recipes.append({"parents": [int(first), int(second)], "weights": [float(w), float(w2)]})
    return recipes


def recipe_coefficients(recipe, n_experts):
    """A recipe's weights as coefficients over all the experts."""
    weights = [0.0] * n_experts
    for parent, w in zip(recipe["parents"], recipe["weights"]):
        weights[parent] += w
    return weights


def initial_state(step_length, recipes, results, experts):
    """The state after the initial population's dev evaluation; the starting best is the best initial expert."""
    names = [os.path.basename(path) for path in experts]
    candidates = []
    for recipe, result in zip(recipes, results):
        u, parents, w = result["utility"], [names[p] for p in recipe["parents"]], recipe["weights"]
        origin = parents[0] if len(parents) == 1 else f"crossover {parents[0]}*{w[0]:.3f} + {parents[1]}*{w[1]:.3f}"
        candidates.append({"utility": u, "history": [u], "version": 0, "stale": 0, "origin": origin,
                           "trajectory": [result["projection"]] if "projection" in result else []})
    start = max(range(len(experts)), key=lambda i: candidates[i]["utility"])
    return {
        "state_version": STATE_VERSION, "stage": "search", "iteration": 0, "step_length": step_length,
        "candidates": candidates, "no_improvement": 0, "profile": [],
        # dev_scores, per item: the paired statistics of the final metrics compare the ending best against them
        "starting_best": {"candidate": start, "expert": names[start], "utility": candidates[start]["utility"],
                          "dev_scores": (results[start].get("details") or {}).get("scores")},
        "history": {"best": [], "worst": []}, "emergence": {},
        "evaluations": len(results), "evaluations_history": [len(results)],
    }


def stop_reason(state, args):
    """Why the search stops before another iteration (its line in log.txt), or None to go on."""
    if state["iteration"] >= args.max_iteration:
        return f"reached --max_iteration {args.max_iteration}"
    if patience_exhausted(state["history"]["best"], args.patience):
        return (f"the global best did not change over the last {args.patience} entries of its history "
                f"(--patience): stopping")
    if args.max_evaluations is not None and state["evaluations"] >= args.max_evaluations:
        return f"reached --max_evaluations {args.max_evaluations} ({state['evaluations']} dev evaluations)"
    return None


def outcome_lines(i, candidate, task, result):
    """log.txt's lines about member i's update, if any: the branch of the published step it took, a rejection."""
    lines = []
    branch = bwr.describe_update(task.update)
    if branch:  # which branch of the published step this proposal took
        lines.append(f"candidate_{i}: {branch}: dev utility {result['utility']:.4f} against "
                     f"{candidate['utility']:.4f}, {'kept' if result['accepted'] else 'not kept'}")
    if "dev_items" in result:  # --early_reject: how many dev items decided it
        partial = "partial " if result["rejected_early"] else ""
        lines.append(f"candidate_{i}: proposal {'kept' if result['accepted'] else 'not kept'}, {partial}dev utility "
                     f"{result['utility']:.4f}{decided_by(result)} against {candidate['utility']:.4f}")
    if result.get("rejected") or math.isnan(result["utility"]):
        lines.append(f"candidate_{i}: update rejected ({result.get('rejected') or 'utility is NaN'}); "
                     f"it keeps its weights")
    return lines


def start_early_rejection(state, results, args):
    """--early_reject: each initial member's per-item dev scores, which its proposals are compared with."""
    if args.early_reject is None:
        return
    for c, result in zip(state["candidates"], results):
        c["dev_scores"] = result["details"]["scores"]


def early_rejection(args, state, i, threshold, restart=False):
    """The EarlyReject of member i's next task under --early_reject when it is greedy (a threshold), else None: its
    items ordered against the member's and the population's per-item dev scores, shuffled within their groups by a
    seed of the proposal's own (the search's seed, the last committed iteration, the member, whether a
    restart)."""
    scores = state["candidates"][i].get("dev_scores") if state else None
    if args.early_reject is None or not scores or threshold is None:
        return None
    row = EVAL_TYPES[args.eval_type]
    order, groups = bwr.rejection_order(scores, [c["dev_scores"] for c in state["candidates"]], row.score_range,
                                        [args.seed, 29, state["iteration"], i, int(restart)])
    return EarlyReject(alpha=args.early_reject, member_scores=tuple(scores), score_range=row.score_range,
                       order=tuple(order), groups=tuple(groups), integer_scores=row.integer_scores)


def remember_scores(candidate, result):
    """--early_reject: a member that took an update is compared with the update's per-item dev scores from now on."""
    if "dev_scores" in candidate:
        candidate["dev_scores"] = result["details"]["scores"]


def count_dev_items(args, state, profile, evaluated):
    """--early_reject: the dev items the iteration's proposals were scored on, against a full evaluation of each,
    into its profile (final_metrics.json sums them)."""
    if args.early_reject is None:
        return
    scored = [r["dev_items"] for r in evaluated if "dev_items" in r]
    profile.update(dev_items=sum(scored), dev_items_full=len(scored) * len(state["candidates"][0]["dev_scores"]))


def decided_by(result):
    """--early_reject: on how many dev items a proposal was scored, and whether it was stopped early (its partial
    utility is then the mean of the items its member and the population scored lowest: biased low)."""
    if "dev_items" not in result:
        return ""
    if result["rejected_early"]:
        return (f" on the {result['dev_items']} dev items scored first, its member's weakest (rejected early: it "
                f"cannot be kept)")
    return f" on all {result['dev_items']} dev items"


def take_update(candidate, result):
    """A member after its update was scored: an accepted one moves it to the next version; stale counts the
    iterations since its utility last rose (a refused update, or an accepted one that is no better, adds one)."""
    if result["accepted"]:
        candidate["stale"] = 0 if result["utility"] > candidate["utility"] else candidate["stale"] + 1
        candidate["utility"] = result["utility"]
        remember_scores(candidate, result)
        candidate["version"] += 1
        if "projection" in result:
            candidate["trajectory"].append(result["projection"])
    else:
        candidate["stale"] += 1


def stray_members(candidates, limit, best, room=None):
    """The members whose utility has not risen for limit iterations, the current best excepted; only the first
    room of them when the evaluation budget leaves room for no more."""
    strays = [i for i, c in enumerate(candidates) if c["stale"] >= limit and i != best]
    return strays if room is None else strays[:room]


def record_emergence(state, iteration, results):
    """--correctness_emergence: the per-item dev scores of the members whose weights changed ({i: result})."""
    rows = {}
    for i, result in results.items():
        scores = (result.get("details") or {}).get("scores")
        if scores is not None:
            rows[f"candidate_{i}"] = scores
    state["emergence"].setdefault(str(iteration), {}).update(rows)


def iteration_profile(results, wall, workers, commit=0.0):
    """Seconds of one iteration: wall, the workers' merge / swap / forward / evaluate_other (evaluation outside
    the model: tokenising, decoding, scoring) / write (accepted candidates), summed over workers; commit (the
    driver's state.json, folder moves, scratchpad); driver_ipc: the rest of the wall time (task and result
    transfer, the driver's bookkeeping, and with several workers the time some of them wait for the others)."""
    totals = {"merge": 0.0, "swap": 0.0, "forward": 0.0, "evaluate_other": 0.0, "write": 0.0}
    for result in results:
        for key, value in (result.get("timing") or {}).items():
            totals[key] = totals.get(key, 0.0) + value
    busy = sum(totals.values()) / max(1, workers)
    return {"wall": wall, **totals, "commit": commit, "driver_ipc": max(wall - busy - commit, 0.0)}


def profile_line(profile):
    """log.txt's line about an iteration's profile: seconds, and (--early_reject) dev item counts."""
    return "profile: " + " ".join(f"{key} {value}" if isinstance(value, int) else f"{key} {value:.3f}s"
                                  for key, value in profile.items())


def iteration_line(state, it):
    """log.txt's line about a committed iteration."""
    s, skipped = state, len(state["candidates"]) - len(it.members)
    evaluations = len(it.results) + len(it.restart_results)
    return (f"iteration {it.number}: best {s['best']['utility']:.4f} (candidate_{s['best']['candidate']}) "
            f"worst {s['worst']['utility']:.4f} | accepted {it.accepted}/{len(it.members)}"
            + (f", skipped {skipped}" if skipped else "") + (f", restarted {len(it.restarted)}" if it.restarted else "")
            + f" | step {s['step_length']:.4f} | no improvement for {s['no_improvement']}"
            + f" | {evaluations} evaluations ({s['evaluations']} in all)")


WANDB_PROBE_TIMEOUT = 5.0   # seconds for the W&B server to answer one HTTP request before the search goes offline
WANDB_INIT_TIMEOUT = 60.0   # seconds wandb.init may take in online mode before the search goes offline


def start_wandb(args, setup, directory, log):
    """The W&B run of the search (None when disabled); online falls back to offline when wandb.init fails."""
    mode = setup.wandb_mode
    if setup.wandb_note:
        log(setup.wandb_note)
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    options = dict(project=args.project_name_wb, name=os.path.basename(directory), dir=directory,
                   config=public_args(args), resume="allow", id=os.path.basename(directory).replace(".", "-")[:128],
                   settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT))
    try:
        run = wandb.init(mode=mode, **options)
    except Exception as e:  # noqa: BLE001 - W&B is a record of the search, never a reason to stop it
        if mode != "online":
            raise
        log(f"W&B online start failed ({first_line(e)}); logging offline instead "
            f"(wandb sync {os.path.join(directory, 'wandb')} later)")
        mode = "offline"
        run = wandb.init(mode=mode, **options)
    log(f"W&B logging in {mode} mode (project {args.project_name_wb})")
    return run


def resolve_wandb_mode(requested):
    """(mode, note): the W&B mode the search will use, decided before any directory exists. Default: WANDB_MODE if
    set, else online when logged in and the server answers, else offline. An explicitly requested online mode with
    an unreachable server is refused; an online default falls back to offline (note says so)."""
    explicit = requested or os.environ.get("WANDB_MODE")
    mode = explicit or ("online" if os.environ.get("WANDB_API_KEY") or _wandb_logged_in() else "offline")
    if mode != "online":
        return mode, None
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    problem = _unreachable(url, WANDB_PROBE_TIMEOUT)
    if problem is None:
        return mode, None
    if explicit:
        raise UsageError(f"W&B online mode was requested but {url} does not answer ({problem}): use --wandb_mode "
                         f"offline (wandb sync later) or disabled")
    return "offline", f"W&B server {url} does not answer ({problem}); logging offline (wandb sync later)"


def _unreachable(url, timeout):
    """None when url answers an HTTP request within timeout seconds (any status), else why not. Name resolution
    has no timeout of its own, so the request runs in a thread that is given up on."""
    import http.client
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    outcome = ["no answer within %.0f s" % timeout]

    def probe():
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            connection = kind(parts.hostname or "", parts.port, timeout=timeout)
            connection.request("HEAD", "/")
            connection.getresponse()
            connection.close()
            outcome[0] = None
        except Exception as e:  # noqa: BLE001 - any failure means the server cannot be used
            outcome[0] = first_line(e)
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0]


def _wandb_logged_in():
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


# ----------------------------------------------------------------------------------------------------------------
# The end of a search: the final evaluation (its metrics and the records derived from the state: records.py)

def final_tasks(directory, state):
    """Every member on test, then on dev, then global_best/ on dev and on test (final_metrics reads the results
    in that order); each writes its per-item results beside its weights (golds_preds_<split>.json)."""
    members = [os.path.join(directory, f"candidate_{i}") for i in range(len(state["candidates"]))]
    tasks = [EvaluateTask(path, state["candidates"][i]["version"], split,
                          os.path.join(path, f"golds_preds_{split}.json"))
             for split in ("test", "dev") for i, path in enumerate(members)]
    best_dir = os.path.join(directory, "global_best")
    # global_best/ changes only at commits: the iteration that wrote it is its version
    return tasks + [EvaluateTask(best_dir, state["best"]["iteration"], split,
                                 os.path.join(best_dir, f"golds_preds_{split}.json")) for split in ("dev", "test")]


def patience_exhausted(best_history, patience):
    """The published loop's stopping rule: before an iteration, stop when the global best's history (entry 0: the
    initial population, then one entry per iteration) has more than `patience` entries and its last `patience`
    are equal. That is `patience - 1` iterations without a new global best after one that found one, and
    `patience` iterations when none has since the start."""
    return len(best_history) > patience and len(set(best_history[-patience:])) == 1


SECRET_MARKERS = ("key", "token", "secret", "password")


def public_args(args):
    """Arguments as recorded in args.json and W&B: nothing that looks like a secret, and not --resume."""
    out = {}
    for key, value in vars(args).items():
        if key == "resume":
            continue
        if any(marker in key.lower() for marker in SECRET_MARKERS):
            continue
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entry point

def explicit_flags(argv):
    """Names of the flags the user actually typed (argparse fills defaults, so parse once more without them)."""
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    return set(vars(shadow.parse_args(argv)).keys())


def args_checksum(recorded):
    """sha256 of the recorded arguments (without the checksum itself): written into args.json at the start, so a
    resume can tell the arguments it started with from damaged or edited ones."""
    body = {key: value for key, value in recorded.items() if key != "args_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_resume_file(directory, name):
    """A JSON object from the search directory, or a UsageError saying why it cannot be trusted."""
    value, problem = read_json_object(os.path.join(directory, name))
    if problem:
        raise UsageError(f"--resume {directory}: {name} is damaged ({problem}); it cannot be resumed, "
                         f"start a new search")
    return value


# what resume needs before anything else in state.json can be read: key -> accepted types
STATE_FIELDS = {"state_version": int, "stage": str, "iteration": int, "candidates": list}


def upgrade_versions(state):
    """A member's version counts the changes of its weights (0: initial; an accepted update or restart adds 1); the
    workers cache adapters by (path, version). A state.json written before numbered them by iteration, k + 0.5 for a
    restart in iteration k: those are doubled into integers in the same order. Resumed workers start with empty
    caches, so only the order and the equality of best["version"] with its candidate's matter."""
    best = state.get("best") or {}
    if all(isinstance(v, int) for v in [c["version"] for c in state["candidates"]] + [best.get("version", 0)]):
        return
    for c in state["candidates"]:
        c["version"] = int(2 * c["version"])
    if "version" in best:
        best["version"] = int(2 * best["version"])


def check_state(directory, state, recorded):
    """Refuse (one line) a state.json that is not this search's, or not a state this version can continue."""
    def damaged(what):
        return UsageError(f"--resume {directory}: state.json is damaged ({what}); it cannot be resumed, start a new "
                          f"search")
    if state.get("state_version") != STATE_VERSION:
        raise damaged(f"state_version {state.get('state_version')!r}, this version resumes {STATE_VERSION}")
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise damaged(f"{key!r} missing or not {getattr(kind, '__name__', 'a number')}")
    if state["stage"] not in ("search", "final", "done"):
        raise damaged(f"unknown stage {state['stage']!r}")
    if state.get("args_sha256") != recorded["args_sha256"]:
        raise damaged("it belongs to other arguments than args.json")
    for i, candidate in enumerate(state["candidates"]):
        if not isinstance(candidate, dict) or not isinstance(candidate.get("utility"), (int, float)) \
                or not isinstance(candidate.get("history"), list):
            raise damaged(f"candidate {i} has no utility or history")
    if not isinstance(state.get("pending_moves", []), list):
        raise damaged("'pending_moves' is not a list")


def prepare(argv, start_workers=True):
    """Parse and validate; returns (args, setup, directory, state, pool, lock). Creates no file before validation
    passed: for a new search directory, state and lock are None (main creates and locks it). A resumed directory is
    locked before anything in it is read or changed (lock; released if validation fails). The local workers are
    started part-way through validation (validate_args) and killed if it fails; start_workers=False only validates
    (pool None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started, held = [], []

    def early_start(devices, merge_params):
        if start_workers and args.backend == "local":
            config = {**worker_config(args, devices, merge_params), "preload": True}
            started.append(LocalPool(devices, config, wait=False))
    try:
        args, setup, directory, state = _prepare(args, argv, early_start, held)
    except BaseException:
        for pool in started:
            pool.kill()
        for lock in held:
            lock.release(untouched=True)
        raise
    return args, setup, directory, state, (started[0] if started else None), (held[0] if held else None)


def _prepare(args, argv, start_workers, held):
    if args.resume:
        directory = args.resume.rstrip("/")
        if not os.path.isfile(os.path.join(directory, "args.json")):
            raise UsageError(f"--resume {args.resume}: not a search directory (no args.json)")
        if not args.lock_wait >= 0:
            raise UsageError(f"--lock_wait must be >= 0 seconds (got {args.lock_wait:g})")
        held.append(lock_search_dir(directory, args.lock_wait))
        recorded = read_resume_file(directory, "args.json")
        if recorded.get("args_sha256") != args_checksum(recorded):
            raise UsageError(f"--resume {directory}: args.json was edited or damaged (its checksum does not match "
                             f"its arguments); a search resumes only with the arguments it started with: start a new "
                             f"search for other ones")
        given = explicit_flags(argv) - {"resume"}
        recorded.setdefault("scoring", "strict")  # searches recorded before --scoring existed used the strict rules
        refused = sorted(f for f in given if f not in RESUMABLE_OVERRIDES and getattr(args, f) != recorded.get(f))
        if refused:
            raise UsageError(f"--resume cannot change --{', --'.join(refused)}; only "
                             f"{', '.join('--' + f for f in sorted(RESUMABLE_OVERRIDES))} may change")
        for key, value in recorded.items():
            if key not in given and hasattr(args, key):
                setattr(args, key, value)
        args.resume = directory
        state = None
        if os.path.exists(os.path.join(directory, "state.json")):
            state = read_resume_file(directory, "state.json")
            check_state(directory, state, recorded)
            upgrade_versions(state)
        setup = validate_args(args, start_workers)
        if state is not None:
            apply_moves(state.get("pending_moves", []))
            state["pending_moves"] = []
            missing = [name for name in [f"candidate_{i}" for i in range(len(state["candidates"]))] + ["global_best"]
                       if not os.path.isdir(os.path.join(directory, name))]
            if missing and state["stage"] != "done":
                raise UsageError(f"--resume {directory}: {missing[0]}/ is missing; the search cannot continue "
                                 f"without its population")
        return args, setup, directory, state
    setup = validate_args(args, start_workers)
    root = args.output_root
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to {root}/ ({e.strerror}); choose another --output_root") from None
    return args, setup, None, None


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM end the search with KeyboardInterrupt, but never inside a commit: a signal that
    arrives while the state and its folders are written is held until the commit is complete. Both handlers are
    installed explicitly, so an ignored SIGINT inherited from a parent (nohup, some job runners) is not kept."""

    def __init__(self):
        self.shielded = 0
        self.held = None
        self.received = None

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = signum
        if self.shielded:
            self.held = signum
            return
        raise KeyboardInterrupt

    def __enter__(self):
        self.shielded += 1

    def __exit__(self, kind, value, traceback):
        self.shielded -= 1
        if not self.shielded and self.held is not None and kind is None:
            self.held = None
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def describe_fault(error):
    """One line for an error that stopped a running search."""
    if isinstance(error, OSError) and not isinstance(error, (WorkerError,)):
        where = f"cannot write {error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or first_line(error)}"
    return first_line(error)


def tidy(directory):
    """After a fault or a signal: finish a commit that state.json records as begun (its moves are idempotent), then
    remove what only a running search uses (.staging/, .trash/, temporary files). The state on disk is then the
    last committed iteration, and --resume continues from it."""
    try:
        with open(os.path.join(directory, "state.json")) as f:
            apply_moves(json.load(f).get("pending_moves", []))
    except (OSError, ValueError, AttributeError):
        pass
    for name in (".staging", ".trash", ".global_worst.new"):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    for name in os.listdir(directory):
        if name.startswith(".") and ".tmp" in name:
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def end_after_fault(error, search, directory, fresh):
    """After a signal or a fault in a running search: close it, then either remove a fresh directory that holds
    nothing worth resuming, or tidy the directory for --resume; one line on stderr. Returns the exit status."""
    interrupted = isinstance(error, KeyboardInterrupt)
    signum = INTERRUPTS.received or signal.SIGINT
    what = f"interrupted ({signal.Signals(signum).name})" if interrupted else f"error: {describe_fault(error)}"
    with INTERRUPTS:  # a second Ctrl-C must not cut the tidying short
        if search is not None:
            try:
                search.close()
            except Exception:  # noqa: BLE001 - the first fault is the one to report
                pass
        if directory is None or (not os.path.exists(os.path.join(directory, "state.json"))
                                 and (fresh or search is None)):
            # nothing worth resuming was written: leave no half-made search directory behind
            if fresh and directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            print(f"search.py: {what} (before the first candidates were saved"
                  + (f"; {directory} removed)" if fresh and directory else ")"), file=sys.stderr)
        else:
            tidy(directory)
            hint = f"state saved. Resume with: python search.py --resume {directory}"
            try:
                search.log(what)
                search.log(hint)
            except (OSError, AttributeError):
                pass
            print(f"search.py: {what}; {hint}", file=sys.stderr)
        INTERRUPTS.held = None
    return 128 + signum if interrupted else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    INTERRUPTS.install()
    try:
        args, setup, directory, state, pool, lock = prepare(argv)
    except UsageError as e:
        print(f"search.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("search.py: interrupted before the search started; nothing was written", file=sys.stderr)
        return 128 + (INTERRUPTS.received or signal.SIGINT)
    fresh = directory is None
    search = None
    try:
        if fresh:
            directory = new_search_dir(args.output_root, args.name)
            lock = DirectoryLock(directory)  # before the first file: from then on a --resume of it may be typed
            recorded = public_args(args)
            recorded["args_sha256"] = args_checksum(recorded)
            write_json(os.path.join(directory, "args.json"), recorded)
        search = Search(args, setup, directory, read_json(os.path.join(directory, "args.json"))["args_sha256"], state,
                        pool)
        print(f"log: {os.path.join(directory, 'log.txt')}", flush=True)
        search.log(f"{'resuming' if args.resume else 'starting'} search in {directory}")
        if lock.previous:
            p = lock.previous
            search.log(f"took over {directory} from search.py pid {p.get('pid')} on {p.get('host')} (holding it since "
                       f"{p.get('since')}), which ended without releasing it: killed or crashed")
        if setup.ignored:
            search.log(f"ignored sub-folders of {args.initial_expert_directory} (no adapter/model): "
                       f"{', '.join(setup.ignored)}")
        search.run()
        return 0
    except (KeyboardInterrupt, WorkerError, merge.MergeError, OSError) as e:
        return end_after_fault(e, search, directory, fresh)
    finally:
        if search is not None:
            search.close()
        elif pool is not None:  # refused before the search took the workers over (e.g. args.json not writable)
            pool.kill()
        if lock is not None:
            lock.release()  # last: the directory is complete (tidied, or removed) when the next owner may take it


def exit_at_once(code):
    """Leave without the interpreter's teardown, which takes about a second with torch and transformers loaded.
    main() has closed what needs closing by the time it returns (log lines are written whole, the workers are
    joined, .trash/ emptied); W&B and Ray register exit hooks of their own, so a search that loaded either exits the
    normal way."""
    if "wandb" in sys.modules or "ray" in sys.modules:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_at_once(main())
