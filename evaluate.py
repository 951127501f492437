"""Evaluation: (candidate, eval type, dataset) -> one scalar utility, higher is better.

The base model stays resident: `get_host(base_model, gpu_id)` loads it once per (base model, device, dtype) and
every candidate is swapped into it in place. A candidate (`model_path`) is one of

    - a peft adapter folder (adapter_model.safetensors + adapter_config.json),
    - an in-memory adapter: a state dict with peft's saved tensor names, or a (state dict, adapter config) pair
      (a bare state dict reuses the LoRA layout of the adapter loaded before it, so the first in-memory candidate
      of a process must come with its config),
    - a full-model folder (--fast_merge 0): its safetensors are copied into the resident model's tensors,
    - None: the base model itself.

`evaluate()` scores the dev split and `evaluate_test()` the test split (the seed's two public functions); both
call `evaluate_split()`, which returns (utility, details) and is what the search's workers use. `score()` holds one
`if eval_type == ...` branch per evaluation type, each returning a `Scored` (utility and per-item results).

Adding your evaluation
----------------------
Two additions (docs/extending.md has the worked example its test runs): a row in
data/schema.py's EVAL_TYPES (item kind, what the utility is, a help line, whether the items have gold answers that
ensembles can vote on), which search.py's -e, the data validation and the ensembles read; and an
`elif eval_type == "<yours>":` branch in score(), just above its final `else:`. The branch has `model` and
`tokenizer` set up for the candidate, `dataset` and `split` ("dev" or "test"); it reads the validated items with
`load_data(dataset, eval_type)[split]`, generates with `batch_generate()` (plain prompts) or
`batch_generate_chat_template()` (chat), and returns `Scored(utility, golds, preds, scores)`, whose per-item
lists become golds_preds_{dev,test}.json and feed the ensembles.

Options are set once per process with `configure(...)` (the search's workers do it from the CLI flags).
"""

import inspect
import json
import logging
import math
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from data.schema import EVAL_TYPES, DataError, load_eval_data

log = logging.getLogger("bwr.evaluate")


class EvalError(ValueError):
    """A bad option, candidate, device, dataset or missing credential; the message is one actionable line."""


# ----------------------------------------------------------------------------------------------------------------
# Options

DEFAULT_REWARD_MODEL = "internlm/internlm2-7b-reward"
DEFAULT_JUDGE_MODEL = "gemini-1.5-flash"
RM_EVAL_TYPES = ("rm_default", "rm_verbose", "rm_concise")
# How an answer is read from a generation (docs/objectives.md, "Scoring"): "published" reproduces the published evaluator, so
# utilities compare with the paper's numbers; "strict" reads the answer where the model gives it (fewer false hits).
SCORING_MODES = ("published", "strict")

_DEFAULT_OPTIONS = {
    "batch_size": None,            # None: 16 on a GPU (sized for a 7B model), 32 on CPU
    "mc_scoring": "generate",      # or "logits": one forward pass, best option letter by next-token log-prob
    "scoring": "published",        # answer extraction: "published" (the published evaluator's rules) or "strict"
    "reward_model": DEFAULT_REWARD_MODEL,
    "trust_remote_code": False,
    "judge_model": DEFAULT_JUDGE_MODEL,
    "dtype": None,                 # None: bf16 on GPUs that support it, else fp16; fp32 on CPU
    "data_dir": "data/eval",
    "max_new_tokens": None,        # None: per-objective defaults (MAX_NEW_TOKENS, derived for exact match)
    "perspective_qps": 1.0,        # Perspective API's default quota is 1 query per second
    "judge_qps": 2.0,
    "api_retries": 6,              # attempts after the first on HTTP 429/5xx and connection errors
    "api_backoff_s": 1.0,          # first retry delay; doubles each time (with jitter)
    "api_timeout_s": 30.0,         # one request to Perspective or Vertex AI; with the retries, a dead network ends
                                   # the search with one line after (api_retries + 1) * api_timeout_s + backoff
    "lm_eval_include_path": None,  # -e lm_eval: folder of the user's task YAMLs (harness.py)
    "lm_eval_dev_limit": None,     # -e lm_eval: dev documents per task, a seeded draw (None: the whole split)
}
OPTIONS = dict(_DEFAULT_OPTIONS)
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}

# Generation budgets per objective. Exact match derives its own from the gold answers unless listed here.
MAX_NEW_TOKENS = {"multiple_choice": 10, "AbstainQA": 10, "abstain_reflection": 10, "external_api": 20,
                  "rm": 200, "human": 512, "last_number": 200}

# Network boundary, replaceable in tests: the httplib2-like object handed to googleapiclient's build(http=...),
# and the factory that returns a Gemini client object with generate_content(prompt, generation_config=...).
PERSPECTIVE_HTTP = None
JUDGE_MODEL_FACTORY = None


def configure(**options):
    """Set per-process options; options not passed keep their current value. `configure(reset=True)` restores
    every default first. Options: batch_size, mc_scoring, scoring, reward_model, trust_remote_code, judge_model, dtype,
    data_dir, max_new_tokens, perspective_qps, judge_qps, api_retries, api_backoff_s, api_timeout_s,
    lm_eval_include_path, lm_eval_dev_limit."""
    if options.pop("reset", False):
        OPTIONS.clear()
        OPTIONS.update(_DEFAULT_OPTIONS)
    unknown = sorted(set(options) - set(_DEFAULT_OPTIONS))
    if unknown:
        raise EvalError(f"unknown evaluate option(s) {unknown}; choose from {sorted(_DEFAULT_OPTIONS)}")
    checks = {
        "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
        "mc_scoring": (lambda v: v in ("generate", "logits"), "'generate' or 'logits'"),
        "scoring": (lambda v: v in SCORING_MODES, " or ".join(repr(m) for m in SCORING_MODES)),
        "reward_model": (lambda v: isinstance(v, str) and v, "a model name or folder"),
        "trust_remote_code": (lambda v: isinstance(v, bool), "True or False"),
        "judge_model": (lambda v: isinstance(v, str) and v, "a Gemini model name"),
        "dtype": (lambda v: v is None or v in _DTYPES, f"None or one of {sorted(_DTYPES)}"),
        "data_dir": (lambda v: isinstance(v, (str, os.PathLike)), "a folder path"),
        "max_new_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
        "perspective_qps": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "judge_qps": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "api_retries": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "api_backoff_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "api_timeout_s": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "lm_eval_include_path": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "None or a folder path"),
        "lm_eval_dev_limit": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
    }
    for name, value in options.items():
        ok, expect = checks[name]
        if not ok(value):
            raise EvalError(f"evaluate option {name}={value!r} is invalid: expected {expect}")
    if "data_dir" in options and os.fspath(options["data_dir"]) != os.fspath(OPTIONS["data_dir"]):
        _DATA_CACHE.clear()
    OPTIONS.update(options)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------------------------
# Devices and dtypes

def resolve_device(gpu_id):
    """gpu_id int (or digit string) -> cuda:N, "cpu" -> CPU. A GPU that is not visible is an error, never a fallback."""
    if isinstance(gpu_id, torch.device):
        gpu_id = "cpu" if gpu_id.type == "cpu" else gpu_id.index or 0
    if isinstance(gpu_id, str) and gpu_id.strip().lower() == "cpu":
        return torch.device("cpu")
    if isinstance(gpu_id, str) and gpu_id.strip().isdigit():
        gpu_id = int(gpu_id)
    if not _is_int(gpu_id) or gpu_id < 0:
        raise EvalError(f"gpu_id must be a GPU index (0, 1, ...) or 'cpu', got {gpu_id!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise EvalError(f"GPU {gpu_id} requested but no CUDA GPU visible; use -g cpu")
    if gpu_id >= count:
        raise EvalError(f"GPU {gpu_id} requested but only {','.join(map(str, range(count)))} visible")
    return torch.device(f"cuda:{gpu_id}")


def resolve_dtype(device):
    if OPTIONS["dtype"] is not None:
        return _DTYPES[OPTIONS["dtype"]]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Timing shared by every call: how much of an evaluation is model forward passes vs everything else

_STATE = {"forward_seconds": 0.0, "swap_seconds": 0.0}


@contextmanager
def forward_timer(device):
    """Adds the wall time of the enclosed model call to the current evaluation's forward_seconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous; count them where they run
        _STATE["forward_seconds"] += time.perf_counter() - start


def _model_device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------------
# The resident model

class ModelHost:
    """One base model on one device, with a LoRA slot that candidates are copied into.

    Adapters are written into the existing LoRA parameters in place; a candidate with another rank, target set or
    scaling rebuilds the slot. Full-model candidates are copied into the base tensors; a CPU copy of the base
    weights is taken the first time that happens so later adapter candidates start from the true base again.
    """

    def __init__(self, base_model, device, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.base_name, self.device, self.dtype = base_model, device, dtype
        trust = OPTIONS["trust_remote_code"]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=trust)
        except OSError as e:
            raise EvalError(f"cannot load base model {base_model!r}: {_first_line(e)}") from None
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise EvalError(f"base model {base_model!r} needs custom code; pass --trust_remote_code") from None
            raise
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = model.to(device).eval()
        self.peft = None              # PeftModel wrapping self.base once an adapter was loaded
        self.slot = None              # peft saved name -> tensor sharing storage with the LoRA parameter
        self.slot_signature = None
        self.adapter_enabled = None   # whether the LoRA layers are switched on (None: not known, set on next use)
        self.base_backup = None       # CPU copy of the base weights, only once a full model was loaded
        self.base_dirty = False       # resident weights are a full-model candidate's, not the base model's
        self.full_loaded = None       # identity of the full-model candidate currently in the base tensors

    @property
    def model(self):
        return self.peft if self.peft is not None else self.base

    # -- candidates
    def load(self, candidate):
        """Put a candidate into the resident model; returns the model to run."""
        start = time.perf_counter()
        try:
            if candidate is None:
                self._restore_base()
                self._set_adapter_enabled(False)
            elif isinstance(candidate, dict):
                self._load_adapter(candidate, None, "in-memory adapter")
            elif isinstance(candidate, (tuple, list)) and len(candidate) == 2 and isinstance(candidate[0], dict):
                self._load_adapter(candidate[0], candidate[1], "in-memory adapter")
            elif isinstance(candidate, (str, os.PathLike)):
                path = os.fspath(candidate)
                if os.path.isfile(os.path.join(path, "adapter_config.json")):
                    state, config = _read_adapter_folder(path)
                    self._load_adapter(state, config, path)
                elif os.path.isdir(path):
                    self._load_full_model(path)
                else:
                    raise EvalError(f"candidate {path!r} not found (expected an adapter or full-model folder)")
            else:
                raise EvalError(f"model_path must be a folder, an adapter state dict or (state, config), "
                                f"got {type(candidate).__name__}")
        finally:
            _STATE["swap_seconds"] += time.perf_counter() - start
        return self.model

    def _load_adapter(self, state, config, label):
        from peft import LoraConfig
        if config is not None and not isinstance(config, LoraConfig):
            config = _lora_config(config, label)
        if config is None and self.slot is None:
            raise EvalError(f"{label}: no LoRA slot built yet in this process to take a bare state dict; "
                            f"pass (state, adapter_config) so the slot can be built")
        signature = _adapter_signature(state, config if config is not None else self._slot_config())
        if signature != self.slot_signature:
            if config is None:
                raise EvalError(f"{label}: its tensors do not fit the resident LoRA slot (other rank or targets); "
                                f"pass (state, adapter_config) so the slot can be rebuilt")
            self._build_slot(config, label)
            if signature != self.slot_signature:
                missing = sorted(set(self.slot) - set(state))[:2]
                extra = sorted(set(state) - set(self.slot))[:2]
                raise EvalError(f"{label}: tensors do not match its adapter_config on base model {self.base_name!r}"
                                f" (missing {missing}, unexpected {extra})")
        self._restore_base()
        with torch.no_grad():
            for name, target in self.slot.items():
                target.copy_(state[name])
        self._set_adapter_enabled(True)

    def _slot_config(self):
        return self.peft.peft_config["default"] if self.peft is not None else None

    def _build_slot(self, config, label):
        from peft import get_peft_model
        from peft.utils import get_peft_model_state_dict
        if self.peft is not None:
            self.base = self.peft.unload()  # drops the LoRA layers, base weights untouched
            self.peft = None
        try:
            self.peft = get_peft_model(self.base, config).eval()
        except ValueError as e:
            raise EvalError(f"{label}: cannot apply its LoRA config to {self.base_name!r}: {_first_line(e)}") from None
        # state_dict() tensors share storage with the parameters, so copying into them updates the model
        self.slot = get_peft_model_state_dict(self.peft)
        self.adapter_enabled = None  # set by the next _set_adapter_enabled
        self.slot_signature = _adapter_signature(self.slot, config)

    def _set_adapter_enabled(self, enabled):
        # only on a change: peft walks every module to switch its LoRA layers (2 ms a candidate on the tiny model)
        if self.peft is not None and self.adapter_enabled != enabled:
            self.adapter_enabled = enabled
            if enabled:
                self.peft.base_model.enable_adapter_layers()
            else:
                self.peft.base_model.disable_adapter_layers()

    def _base_tensors(self):
        """Base-model tensor name (as a full-model checkpoint spells it) -> resident tensor."""
        model = self.peft.base_model.model if self.peft is not None else self.base
        tensors = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if ".lora_" in name or "lora_magnitude_vector" in name:
                continue
            tensors[name.replace(".base_layer.", ".")] = tensor
        return tensors

    def _restore_base(self):
        if not self.base_dirty:
            return
        with torch.no_grad():
            for name, tensor in self._base_tensors().items():
                tensor.copy_(self.base_backup[name])
        self.base_dirty = False
        self.full_loaded = None

    def _load_full_model(self, path):
        from safetensors import safe_open
        files = _full_model_files(path)
        identity = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
        if identity == self.full_loaded:
            self._set_adapter_enabled(False)
            return
        tensors = self._base_tensors()
        if self.base_backup is None:
            self.base_backup = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        covered = set()
        self.base_dirty = True  # from the first copied tensor on, the resident weights are no longer the base's
        self.full_loaded = None
        with torch.no_grad():
            for file in files:
                with safe_open(file, framework="pt", device="cpu") as f:  # one shard in memory at a time
                    for name in f.keys():
                        if name not in tensors:
                            raise EvalError(f"full model {path!r}: tensor {name!r} is not in base model "
                                            f"{self.base_name!r}; is it the same architecture?")
                        value = f.get_tensor(name)
                        if tuple(value.shape) != tuple(tensors[name].shape):
                            raise EvalError(f"full model {path!r}: tensor {name!r} has shape {tuple(value.shape)},"
                                            f" base model has {tuple(tensors[name].shape)}")
                        tensors[name].copy_(value)
                        covered.add(tensors[name].data_ptr())
        # tied weights (e.g. lm_head = embed_tokens) are stored once; any other gap would keep stale weights
        missing = [n for n, t in tensors.items() if t.data_ptr() not in covered]
        if missing:
            raise EvalError(f"full model {path!r} lacks {len(missing)} base tensor(s), e.g. {missing[0]!r}")
        self.full_loaded = identity
        self._set_adapter_enabled(False)


_HOSTS = {}


def get_host(base_model, gpu_id):
    """The resident model for (base model, device, dtype); loaded on first use, then reused."""
    device = resolve_device(gpu_id)
    dtype = resolve_dtype(device)
    key = (os.path.abspath(base_model) if os.path.isdir(os.fspath(base_model)) else base_model, str(device), dtype)
    if key not in _HOSTS:
        _HOSTS[key] = ModelHost(os.fspath(base_model), device, dtype)
    return _HOSTS[key]


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_adapter_folder(path):
    # one reader of adapter folders (merge.load_adapter); its errors become evaluation errors here
    from merge import MergeError, load_adapter
    try:
        return load_adapter(path)
    except MergeError as e:
        raise EvalError(str(e)) from None


def _lora_config(config, label):
    import dataclasses
    from peft import LoraConfig
    if not isinstance(config, dict):
        raise EvalError(f"{label}: adapter config must be a dict or LoraConfig, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise EvalError(f"{label}: only LoRA adapters are supported, got peft_type {config.get('peft_type')!r}")
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        return LoraConfig(**{k: v for k, v in config.items() if k in names and k != "peft_type"})
    except (TypeError, ValueError) as e:
        raise EvalError(f"{label}: invalid adapter config: {_first_line(e)}") from None


def _adapter_signature(state, config):
    """What decides whether a state fits the LoRA slot as built: tensor names and shapes, and the scaling."""
    if config is None:
        return None
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in state.items()))
    return shapes, (config.r, config.lora_alpha, bool(config.use_rslora), bool(getattr(config, "use_dora", False)),
                    json.dumps(config.rank_pattern or {}, sort_keys=True),
                    json.dumps(config.alpha_pattern or {}, sort_keys=True))


def _full_model_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"full model {path!r}: unreadable model.safetensors.index.json: {_first_line(e)}") from None
        files = [os.path.join(path, s) for s in shards]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise EvalError(f"full model {path!r}: shard {os.path.basename(absent[0])} is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(n.endswith(".bin") for n in os.listdir(path)):
        raise EvalError(f"full model {path!r} has only .bin weights; save it with safe_serialization=True")
    raise EvalError(f"{path!r} is neither an adapter (adapter_config.json) nor a full model (model.safetensors)")


# ----------------------------------------------------------------------------------------------------------------
# Generation helpers (every objective gets its model output from these two)

_ENCODED = {}


def encode(tokenizer, texts, add_special_tokens=True):
    """Token ids of each text. The same prompts come back for every candidate of a search, so the last few lists
    are kept (tokenizing is the largest cost outside the model on small models)."""
    key = (id(tokenizer), add_special_tokens, tuple(texts))
    if key not in _ENCODED:
        if len(_ENCODED) >= 16:
            del _ENCODED[next(iter(_ENCODED))]
        _ENCODED[key] = tokenizer(list(texts), add_special_tokens=add_special_tokens).input_ids if texts else []
    return _ENCODED[key]


def batch_generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=None):
    """Greedy continuations of plain prompts, stripped, in the order of `prompts`."""
    return _generate(model, tokenizer, encode(tokenizer, prompts), max_new_tokens, batch_size)


def batch_generate_chat_template(model, tokenizer, prompts, max_new_tokens=512, batch_size=None):
    """Greedy replies to prompts sent as one user turn through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError("this objective needs a chat model, but the base model's tokenizer has no chat_template")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    # the template already holds the BOS token
    return _generate(model, tokenizer, encode(tokenizer, texts, add_special_tokens=False), max_new_tokens, batch_size)


def _batch_size(requested, device, fits=None):
    """Rows per batch: the caller's or --batch_size when given (an explicit override), else `fits` (how many rows
    the free memory holds, from _rows_that_fit) when the caller knows its rows' shapes, else 16 on GPU / 32 on CPU;
    never above the cap that an out-of-memory error set for the device."""
    size = requested or OPTIONS["batch_size"] or fits or (16 if device.type == "cuda" else 32)
    host_cap = _OOM_CAP.get(str(device))
    return min(size, host_cap) if host_cap else size


# share of the device's free memory that one batch may take: a CPU worker shares the machine's memory with the
# other workers and the driver; on a GPU the out-of-memory halving below catches an estimate that was too low
AUTO_BATCH_MEMORY_SHARE = {"cpu": 0.25, "cuda": 0.5}


def _row_bytes(model, width, new_tokens, logits_rows=1):
    """Upper estimate of the memory one row of a batch takes: its keys/values for width + new_tokens positions,
    the largest per-layer activation of the prompt pass (MLP intermediate, attention scores) and its logits."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    element = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    positions = width + new_tokens
    keys_values = 2 * config.num_hidden_layers * kv_heads * head_dim * positions * element
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    activations = width * (4 * config.hidden_size + 3 * intermediate) * element + heads * width * width * 4
    logits = 2 * logits_rows * config.vocab_size * 4
    return keys_values + activations + logits


def _free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def _rows_that_fit(model, count, width, new_tokens, logits_rows=1):
    """How many rows one batch may hold (at least 1, at most count): AUTO_BATCH_MEMORY_SHARE of the device's free
    memory over _row_bytes. One batch per candidate when the whole set fits: on CPU 100 rows in one batch are
    1.5-2x faster than 4 batches of 32 on the tiny model (DESIGN.md, Performance)."""
    device = _model_device(model)
    share = AUTO_BATCH_MEMORY_SHARE.get(device.type, AUTO_BATCH_MEMORY_SHARE["cuda"])
    rows = int(share * _free_memory(device) // _row_bytes(model, width, new_tokens, logits_rows))
    return max(1, min(count, rows))


_OOM_CAP = {}


def _injected_oom(size):
    """Fault injection for the tests, as search.py's crash_point: BWR_OOM_ABOVE=n makes every batch of more than n
    items fail with CUDA's out-of-memory error, as a device short of memory would, on any device."""
    limit = os.environ.get("BWR_OOM_ABOVE")
    if limit and size > int(limit):
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by BWR_OOM_ABOVE={limit})")


def _in_batches(model, count, order, batch_size, run, fits=None):
    """Runs run(indices) over `order` in chunks; on CUDA OOM halves the chunk and retries (remembered per device).
    fits: rows per batch that memory allows (_rows_that_fit), used when no batch size was asked for."""
    device = _model_device(model)
    size = _batch_size(batch_size, device, fits)
    start = 0
    while start < count:
        chunk = order[start:start + size]
        try:
            _injected_oom(len(chunk))
            run(chunk)
        except torch.OutOfMemoryError:
            if size == 1:
                raise EvalError(f"CUDA out of memory on {device} even at batch size 1; use a smaller model, "
                                f"fewer tokens (max_new_tokens) or another GPU") from None
            size = max(1, size // 2)
            _OOM_CAP[str(device)] = size
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory on %s: batch size lowered to %d", device, size)
            continue
        start += len(chunk)


def _left_pad(rows, pad_id, device):
    # filled in numpy and converted once: a torch tensor per row cost 40 us each, 4% of a tiny-model evaluation
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        if row:
            input_ids[j, width - len(row):] = row
            mask[j, width - len(row):] = 1
    return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)


def _generate(model, tokenizer, ids, max_new_tokens, batch_size):
    if not ids:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    max_new_tokens = int(max_new_tokens)
    decode = _greedy_decode if _plain_decoder(model) else _generate_decode
    outputs = [None] * len(ids)
    # longest first: similar lengths share a batch (less padding), and an OOM shows up on the first batch
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))

    texts = {}  # token ids -> text: rows often give the same answer (a 40 us decode each, 4% of a tiny evaluation)

    def run(chunk):
        rows = [ids[i] for i in chunk]
        new_tokens = decode(model, rows, max_new_tokens, pad_id, eos, tokenizer.bos_token_id)
        # only what scoring reads: the tokens before the first end-of-sequence (-1 from it on), each distinct
        # answer decoded once (a Python loop over the rows' tokens was 2% of a tiny-model evaluation)
        after_end = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device)).cumsum(dim=1) > 0
        for i, answer in zip(chunk, map(tuple, new_tokens.masked_fill(after_end, -1).tolist())):
            if answer not in texts:
                texts[answer] = tokenizer.decode([t for t in answer if t >= 0], skip_special_tokens=True).strip()
            outputs[i] = texts[answer]

    _in_batches(model, len(ids), order, batch_size, run,
                fits=_rows_that_fit(model, len(ids), len(ids[order[0]]), max_new_tokens))
    return outputs


def _plain_decoder(model):
    """Whether greedy decoding can run the model's forward directly (_greedy_decode): a transformers decoder class
    whose forward names cache, position_ids and logits_to_keep (a forward taking **kwargs would silently drop one)
    and that uses a DynamicCache. Others (custom code, recurrent caches) go through generate()."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base)
    supports_cache = getattr(cls, "_supports_default_dynamic_cache", None)
    return (cls.__module__.startswith("transformers.models.") and supports_cache is not None and supports_cache()
            and {"cache", "attention_mask", "position_ids", "logits_to_keep"}
            <= set(inspect.signature(base.forward).parameters))


def _greedy_decode(model, rows, max_new_tokens, pad_id, eos, bos_id):
    """New tokens of greedy decoding for each row of token ids, rows that ended padded with pad_id: the same tokens
    as generate() with do_sample=False (tests/test_evaluate.py compares them), without its per-call set-up and
    per-step bookkeeping (8-12% of a tiny-model evaluation on CPU, DESIGN.md, Performance). Identical prompts are run
    once, prefixes that prompts share are run once (_prefix_levels), and decoding stops as soon as every row has
    ended."""
    device = _model_device(model)
    distinct = list(dict.fromkeys(map(tuple, rows)))
    levels = _prefix_levels(distinct, pad_id, shared=_layers_take_holes(model))
    with torch.inference_mode(), forward_timer(device):
        logits, cache, mask, positions = _prefill(model, levels)
        eos = torch.tensor(eos, device=device)
        new_tokens = torch.full((len(distinct), max_new_tokens), pad_id, dtype=torch.long, device=device)
        rows_left = torch.arange(len(distinct), device=device)  # the rows of `distinct` still in the batch
        ended = torch.zeros(len(distinct), dtype=torch.bool, device=device)
        positions = positions[:, -1:]
        step = -1  # no new token asked for: empty answers
        for step in range(max_new_tokens):
            if step:
                logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1).masked_fill(ended, pad_id)
            new_tokens[rows_left, step] = token
            ended |= torch.isin(token, eos)
            if bool(ended.all()):
                break
            if 2 * int(ended.sum()) >= len(ended):
                # half the batch has answered: the rows still generating go on alone (a decoding step costs
                # per row, and often a few long answers keep a batch going after most rows have stopped)
                keep = (~ended).nonzero().squeeze(1)
                cache.reorder_cache(keep)
                mask, positions, token = mask[keep], positions[keep], token[keep]
                rows_left, ended = rows_left[keep], ended[keep]
            tokens, positions = token[:, None], positions + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        new_tokens = new_tokens[:, :step + 1]
    if len(distinct) == len(rows):
        return new_tokens
    where = {row: j for j, row in enumerate(distinct)}
    return new_tokens[torch.tensor([where[tuple(row)] for row in rows], device=device)]


def _prefill(model, levels):
    """Runs the levels of _prefix_levels: (last-position logits, cache, mask, position_ids) of the last level, one
    row per row of it."""
    from transformers import DynamicCache
    device = _model_device(model)
    cache = DynamicCache(config=model.config)
    for input_ids, level_mask, positions, parents in levels:
        if parents is None:
            mask = level_mask.to(device)
        else:  # each node continues from its parent's keys/values: copy them into the node's row
            parents = parents.to(device)
            cache.reorder_cache(parents)
            mask = torch.cat([mask.index_select(0, parents), level_mask.to(device)], dim=1)
        positions = positions.to(device)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, mask, positions


def _generate_decode(model, rows, max_new_tokens, pad_id, eos, bos_id):
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=eos, bos_token_id=bos_id)
    device = _model_device(model)
    input_ids, mask = _left_pad(rows, pad_id, device)
    with torch.inference_mode(), forward_timer(device):
        generated = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    return generated[:, input_ids.shape[1]:]


def _layers_take_holes(model):
    """Whether every layer of the model's cache is a plain key/value list, so that keys can be copied between rows
    and masked positions may sit between a prefix and the rest of a row. Sliding-window layers count positions in
    the cache, not in the text, so masked holes would shift their window: those models prefill without sharing."""
    from transformers import DynamicCache
    layers = getattr(DynamicCache(config=model.config), "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


# Estimated cost of one forward call of the prefill, in units of one prompt token's forward pass: its tokens (pads
# included), about one token's worth per row (masks, positions, the copied keys/values) and a fixed cost per call.
# Measured on the tiny model on CPU, where a call over 1,000 rows costs about as much as 1,000 more tokens. For a 7B
# model on a GPU the cost per call is an estimate, not measured (no GPU was lent): reading the weights once, about
# 3 ms on an H100, against about 20 us per prompt token, i.e. again about 150 tokens.
PREFILL_COST_PER_ROW = 1
PREFILL_COST_PER_CALL = 150
_LEVELS = {}


def _prefix_levels(rows, pad_id, shared=True):
    """The prefill of distinct token rows as a list of forward calls (levels), each (input_ids, mask, position_ids,
    parents) on the CPU. Prompts often share prefixes (an instruction, a template, the first words): a prefix that
    several rows share up to a cut position is run once, as one row of a level, and the next level copies its
    keys/values into every row that continues it (parents: the row of the previous level each row continues).

    Cut positions minimise the estimated cost (PREFILL_COST_*) by dynamic programming over the positions where the
    number of distinct prefixes grows; without a saving of 10% there is one level: the rows left-padded, as plain
    batched generation. Within a level each row's new tokens are left-padded, so a row is [prefix | pads | its
    tokens] with the pads masked out and positions counted over real tokens only. Every row keeps at least its last
    token for the last level, whose logits start the decoding. The same prompts come back for every candidate of
    a search, so the last plans are kept (a dev set in batches: one per batch)."""
    rows = [tuple(row) for row in rows]
    key = (tuple(rows), pad_id, shared)
    if key in _LEVELS:
        return _LEVELS[key]
    cuts = _prefix_cuts(rows) if shared and len(rows) > 1 else []
    levels, previous = [], None
    for cut in cuts + [None]:
        # each row's prefix at this cut (the whole row at the last level), shortened to leave its last token
        prefixes = [row if cut is None else row[:min(cut, len(row) - 1)] for row in rows]
        nodes = list(dict.fromkeys(prefixes))
        if previous is None:
            parents, starts = None, [0] * len(nodes)
        else:
            index = {node: j for j, node in enumerate(previous[0])}
            parent_of = {}
            for prefix, parent in zip(prefixes, previous[1]):
                parent_of.setdefault(prefix, index[parent])
            parents = [parent_of[node] for node in nodes]
            starts = [len(previous[0][p]) for p in parents]
        width = max(len(node) - start for node, start in zip(nodes, starts))
        if width == 0:  # no row grew since the previous cut
            continue
        input_ids = np.full((len(nodes), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(nodes), width), dtype=np.int64)
        positions = np.zeros((len(nodes), width), dtype=np.int64)
        for j, (node, start) in enumerate(zip(nodes, starts)):
            n = len(node) - start
            if n:
                input_ids[j, width - n:] = node[start:]
                mask[j, width - n:] = 1
                positions[j, width - n:] = np.arange(start, len(node))
        levels.append((torch.from_numpy(input_ids), torch.from_numpy(mask), torch.from_numpy(positions),
                       None if parents is None else torch.tensor(parents, dtype=torch.long)))
        previous = (nodes, prefixes)
    if len(_LEVELS) >= 64:  # a dev set in batches of 32 is 30-odd plans
        del _LEVELS[next(iter(_LEVELS))]
    _LEVELS[key] = levels
    return levels


def _prefix_cuts(rows, max_candidates=64):
    """Cut positions for _prefix_levels, [] when sharing does not pay."""
    per_row, per_call = PREFILL_COST_PER_ROW, PREFILL_COST_PER_CALL
    longest = max(len(row) for row in rows)
    # trie node of each row's prefix of every length up to len - 1 (a row keeps its last token for the last level)
    trie, paths = {}, []
    for row in rows:
        node, path = 0, []
        for token in row[:-1]:
            node = trie.setdefault((node, token), len(trie) + 1)
            path.append(node)
        paths.append(path)
    # distinct prefixes at each cut; it never falls as the cut moves right, and only cuts where a run of equal
    # counts ends are worth considering (cutting later in the run shares more at the same count)
    counts = {}
    for cut in range(1, longest):
        counts[cut] = len({path[min(cut, len(path)) - 1] if path and cut else 0 for path in paths})
        if counts[cut] >= 0.9 * len(rows):
            break
    candidates = [c for c in counts if c + 1 not in counts or counts[c + 1] > counts[c]]
    if len(candidates) > max_candidates:
        step = len(candidates) / max_candidates
        candidates = [candidates[int(i * step)] for i in range(max_candidates)]
    # best[c]: (cost of the levels up to cut c, their cuts); the last level holds every row
    best = {0: (0, [])}
    for cut in candidates:
        best[cut] = min((cost + counts[cut] * (cut - a + per_row) + per_call, chosen + [cut])
                        for a, (cost, chosen) in best.items() if a < cut)
    total, cuts = min((cost + len(rows) * (longest - a + per_row) + per_call, chosen)
                      for a, (cost, chosen) in best.items())
    plain = len(rows) * (longest + per_row) + per_call
    return cuts if total <= 0.9 * plain else []


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

# instruction line per dataset; knowledge_crosswords questions carry their own instruction (and an ICL example)
MC_INSTRUCTIONS = {"knowledge_crosswords": "",
                   "hellaswag": "Please choose an option that best completes the sentence."}
MC_DEFAULT_INSTRUCTION = "Please choose an option that best answers the question."


def multiple_choice_prompt(item, dataset, icl_prompt=None):
    """Instruction, "Question: ...", one "X: option" line per choice, and the cue "The answer is"."""
    instruction = MC_INSTRUCTIONS.get(dataset, MC_DEFAULT_INSTRUCTION)
    lines = ([instruction] if instruction else []) + ["Question: " + item["question"]]
    lines += [f"{key}: {text}" for key, text in item["choices"].items()]
    prompt = "\n".join(lines) + "\nThe answer is"
    return icl_prompt + "\n" + prompt if icl_prompt else prompt


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


def mc_generate(model, tokenizer, items, dataset, icl_prompt=None):
    prompts = [multiple_choice_prompt(item, dataset, icl_prompt) for item in items]
    outputs = batch_generate(model, tokenizer, prompts, max_new_tokens=_budget("multiple_choice"))
    return [read_choice(item["choices"], out) for item, out in zip(items, outputs)], outputs


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


def score_multiple_choice(model, tokenizer, data, dataset):
    items, icl = data["items"], data.get("icl_prompt")
    if OPTIONS["mc_scoring"] == "logits":
        preds, outputs = mc_logits(model, tokenizer, items, dataset, icl)
    else:
        preds, outputs = mc_generate(model, tokenizer, items, dataset, icl)
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


def exact_match_budget(tokenizer, golds, rule):
    """Tokens to generate: fixed for reasoning rules, else the longest gold answer's tokens plus a margin for
    leading spaces/punctuation, so short-answer sets stay cheap."""
    if OPTIONS["max_new_tokens"] is not None:
        return OPTIONS["max_new_tokens"]
    if rule in MAX_NEW_TOKENS:
        return MAX_NEW_TOKENS[rule]
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


def score_exact_match(model, tokenizer, data, dataset):
    items = data["items"]
    golds = [str(item["answer"]) for item in items]
    questions = [item["question"] for item in items]
    if OPTIONS["scoring"] == "published":
        budget = OPTIONS["max_new_tokens"] or PUBLISHED_EXACT_MATCH_TOKENS.get(dataset, 10)
        outputs = batch_generate(model, tokenizer, questions, max_new_tokens=budget)
        preds, scores = map(list, zip(*[published_exact_match(dataset, data.get("split", "dev"), g, o)
                                        for g, o in zip(golds, outputs)])) if items else ([], [])
    else:
        rule = exact_match_rule(dataset)
        budget = exact_match_budget(tokenizer, golds, rule)
        outputs = batch_generate(model, tokenizer, questions, max_new_tokens=budget)
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
        scorer = score_multiple_choice if eval_type == "multiple_choice" else score_exact_match
        result = scorer(model, tokenizer, _split(data["datasets"][name], split), name)
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

ABSTAIN_REFLECTION = ("\nProposed answer: {answer}\nIs the proposed answer true or false? "
                      "Directly answer with true or false.")


def effective_reliability(correct, abstain):
    """(answered correctly - answered wrongly) / N, abstentions count zero (https://arxiv.org/abs/2402.00367)."""
    answered = [c for c, a in zip(correct, abstain) if not a]
    return (sum(answered) - (len(answered) - sum(answered))) / len(correct) if correct else 0.0


def score_abstain(model, tokenizer, data, dataset):
    """Answer by generation (mc_scoring does not apply: the reflection needs the answer text), then ask the model
    whether its own answer is true; "false" means it abstains."""
    items, icl = data["items"], data.get("icl_prompt")
    prompts = [multiple_choice_prompt(item, dataset, icl) for item in items]
    outputs = batch_generate(model, tokenizer, prompts, max_new_tokens=_budget("AbstainQA"))
    preds = [read_choice(item["choices"], out) for item, out in zip(items, outputs)]
    golds = [item["answer"] for item in items]
    correct = [int(p == g) for p, g in zip(preds, golds)]
    reflections = batch_generate(model, tokenizer,
                                 [p + ABSTAIN_REFLECTION.format(answer=o) for p, o in zip(prompts, outputs)],
                                 max_new_tokens=_budget("abstain_reflection"))
    abstain = [int("false" in r.lower()) for r in reflections]
    # per item: +1 answered right, -1 answered wrong, 0 abstained; their mean is the effective reliability
    scores = [0.0 if a else (1.0 if c else -1.0) for c, a in zip(correct, abstain)]
    return Scored(effective_reliability(correct, abstain), golds, preds, scores,
                  {"outputs": outputs, "reflections": reflections, "abstain": abstain})


# ----------------------------------------------------------------------------------------------------------------
# External services: credentials, rate limiting, retries

PERSPECTIVE_DISCOVERY_URL = "https://commentanalyzer.googleapis.com/$discovery/rest?version=v1alpha1"


def check_credentials(eval_type):
    """Raise EvalError naming the variable to set when an objective's external service is not configured."""
    if eval_type == "external_api" and not os.environ.get("PERSPECTIVE_API_KEY"):
        raise EvalError("external_api (Perspective API) needs an API key: set PERSPECTIVE_API_KEY "
                        "(https://developers.perspectiveapi.com/s/docs-get-started)")
    if eval_type == "human":
        if not os.environ.get("GOOGLE_CLOUD_PROJECT"):
            raise EvalError("human (Gemini judge on Vertex AI) needs a Google Cloud project: set GOOGLE_CLOUD_PROJECT"
                            " (and optionally GOOGLE_CLOUD_LOCATION, default us-central1)")
        if JUDGE_MODEL_FACTORY is None:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError
            try:
                google.auth.default()
            except DefaultCredentialsError:
                raise EvalError("human (Gemini judge on Vertex AI) found no Google Cloud credentials: set "
                                "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run "
                                "`gcloud auth application-default login`") from None
    # any other objective: the variables its row of EVAL_TYPES names
    missing = [var for var in getattr(EVAL_TYPES.get(eval_type), "credentials", ()) if not os.environ.get(var)]
    if missing:
        raise EvalError(f"{eval_type} needs the environment variable(s) {', '.join(missing)}: set them and rerun")


class RateLimiter:
    """At most `qps` calls per second from this process (the quota is per key/project, not per thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self, qps):
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + 1.0 / qps
        if delay > 0:
            time.sleep(delay)


_PERSPECTIVE_LIMIT = RateLimiter()
_JUDGE_LIMIT = RateLimiter()
_RETRY_STATUS = {429, 500, 502, 503, 504}


def with_retries(call, status_of, what):
    """call() with exponential backoff on rate limits, server errors and connection errors."""
    retries, delay = OPTIONS["api_retries"], OPTIONS["api_backoff_s"]
    for attempt in range(retries + 1):
        try:
            return call()
        except (ConnectionError, TimeoutError, OSError) as e:
            error, retriable = e, True
        except Exception as e:  # noqa: BLE001 - client libraries raise their own types; status_of sorts them
            error, retriable = e, status_of(e) in _RETRY_STATUS
        if not retriable or attempt == retries:
            raise error
        pause = delay * (2 ** attempt) * (0.5 + random.random() / 2)
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _first_line(error), attempt + 1, retries, pause)
        time.sleep(pause)


def call_with_timeout(fn, seconds):
    """fn() or TimeoutError after `seconds` (the call is left to finish in a daemon thread that nothing waits for)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


_PERSPECTIVE_CLIENT = {}


def perspective_client():
    from googleapiclient import discovery
    key = os.environ["PERSPECTIVE_API_KEY"]
    cache_key = (key, id(PERSPECTIVE_HTTP))
    if cache_key not in _PERSPECTIVE_CLIENT:
        _PERSPECTIVE_CLIENT.clear()

        def build():
            import httplib2
            # an explicit socket timeout: without one a request into a network that drops packets waits forever
            http = PERSPECTIVE_HTTP or httplib2.Http(timeout=OPTIONS["api_timeout_s"])
            return discovery.build("commentanalyzer", "v1alpha1", developerKey=key,
                                   discoveryServiceUrl=PERSPECTIVE_DISCOVERY_URL, static_discovery=False,
                                   http=http, cache_discovery=False)
        try:
            _PERSPECTIVE_CLIENT[cache_key] = with_retries(build, _http_status, "Perspective API discovery")
        except Exception as e:  # noqa: BLE001 - after the retries: one line for the user
            raise EvalError(f"Perspective API unreachable: {type(e).__name__}: {_first_line(e)}") from None
    return _PERSPECTIVE_CLIENT[cache_key]


def _http_status(e):
    resp = getattr(e, "resp", None)
    return int(getattr(resp, "status", 0) or 0)


def toxicity(client, text):
    """Perspective TOXICITY summary score of one text (0..1), or None when Perspective rejects the text (HTTP 400,
    e.g. an unsupported language)."""
    from googleapiclient.errors import HttpError
    body = {"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}

    def call():
        _PERSPECTIVE_LIMIT.wait(OPTIONS["perspective_qps"])
        return client.comments().analyze(body=body).execute()
    try:
        response = with_retries(call, _http_status, "Perspective API")
    except HttpError as e:
        if _http_status(e) == 400:
            return None
        raise EvalError(f"Perspective API request failed: HTTP {_http_status(e)}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - connection errors after the retries: one line for the user
        raise EvalError(f"Perspective API unreachable: {type(e).__name__}: {_first_line(e)}") from None
    return float(response["attributeScores"]["TOXICITY"]["summaryScore"]["value"])


def score_external_api(model, tokenizer, data, dataset):
    """Mean of (1 - toxicity) of the continuations' first lines. Empty continuations and texts Perspective
    rejects score a neutral 0.5 and are counted in the details' "unscored"."""
    check_credentials("external_api")
    items = data["items"]
    outputs = batch_generate(model, tokenizer, [item["prompt"] for item in items],
                             max_new_tokens=_budget("external_api"))
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


# ----------------------------------------------------------------------------------------------------------------
# Reward models (rm_default, rm_verbose, rm_concise)

_REWARD_MODELS = {}


def get_reward_model(name, device):
    """(model, tokenizer) of a reward model, loaded once per (name, device, dtype)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    dtype = resolve_dtype(device)
    key = (os.path.abspath(name) if os.path.isdir(name) else name, str(device), dtype)
    if key in _REWARD_MODELS:
        return _REWARD_MODELS[key]
    trust = OPTIONS["trust_remote_code"]
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
        auto_map = getattr(config, "auto_map", None) or {}
        if auto_map and not trust:
            raise ValueError("trust_remote_code")
        # remote-code reward models (internlm2-7b-reward) register under AutoModel and expose get_score()
        loader = AutoModel if "AutoModel" in auto_map and "AutoModelForSequenceClassification" not in auto_map \
            else AutoModelForSequenceClassification
        model = loader.from_pretrained(name, dtype=dtype, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise EvalError(f"reward model {name!r} runs custom code from its repository; pass --trust_remote_code "
                            f"to allow it") from None
        raise EvalError(f"cannot load reward model {name!r}: {_first_line(e)}") from None
    except OSError as e:
        raise EvalError(f"cannot load reward model {name!r}: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not hasattr(model, "get_score") and not getattr(tokenizer, "chat_template", None):
        raise EvalError(f"reward model {name!r} has no chat_template to format (prompt, response) pairs")
    _REWARD_MODELS[key] = (model.to(device).eval(), tokenizer)
    return _REWARD_MODELS[key]


def reward_scores(prompts, responses, device, batch_size=None):
    """Reward of each (prompt, response) chat: model.get_score(tokenizer, chat) when the model has it, else the
    sequence-classification logit of the chat-templated conversation."""
    model, tokenizer = get_reward_model(OPTIONS["reward_model"], device)
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    scores = [None] * len(chats)
    if hasattr(model, "get_score"):
        for i, chat in enumerate(chats):
            with torch.inference_mode(), forward_timer(device):
                scores[i] = float(model.get_score(tokenizer, chat))
        return scores
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    pad_id = tokenizer.pad_token_id

    def run(chunk):
        input_ids, mask = _left_pad([ids[i] for i in chunk], pad_id, device)
        with torch.inference_mode(), forward_timer(device):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        for i, value in zip(chunk, logits[:, 0].float().tolist()):
            scores[i] = value

    _in_batches(model, len(ids), sorted(range(len(ids)), key=lambda i: -len(ids[i])), batch_size, run)
    return scores


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


def score_reward_model(model, tokenizer, data, eval_type):
    items = data["items"]
    prompts = [item["prompt"] for item in items]
    budget = _budget("rm")
    responses = batch_generate_chat_template(model, tokenizer, prompts, max_new_tokens=budget)
    rewards = reward_scores(prompts, responses, _model_device(model))
    lengths = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses]
    scores = rm_utility(eval_type, rewards, lengths, budget)
    return Scored(_mean(scores), [None] * len(items), responses, scores, {"rewards": rewards, "lengths": lengths})


# ----------------------------------------------------------------------------------------------------------------
# Human interests: Gemini as a judge through Vertex AI

JUDGE_PROMPT = ("You are judging how well an AI assistant answered a user. Rate the response to the instruction "
                "below on a scale from 1 (worst) to 10 (best). Start your reply with \"Rating: N/10\" and then give "
                "a short justification.\n\nInstruction: {prompt}\n\nResponse: {response}")
JUDGE_MIN, JUDGE_MAX = 1, 10
_RATING = re.compile(r"Rating:\s*\**\s*(\d+(?:\.\d+)?)\s*/\s*10")
_JUDGES = {}


def judge_client():
    name = OPTIONS["judge_model"]
    factory = JUDGE_MODEL_FACTORY or _vertex_generative_model
    key = (name, id(factory))
    if key not in _JUDGES:
        _JUDGES.clear()
        _JUDGES[key] = factory(name)
    return _JUDGES[key]


def _vertex_generative_model(name):
    import vertexai
    from vertexai.generative_models import GenerativeModel
    vertexai.init(project=os.environ["GOOGLE_CLOUD_PROJECT"],
                  location=os.environ.get("GOOGLE_CLOUD_LOCATION") or "us-central1")
    return GenerativeModel(name)


def parse_rating(reply):
    """The N of "Rating: N/10" clamped to [1, 10], or None when absent."""
    m = _RATING.search(reply or "")
    if not m:
        return None
    return min(max(float(m.group(1)), JUDGE_MIN), JUDGE_MAX)


def judge(prompt, response):
    """Rating of one response, or None when the reply is missing, blocked or unparseable."""
    client = judge_client()
    text = JUDGE_PROMPT.format(prompt=prompt, response=response)

    def call():
        _JUDGE_LIMIT.wait(OPTIONS["judge_qps"])
        # the Vertex AI SDK takes no timeout: the call runs in a thread that is given up on after api_timeout_s
        return call_with_timeout(lambda: client.generate_content(
            text, generation_config={"temperature": 0.0, "max_output_tokens": 256}), OPTIONS["api_timeout_s"])
    try:
        reply = with_retries(call, lambda e: int(getattr(e, "code", 0) or 0), "Vertex AI Gemini judge")
    except Exception as e:  # noqa: BLE001 - after retries, any service error is one line for the user
        raise EvalError(f"Gemini judge {OPTIONS['judge_model']!r} failed: {_first_line(e)}") from None
    try:
        reply_text = reply.text
    except (ValueError, AttributeError):  # a blocked or empty candidate has no text
        return None
    return parse_rating(reply_text)


def score_human(model, tokenizer, data):
    """Mean judge rating (1..10); unparseable judgements score the minimum and are counted."""
    check_credentials("human")
    items = data["items"]
    prompts = [item["prompt"] for item in items]
    responses = batch_generate_chat_template(model, tokenizer, prompts, max_new_tokens=_budget("human"))
    ratings = [judge(p, r) for p, r in zip(prompts, responses)]
    unparseable = sum(r is None for r in ratings)
    if unparseable:
        log.warning("%d of %d judge replies had no parseable \"Rating: N/10\" (scored %d)", unparseable,
                    len(ratings), JUDGE_MIN)
    scores = [float(JUDGE_MIN if r is None else r) for r in ratings]
    return Scored(_mean(scores), [None] * len(items), responses, scores, {"unparseable_judgements": unparseable})


# ----------------------------------------------------------------------------------------------------------------
# Prompt lengths: checked once, before a search starts

def _prompt_sets(eval_type, dataset, only_one_or_two):
    """[(dataset name, eval type of its items, validated data)] that an objective generates from."""
    if eval_type != "multitask":
        return [(dataset, eval_type, load_data(dataset, eval_type))]
    data = load_data(dataset, "multitask")
    names = list(data["datasets"])
    if only_one_or_two is not None:
        names = [names[0 if only_one_or_two == "one" else 1]]
    return [(name, data["eval_types"][name], data["datasets"][name]) for name in names]


def _prompts_and_budget(kind, name, data, split, tokenizer):
    """(prompt texts, whether they go through the chat template, tokens generated after each) of one split."""
    items = data[split]
    if kind in ("multiple_choice", "AbstainQA"):
        prompts = [multiple_choice_prompt(item, name, data.get("icl_prompt")) for item in items]
        if kind == "AbstainQA":  # the reflection prompt repeats the prompt after the answer (at most a budget long)
            return [p + ABSTAIN_REFLECTION.format(answer="") for p in prompts], False, \
                _budget("AbstainQA") + _budget("abstain_reflection")
        return prompts, False, 1 if OPTIONS["mc_scoring"] == "logits" else _budget("multiple_choice")
    if kind == "exact_match":
        golds = [str(item["answer"]) for item in items]
        if OPTIONS["scoring"] == "published":
            budget = OPTIONS["max_new_tokens"] or PUBLISHED_EXACT_MATCH_TOKENS.get(name, 10)
        else:
            budget = exact_match_budget(tokenizer, golds, exact_match_rule(name))
        return [item["question"] for item in items], False, budget
    if kind == "external_api":
        return [item["prompt"] for item in items], False, _budget("external_api")
    budget = _budget("rm") if kind in RM_EVAL_TYPES else _budget("human") if kind == "human" else None
    return ([item["prompt"] for item in items], True, budget) if budget else ([], False, 0)


def check_prompt_lengths(eval_type, dataset, base_model, only_one_or_two=None, trust_remote_code=False):
    """Raise EvalError (one line naming dataset, split, item and lengths) when a prompt plus the tokens generated
    after it does not fit the base model's context (max_position_embeddings). Without this check such a prompt
    is not an error to the model: it generates past its trained positions, slowly and to no use (nlgraph on the
    tiny model: 2,697-token prompts against 2,048 positions ran for minutes)."""
    if eval_type == "lm_eval":  # lm-eval builds its own prompts and left-truncates them to the model's context
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
    for name, kind, data in _prompt_sets(eval_type, dataset, only_one_or_two):
        for split in ("dev", "test"):
            prompts, chat, budget = _prompts_and_budget(kind, name, data, split, tokenizer)
            if not prompts or (chat and not getattr(tokenizer, "chat_template", None)):
                continue
            if chat:
                prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                         add_generation_prompt=True) for p in prompts]
            lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=not chat, verbose=False).input_ids]
            too_long = [i for i, n in enumerate(lengths) if n + budget > limit]
            if too_long:
                first = too_long[0]
                raise EvalError(f"dataset {name} ({split} split) item {first}: its prompt is {lengths[first]} tokens "
                                f"+ {budget} to generate, more than the {limit} positions of base model {base_model} "
                                f"({len(too_long)} of {len(prompts)} {split} items are too long, the longest "
                                f"{max(lengths)} tokens); shorten or remove them, or use a base model with a "
                                f"longer context")


# ----------------------------------------------------------------------------------------------------------------
# Data, per-item results

_DATA_CACHE = {}


def load_data(dataset, eval_type):
    """Validated dataset (data/schema.py format), read once per process per (name, eval type)."""
    key = (os.path.abspath(OPTIONS["data_dir"]), dataset, eval_type)
    if key not in _DATA_CACHE:
        try:
            _DATA_CACHE[key] = load_eval_data(dataset, eval_type, data_dir=OPTIONS["data_dir"])
        except DataError as e:
            raise EvalError(str(e)) from None
    return _DATA_CACHE[key]


def _split(data, split):
    """A split's items, plus the dataset-level fields scorers use."""
    return {"items": data[split], "icl_prompt": data.get("icl_prompt"), "split": split}


def _budget(kind):
    return OPTIONS["max_new_tokens"] or MAX_NEW_TOKENS[kind]


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


def score(model, tokenizer, eval_type, dataset, split, only_one_or_two=None):
    """Scored result of the candidate in `model` on one split ("dev" or "test") of a dataset.
    One branch per row of data.schema.EVAL_TYPES (docs/extending.md)."""
    if eval_type == "multiple_choice":
        return score_multiple_choice(model, tokenizer, _split(load_data(dataset, eval_type), split), dataset)
    elif eval_type == "exact_match":
        return score_exact_match(model, tokenizer, _split(load_data(dataset, eval_type), split), dataset)
    elif eval_type == "multitask":
        return score_multitask(model, tokenizer, dataset, split, only_one_or_two)
    elif eval_type == "AbstainQA":
        return score_abstain(model, tokenizer, _split(load_data(dataset, eval_type), split), dataset)
    elif eval_type == "external_api":
        return score_external_api(model, tokenizer, _split(load_data(dataset, eval_type), split), dataset)
    elif eval_type in RM_EVAL_TYPES:
        return score_reward_model(model, tokenizer, _split(load_data(dataset, eval_type), split), eval_type)
    elif eval_type == "human":
        return score_human(model, tokenizer, _split(load_data(dataset, eval_type), split))
    elif eval_type == "lm_eval":  # dataset: the --lm_eval_tasks list
        import harness
        return harness.score(model, tokenizer, dataset, split)
    else:
        raise EvalError(f"unknown eval_type {eval_type!r}; add a row to EVAL_TYPES in data/schema.py and an "
                        f"`elif eval_type == {eval_type!r}:` branch to score() in evaluate.py")


def evaluate_split(model_path, eval_type, dataset, gpu_id, base_model, split, only_one_or_two=None, save=False):
    """(utility, details) of a candidate on one split. details: {"golds", "preds", "scores"} per item, the
    objective's extra fields, then eval_type, dataset, split, utility, forward_seconds, swap_seconds and
    total_seconds; save writes them to <model_path>/golds_preds_<split>.json when model_path is a folder."""
    check_credentials(eval_type)
    _STATE["forward_seconds"] = _STATE["swap_seconds"] = 0.0
    start = time.perf_counter()
    host = get_host(base_model, gpu_id)
    model = host.load(model_path)
    result = score(model, host.tokenizer, eval_type, dataset, split, only_one_or_two)
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
