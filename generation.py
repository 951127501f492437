"""The generation engine: a resident base model per device that candidates are swapped into, and greedy batched
generation over it. evaluate.py's scorers get every model output from here.

- Options: `configure(...)` sets the per-process options every part of the evaluation reads (OPTIONS).
- The resident model: `get_host(base_model, gpu_id)` loads a base model once per (base model, device, dtype);
  `ModelHost.load(candidate)` copies an adapter (folder or in-memory state dict) into its LoRA slot or a full model
  into its base tensors, in place.
- Generation: `batch_generate` (plain prompts) and `batch_generate_chat_template` (one chat turn each), greedy.
  transformers decoders run `_greedy_decode` (their forward in a plain loop; the tokens of generate(do_sample=False))
  with the prompt pass split into shared-prefix levels (`_prefix_levels`); batches are sized from the free memory
  (`_rows_that_fit`) and halved on CUDA out-of-memory (`_in_batches`).
"""

import inspect
import json
import logging
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

log = logging.getLogger("bwr.evaluate")


class EvalError(ValueError):
    """A bad option, candidate, device, dataset or missing credential; the message is one actionable line."""


# ----------------------------------------------------------------------------------------------------------------
# Options

DEFAULT_REWARD_MODEL = "internlm/internlm2-7b-reward"
DEFAULT_JUDGE_MODEL = "gemini-1.5-flash"
# How an answer is read from a generation (docs/objectives.md, "Scoring"): "published" reproduces the published
# evaluator, so utilities compare with the paper's numbers; "strict" reads the answer where the model gives it (fewer
# false hits).
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
    "max_new_tokens": None,        # None: each eval type's own (EVAL_TYPES max_new_tokens)
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

_ENCODED = {}  # (id(tokenizer), add_special_tokens) -> {text: token ids}
ENCODED_TEXTS = 20_000  # texts kept per tokenizer: a search's splits, with room; prompts that carry model outputs
                        # (AbstainQA's reflections) are new every time, and the memory is freed when it fills up


def encode(tokenizer, texts, add_special_tokens=True):
    """Token ids of each text. The same prompts come back for every candidate of a search, as whole splits or as
    --early_reject's chunks of them in each proposal's own order, so each text's ids are kept (tokenizing is the
    largest cost outside the model on small models); up to ENCODED_TEXTS texts per tokenizer."""
    known = _ENCODED.setdefault((id(tokenizer), add_special_tokens), {})
    if len(known) + len(texts) > ENCODED_TEXTS:
        known.clear()
    new = [text for text in dict.fromkeys(texts) if text not in known]
    if new:
        known.update(zip(new, tokenizer(new, add_special_tokens=add_special_tokens).input_ids))
    return [known[text] for text in texts]


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
    a search, so the last plans are kept (a dev set in batches: one per batch). --early_reject's chunks are new sets
    of rows for every proposal, so the plan is built in numpy (_prefix_ids): about 1 ms for 500 rows of the demo, where
    a trie of tuples took 4 ms, 5% of a full evaluation per chunk."""
    rows = [tuple(row) for row in rows]
    key = (tuple(rows), pad_id, shared)
    if key in _LEVELS:
        return _LEVELS[key]
    if not rows:
        return []
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    tokens = np.full((len(rows), max(1, int(lengths.max()))), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    ids = _prefix_ids(tokens, lengths)
    cuts = _prefix_cuts(ids, len(rows)) if shared and len(rows) > 1 else []
    levels, previous = [], None  # previous: (each row's node at the last level, each row's prefix length there)
    for cut in cuts + [None]:
        # each row's prefix at this cut (the whole row at the last level), shortened to leave its last token
        ends = lengths if cut is None else np.minimum(cut, np.maximum(lengths - 1, 0))
        column = ids[-1] if cut is None else ids[cut]
        # the level's nodes (distinct prefixes) in the order their first row comes, as the rows' order sets it
        _, first, inverse = np.unique(column, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        node_of_row = np.empty(len(first), dtype=np.int64)
        node_of_row[by_first] = np.arange(len(first))
        node_of_row = node_of_row[inverse.reshape(-1)]
        leader = first[by_first]  # a row of each node: equal prefixes have equal lengths, parents and starts
        if previous is None:
            parents, starts = None, np.zeros(len(leader), dtype=np.int64)
        else:
            parents, starts = previous[0][leader], previous[1][leader]
        stops = ends[leader]
        width = int((stops - starts).max())
        if width == 0:  # no row grew since the previous cut
            continue
        # node j's new tokens tokens[leader j, starts j : stops j], right-aligned in `width` columns
        source = stops[:, None] - width + np.arange(width)[None, :]
        real = source >= starts[:, None]
        input_ids = np.where(real, tokens[leader[:, None], np.maximum(source, 0)], pad_id)
        levels.append((torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64)),
                       torch.from_numpy(np.where(real, source, 0)),
                       None if parents is None else torch.from_numpy(parents)))
        previous = (node_of_row, ends)
    if len(_LEVELS) >= 64:  # a dev set in batches of 32 is 30-odd plans
        del _LEVELS[next(iter(_LEVELS))]
    _LEVELS[key] = levels
    return levels


def _prefix_ids(tokens, lengths):
    """Numbers for the rows' prefixes: ids[c][i] == ids[c][j] exactly when rows i and j have the same prefix at cut c,
    row[:min(c, len - 1)] (a row keeps its last token for the last level), for c in 0 .. longest - 1; ids[-1] numbers
    the whole rows. tokens: the rows padded on the right, lengths: theirs. Column by column, a prefix is its prefix
    one token shorter and the token that extends it (none once the row's prefix stopped growing)."""
    longest = tokens.shape[1]
    radix = int(tokens.max()) + 2  # token + 1, and 0 for "no token": a prefix that stopped growing keeps its number
    ids = [np.zeros(len(lengths), dtype=np.int64)]
    for c in range(1, longest):
        step = ids[-1] * radix + np.where(c - 1 < lengths - 1, tokens[:, c - 1] + 1, 0)
        ids.append(np.unique(step, return_inverse=True)[1].reshape(-1))
    # ids[longest - 1] numbers every row's prefix without its last token: add that token
    step = ids[-1] * radix + np.where(lengths > 0, tokens[np.arange(len(lengths)), lengths - 1] + 1, 0)
    ids.append(np.unique(step, return_inverse=True)[1].reshape(-1))
    return ids


def _prefix_cuts(ids, n_rows, max_candidates=64):
    """Cut positions for _prefix_levels, [] when sharing does not pay. ids: _prefix_ids of the rows."""
    per_row, per_call = PREFILL_COST_PER_ROW, PREFILL_COST_PER_CALL
    longest = len(ids) - 1
    # distinct prefixes at each cut; it never falls as the cut moves right, and only cuts where a run of equal
    # counts ends are worth considering (cutting later in the run shares more at the same count)
    counts = {}
    for cut in range(1, longest):
        counts[cut] = int(ids[cut].max()) + 1  # np.unique numbers them 0 .. count - 1
        if counts[cut] >= 0.9 * n_rows:
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
    total, cuts = min((cost + n_rows * (longest - a + per_row) + per_call, chosen)
                      for a, (cost, chosen) in best.items())
    plain = n_rows * (longest + per_row) + per_call
    return cuts if total <= 0.9 * plain else []
