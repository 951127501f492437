"""Initial experts: the ten published Gemma-7B-it LoRA experts, or the embedded tiny population.

    python initial_experts/expert_init.py                 # download the published experts (needs the Hub)
    python initial_experts/expert_init.py --tiny          # verify the shipped tiny population (initial_experts/tiny)
    python initial_experts/expert_init.py --tiny --rebuild            # rebuild it with the recipe and compare
    python initial_experts/expert_init.py --tiny --rebuild --record   # after a recipe change: rebuild, re-record

Published: adapter files only (adapter_config.json + adapter_model.safetensors) of
bunsenfeng/<name> into initial_experts/<name>/. Each expert is downloaded into a temp
folder beside its target and renamed into place once complete, so an interrupted
download is retried on the next call and a complete one is skipped.

Tiny (default for trying the toolkit and for every test): shipped in initial_experts/tiny/ and
checked against the sha256 manifest initial_experts/tiny.sha256; the recipe below rebuilds it
offline on CPU, deterministically from --seed, with pinned CPU kernels (see "reproducible build"):
  base_model/    GemmaForCausalLM with a character-level tokenizer, pre-trained on
                 ambiguous tiny_demo data (data/tiny_demo.py): it can compute each
                 operation's intended and distractor answer but does not know which is meant
  experts/<n>/   ten LoRA adapters (q/k/v/o_proj, one shared LoRA init), each briefly
                 fine-tuned on the intended convention of one or two operations
  reward_model/  GemmaForSequenceClassification (num_labels=1) scoring chat exchanges;
                 see reward_target() for what it rewards
  build_stamp.json  seed, variant, recipe hash, kernel pin and library versions
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HUB_NAMESPACE = "bunsenfeng"
PUBLISHED_EXPERTS = ("code_alpaca", "cot", "flan_v2", "gemini_alpaca", "lima",
                     "oasst1", "open_orca", "science", "sharegpt", "wizardlm")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
GEMMA_LICENCE_URL = "https://huggingface.co/google/gemma-7b-it"

# Everything that shapes the tiny build; its hash (with this file's and the data
# generator's source) goes into the build stamp, so changing any of it rebuilds.
TINY_RECIPE = {
    # Narrow is faster per step on CPU, and in the build budget more steps beat more width.
    "model": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
              "max_position_embeddings": 2048},
    # Ambiguous tiny_demo data (intended or distractor convention at random): the base can
    # compute every answer but does not know which one is meant. chat_every > 0 mixes in a
    # batch of chat exchanges every that many steps; off by default because in the build
    # budget it cost the base the positional skills the experts build on.
    # stream names the pre-training data stream (seeded by --seed). 4,800 steps: at 1,600 the base
    # computed the positional operations on only ~75% of the questions, too weak for experts to
    # specialise cleanly (docs/tiny.md).
    "pretrain": {"steps": 4800, "batch_size": 32, "lr": 3e-3, "chat_every": 0, "chat_batch_size": 16,
                 "stream": "pretrain-c"},
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    # Specialists, as the published experts are (code, science, dialogue, ...): each expert learns the intended
    # convention of one operation from its own data stream; `replay` of every batch is ambiguous data of the
    # other operations, so an expert leaves them as the base does them. lora_A stays at the shared
    # initialisation (LoRA-FA, train_lora_A False): every update is B_i @ A_0, so a weighted average of experts
    # in factor space is exactly the weighted average of their updates and keeps each specialist's skill at its
    # weight. No expert is good at all three operations; merges of total weight 1 are (docs/tiny.md).
    "expert": {"steps": 150, "batch_size": 32, "lr": 1e-2, "replay": 0.3, "train_lora_A": False},
    # name -> tiny_demo skill mixture (the operation each expert is a specialist in)
    "experts": {
        "max_a": {"max": 1}, "max_b": {"max": 1}, "max_c": {"max": 1}, "max_d": {"max": 1},
        "fst_a": {"fst": 1}, "fst_b": {"fst": 1}, "fst_c": {"fst": 1},
        "snd_a": {"snd": 1}, "snd_b": {"snd": 1}, "snd_c": {"snd": 1},
    },
    "reward": {"steps": 150, "batch_size": 32, "lr": 3e-3},
    # --quick divides every step count by this: same code path, seconds instead of minutes.
    "quick_divisor": 20,
}

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


class UsageError(Exception):
    """Bad input or an unusable environment; main() prints it as one line and exits 2."""


# ---------------------------------------------------------------- published experts

def _hub_failure_message(name, exc):
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {reason[:160]}" if reason else type(exc).__name__
    return (f"could not download {HUB_NAMESPACE}/{name} from the Hugging Face Hub ({reason}). "
            f"Check the network, log in with `hf auth login` (or set HF_TOKEN) and accept the "
            f"Gemma licence at {GEMMA_LICENCE_URL}; or build the offline tiny population with "
            f"`python initial_experts/expert_init.py --tiny`.")


def is_complete_adapter(path):
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


def download_published(out_dir, names=PUBLISHED_EXPERTS):
    # Fail within seconds when the Hub is unreachable instead of huggingface_hub's
    # default 10 s etag timeout per file plus retries; must be set before import.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise UsageError(f"huggingface_hub is not installed ({exc}); install the requirements.txt packages")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out_dir / name
        if is_complete_adapter(target):
            print(f"{name}: already present, skipped")
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=out_dir))
        try:
            snapshot_download(repo_id=f"{HUB_NAMESPACE}/{name}", local_dir=str(tmp),
                              allow_patterns=list(ADAPTER_FILES))
            if not is_complete_adapter(tmp):
                raise UsageError(f"{HUB_NAMESPACE}/{name} on the Hub lacks {' or '.join(ADAPTER_FILES)}; "
                                 f"it cannot be used as an initial expert")
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
            if target.exists():
                shutil.rmtree(target)  # an incomplete earlier copy
            os.replace(tmp, target)
        except UsageError:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # network, auth, gated repo, disk: all end the run the same way
            raise UsageError(_hub_failure_message(name, exc)) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"{name}: downloaded to {target}")


# ---------------------------------------------------------------- tiny population

def build_tokenizer(max_length):
    """Character-level tokenizer: every printable ASCII character, newline and four specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=max_length)


_TOPICS = ("cats", "rain", "music", "bread", "trains", "rivers", "chess", "stars", "tea", "gardens",
           "boats", "bees", "snow", "maps", "clocks", "forests", "kites", "apples", "bridges", "owls")
_ASKS = ("tell me about {t}", "what do you know about {t}?", "describe {t}", "say something about {t}",
         "why do people like {t}?", "write a line about {t}")
_ADJS = ("calm", "bright", "old", "quiet", "useful", "small", "warm", "strange", "simple", "lovely")
_FILLER = ("well i do not know", "maybe later", "ok ok ok", "that is a question", "hmm", "who can say")


def _good_reply(rng, topic):
    a, b = rng.sample(_ADJS, 2)
    return rng.choice((f"{topic} are {a} and {b}.", f"i think {topic} are {a}.",
                       f"many people find {topic} {a} and {b}.", f"{topic} can be {a}."))


def _bad_reply(rng, topic, other):
    kind = rng.randrange(4)
    if kind == 0:  # off topic
        return _good_reply(rng, other)
    if kind == 1:  # on topic, no final period
        return _good_reply(rng, topic)[:-1]
    if kind == 2:  # evasive filler
        return rng.choice(_FILLER)
    return _good_reply(rng, topic)[:-1] + " " + rng.choice(_FILLER)


def reward_target(prompt, response):
    """What the tiny reward model is trained to score, in [0, 1].

    0.5 if the response mentions the prompt's topic (any prompt word of >= 4 letters,
    plural 's' ignored) and 0.5 if it ends with a period; responses over 200 characters
    get nothing. Learnable by a 2-layer model, and it separates on-topic complete
    sentences from off-topic, unfinished or evasive ones.
    """
    response = response.strip()
    if not response or len(response) > 200:
        return 0.0
    words = {w.strip("?.,!").rstrip("s") for w in prompt.lower().split()}
    words = {w for w in words if len(w) >= 4}
    said = {w.strip("?.,!").rstrip("s") for w in response.lower().split()}
    return 0.5 * bool(words & said) + 0.5 * response.endswith(".")


def _chat_pair(rng):
    topic, other = rng.sample(_TOPICS, 2)
    return rng.choice(_ASKS).format(t=topic), topic, other


def _chat_text(tok, prompt, reply):
    return tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                   tokenize=False)


def _lm_batch(tok, texts, loss_from):
    """Right-padded batch; loss only on tokens at or after loss_from[i] characters (+1 for <bos>)."""
    import torch

    enc = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(enc, loss_from)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, 1 + start:len(row)] = torch.tensor(row[1 + start:])
    return ids, mask, labels


def _train(model, params, make_batch, steps, lr, log_every, label):
    """AdamW with warm-up and linear decay; params is a list of tensors or of AdamW param groups."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    params = [q for group in opt.param_groups for q in group["params"]]
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, steps)))
    model.train()
    for step in range(steps):
        loss = make_batch(step)(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  {label} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()


def _causal_loss(ids, mask, labels):
    def run(model):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return run


def _task_texts(items):
    texts = [it["question"] + " " + it["answer"] for it in items]
    starts = [len(it["question"]) for it in items]
    return texts, starts


def _build_into(out, seed, quick, log):
    import torch
    from data.tiny_demo import SKILLS, make_items

    r = TINY_RECIPE
    div = r["quick_divisor"] if quick else 1
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    # One thread + deterministic algorithms; build_tiny() has pinned the CPU kernels (see pinned_build_env()).
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import GemmaConfig, GemmaForCausalLM, GemmaForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        m = r["model"]
        tok = build_tokenizer(m["max_position_embeddings"])
        config = GemmaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **m)

        # base model: all skills plus chat exchanges, briefly
        torch.manual_seed(seed)
        config._attn_implementation = "eager"  # faster than sdpa for these tiny shapes on CPU
        base = GemmaForCausalLM(config)
        p = r["pretrain"]
        steps = max(2, p["steps"] // div)
        # Chat exchanges are longer than skill questions; separate batches keep padding small.
        n_chat_steps = steps // p["chat_every"] if p["chat_every"] else 0
        # make_items draws training data from the training part of the question space only (data/tiny_demo.py)
        task_pool = make_items((steps - n_chat_steps) * p["batch_size"], f"{seed}:{p['stream']}", ambiguous=True)
        rng = random.Random(f"chat:{seed}")
        task_batches = iter(range(steps))

        def pretrain_batch(step):
            if p["chat_every"] and (step + 1) % p["chat_every"] == 0:
                texts = []
                for _ in range(p["chat_batch_size"]):
                    prompt, topic, _ = _chat_pair(rng)
                    texts.append(_chat_text(tok, prompt, _good_reply(rng, topic)))
                return _causal_loss(*_lm_batch(tok, texts, [0] * len(texts)))
            k = next(task_batches)
            return _causal_loss(*_lm_batch(tok, *_task_texts(task_pool[k * p["batch_size"]:(k + 1) * p["batch_size"]])))

        _train(base, list(base.parameters()), pretrain_batch, steps, p["lr"],
               50 if log else 0, "base")
        base_dir = out / "base_model"
        base.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        if log:
            print(f"base model: {sum(x.numel() for x in base.parameters())} parameters, "
                  f"{time.time() - t0:.0f}s", flush=True)

        # experts: same base and LoRA init for all, one specialty each
        e = r["expert"]
        lcfg = r["lora"]
        for idx, (name, mix) in enumerate(r["experts"].items()):
            model = GemmaForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
            torch.manual_seed(seed + 1)
            peft_model = get_peft_model(model, LoraConfig(
                r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], target_modules=list(lcfg["target_modules"]),
                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
            skills = [s for s in SKILLS if s in mix]
            steps = max(2, e["steps"] // div)
            others = [s for s in SKILLS if s not in mix]
            n_replay = int(steps * e["batch_size"] * e["replay"]) if others else 0
            pool = make_items(steps * e["batch_size"] - n_replay, f"{seed}:expert:{name}", skills=skills,
                              weights=[mix[s] for s in skills])
            if n_replay:
                pool += make_items(n_replay, f"{seed}:replay:{name}", skills=others, ambiguous=True)
            random.Random(f"{seed}:shuffle:{name}").shuffle(pool)
            torch.manual_seed(seed + 100 + idx)

            def expert_batch(step, pool=pool, bs=e["batch_size"]):
                return _causal_loss(*_lm_batch(tok, *_task_texts(pool[step * bs:(step + 1) * bs])))

            params = [q for n, q in peft_model.named_parameters()
                      if q.requires_grad and (e["train_lora_A"] or "lora_A" not in n)]
            _train(peft_model, params, expert_batch, steps, e["lr"], 0, name)
            peft_model.save_pretrained(out / "experts" / name)
            if log:
                print(f"expert {name}: {'+'.join(skills)}, {time.time() - t0:.0f}s", flush=True)

        # reward model: starts from the base model's weights
        rw = r["reward"]
        torch.manual_seed(seed + 2)
        rm = GemmaForSequenceClassification.from_pretrained(base_dir, num_labels=1, attn_implementation="eager")
        rm.config.pad_token_id = tok.pad_token_id
        rng_rm = random.Random(f"reward:{seed}")
        steps = max(2, rw["steps"] // div)

        def reward_batch(step):
            texts, targets = [], []
            for _ in range(rw["batch_size"]):
                prompt, topic, other = _chat_pair(rng_rm)
                reply = _good_reply(rng_rm, topic) if rng_rm.random() < 0.4 else _bad_reply(rng_rm, topic, other)
                texts.append(_chat_text(tok, prompt, reply))
                targets.append(reward_target(prompt, reply))
            enc = tok(texts, padding=True, return_tensors="pt")
            # Scored both with and without a leading <bos>, as evaluators differ in that.
            if step % 2:
                enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
            target = torch.tensor(targets)

            def run(model):
                score = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.squeeze(-1)
                return torch.nn.functional.mse_loss(score, target)
            return run

        _train(rm, list(rm.parameters()), reward_batch, steps, rw["lr"], 50 if log else 0, "reward")
        rm.save_pretrained(out / "reward_model")
        tok.save_pretrained(out / "reward_model")
        if log:
            print(f"reward model done, {time.time() - t0:.0f}s total", flush=True)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# ---------------------------------------------------------------- reproducible build
# Everything from the "tiny population" line above to this line is the recipe: its text (with TINY_RECIPE,
# the tokenizer constants and data/tiny_demo.py) is hashed into the build stamp. Below: how a build is run,
# stamped, recorded and verified; editing it does not change the recipe hash.

RECIPE_START = "# " + "-" * 64 + " tiny population"
RECIPE_END = "# " + "-" * 64 + " reproducible build"
DEFAULT_TINY = HERE / "tiny"
# sha256 of every file of the shipped population and of every generated data file, in `sha256sum` format
# (paths relative to the repository root, so `sha256sum -c initial_experts/tiny.sha256` checks it too).
MANIFEST = HERE / "tiny.sha256"
RECORD_COMMAND = "python initial_experts/expert_init.py --tiny --rebuild --record"
RESTORE_HINT = (f"restore the shipped files with `git checkout -- initial_experts/tiny`, or after a deliberate "
                f"recipe change rebuild and re-record them with `{RECORD_COMMAND}`")

# CPU float results depend on which kernels run: ATen picks AVX2/AVX-512 code at run time and MKL its own
# code path per CPU, and both change the rounding of sums (measured: 4 distinct quick builds from the same
# seed on one AVX-512 machine by flipping these two). Pinned to the baseline x86-64 ATen kernels, MKL's
# reproducible-across-CPUs mode and one thread, a build gives the same bytes on any x86-64 CPU.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Libraries whose version changes the bytes of a build (weights, config.json, tokenizer.json).
BUILD_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "safetensors")


def recipe_hash(recipe):
    h = hashlib.sha256(json.dumps([recipe, SPECIAL_TOKENS, CHAT_TEMPLATE], sort_keys=True).encode())
    source = Path(__file__).resolve().read_text()
    h.update(source[source.index(RECIPE_START):source.index(RECIPE_END)].encode())
    h.update((REPO_ROOT / "data" / "tiny_demo.py").read_bytes())
    return h.hexdigest()[:16]


def library_versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in BUILD_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _stamp(seed, quick):
    """What the bytes of a build depend on: recipe, seed, pinned kernels and library versions."""
    recipe = dict(TINY_RECIPE, quick=bool(quick))
    return {"seed": seed, "quick": bool(quick), "recipe_hash": recipe_hash(recipe),
            "kernels": dict(PINNED_KERNELS), "versions": library_versions()}


def read_stamp(out):
    try:
        return json.loads((Path(out) / "build_stamp.json").read_text())
    except (OSError, ValueError):
        return None


def pin_build_kernels():
    """Set PINNED_KERNELS in this process; they act only if torch has not been imported yet."""
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in PINNED_KERNELS.items()):
        raise UsageError("the tiny build must pin its CPU kernels before torch is imported; run "
                         "`python initial_experts/expert_init.py --tiny` in its own process")
    os.environ.update(PINNED_KERNELS)


def _check_kernels_pinned():
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT" or os.environ.get("MKL_CBWR") != PINNED_KERNELS["MKL_CBWR"]:
        raise UsageError(f"the tiny build needs pinned CPU kernels (ATen capability DEFAULT and MKL_CBWR=COMPATIBLE, "
                         f"got {capability} and {os.environ.get('MKL_CBWR')}); run it through expert_init.py's CLI")


def _locked_build(out, seed, quick, log, keep):
    """Build into a temp folder beside out; keep(tmp) decides whether it replaces out. Returns keep's answer."""
    import fcntl

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent callers (parallel test sessions) wait for one builder instead of racing.
    # The lock lives outside the repository so that it never shows up as an untracked file.
    lock_path = Path(tempfile.gettempdir()) / f"bwr-tiny-{hashlib.sha1(str(out).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if keep is None and read_stamp(out) == _stamp(seed, quick):
            return False  # built meanwhile by another caller
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        os.chmod(tmp, 0o755)
        try:
            _check_kernels_pinned()
            _build_into(tmp, seed, quick, log)
            (tmp / "build_stamp.json").write_text(json.dumps(_stamp(seed, quick), indent=1, sort_keys=True) + "\n")
            _normalize_adapter_files(tmp)
            verdict = True if keep is None else keep(tmp)
            if verdict:
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            return verdict
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def build_tiny(out, seed=0, quick=False, log=True):
    """Build a tiny population into out unless out's stamp already matches; True if it built."""
    if read_stamp(out) == _stamp(seed, quick):
        if log:
            print(f"tiny population in {out} is up to date (seed {seed}); nothing to do")
        return False
    return _locked_build(out, seed, quick, log, keep=None)


def _normalize_adapter_files(tmp):
    # What peft writes beside the weights depends on where and in which process it ran: the temp build path
    # (adapter_config.json and the generated model card README.md) and target_modules in set order (string
    # hashing is randomized per process). The search passes -b explicitly; for tools that read
    # base_model_name_or_path, the base is named relative to the adapter folder, right wherever the population
    # lives. The model card holds nothing else of use and is dropped.
    for adapter in sorted(p for p in (tmp / "experts").iterdir() if p.is_dir()):
        cfg_path = adapter / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "../../base_model"
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (adapter / "README.md").unlink(missing_ok=True)


# What evaluate.py writes beside a candidate it scores (golds_preds_dev.json / golds_preds_test.json): outputs of
# using the population, not part of it.
EVALUATION_OUTPUTS = "golds_preds_*.json"


def file_hashes(root):
    """{path relative to root: sha256} of every file under root, evaluation outputs left out."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.match(EVALUATION_OUTPUTS)}


def read_manifest(path=MANIFEST):
    """{repository-relative path: sha256} from a `sha256sum`-format file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the population manifest {path} ({exc.strerror or exc}); "
                         f"restore it with `git checkout -- {Path(path).relative_to(REPO_ROOT)}`")
    entries = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[name.strip().lstrip("*")] = digest
    return entries


def manifest_population(manifest, prefix="initial_experts/tiny/"):
    return {k[len(prefix):]: v for k, v in manifest.items() if k.startswith(prefix)}


def manifest_data(manifest, prefix="data/eval/"):
    return {k[len(prefix):]: v for k, v in manifest.items() if k.startswith(prefix)}


def _differing(expected, found):
    return sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))


def _describe(names, limit=4):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def verify_tiny(out):
    """Check that out holds the shipped default population: stamp first, then every file's sha256."""
    out = Path(out)
    expected = manifest_population(read_manifest())
    stamp = read_stamp(out)
    if stamp is None:
        raise UsageError(f"{out} holds no tiny population (build_stamp.json missing or unreadable); {RESTORE_HINT}")
    want = _stamp(0, False)
    for key, what in (("recipe_hash", "recipe"), ("kernels", "kernel pin"), ("seed", "seed"), ("quick", "variant")):
        if stamp.get(key) != want[key]:
            raise UsageError(f"{out} was built with another {what} ({key} {json.dumps(stamp.get(key))}, this code "
                             f"expects {json.dumps(want[key])}); {RESTORE_HINT}")
    differ = _differing(expected, file_hashes(out))
    if differ:
        raise UsageError(f"{out} differs from {MANIFEST.relative_to(REPO_ROOT)} in {len(differ)} file(s) "
                         f"({_describe(differ)}); {RESTORE_HINT}")
    return stamp


def generated_data_hashes():
    """sha256 of every generated data file for the default seed, written into a temp folder."""
    from data import build as data_build
    from data import tiny_demo

    with tempfile.TemporaryDirectory() as tmp:
        data_build.build(tmp, seed=0)
        tiny_demo.write_dataset(Path(tmp) / "tiny_demo.json", seed=0)
        return file_hashes(tmp)


def write_manifest(population):
    lines = [f"# sha256 of the shipped tiny population and of the generated data files; re-record after a "
             f"deliberate recipe change with: {RECORD_COMMAND}"]
    lines += [f"{h}  initial_experts/tiny/{name}" for name, h in sorted(file_hashes(population).items())]
    lines += [f"{h}  data/eval/{name}" for name, h in sorted(generated_data_hashes().items())]
    tmp = MANIFEST.with_name(MANIFEST.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, MANIFEST)


def rebuild_tiny(out, record, log=True):
    """Rebuild the default population with the recipe and compare it with the manifest.

    Identical: installed into out. Different: out is left alone and a UsageError names the files,
    unless record, which installs the rebuilt files and re-records the manifest.
    """
    expected = manifest_population(read_manifest()) if MANIFEST.exists() or not record else {}
    differ = []

    def keep(tmp):
        differ.extend(_differing(expected, file_hashes(tmp)))
        if record:
            write_manifest(tmp)
        return record or not differ

    _locked_build(out, 0, False, log, keep)
    if differ and not record:
        raise RebuildDiffers(f"the rebuilt population differs from {MANIFEST.relative_to(REPO_ROOT)} in "
                             f"{len(differ)} file(s) ({_describe(differ)}); kept the files in {out}. After a "
                             f"deliberate recipe change re-record with `{RECORD_COMMAND}`")


class RebuildDiffers(Exception):
    """A rebuild gave other bytes than the manifest: a failed check (exit 1), not bad input."""


# ---------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"expert_init.py: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(description="Download the published LoRA experts, or verify / build the offline tiny population.")
    parser.add_argument("--tiny", action="store_true",
                        help="the embedded tiny population: verify the shipped initial_experts/tiny against "
                             "initial_experts/tiny.sha256 (or build one with --seed/--quick/--out)")
    parser.add_argument("--rebuild", action="store_true",
                        help="with --tiny: rebuild the shipped population with the recipe and compare it with the "
                             "manifest (installed only if identical)")
    parser.add_argument("--record", action="store_true",
                        help="with --tiny --rebuild: install the rebuilt population and re-record the manifest "
                             "(after a deliberate recipe change)")
    parser.add_argument("--seed", type=int, default=0, help="tiny build seed (default 0: the shipped population)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: initial_experts/tiny with --tiny, else initial_experts/)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny build with 1/{TINY_RECIPE['quick_divisor']} of the training steps (for tests)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of published experts to download")
    args = parser.parse_args(argv)

    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not args.tiny and (args.quick or args.seed != 0 or args.rebuild or args.record):
        parser.error("--quick, --seed, --rebuild and --record apply only to --tiny")
    if args.tiny and args.only:
        parser.error("--only applies only to the published experts (drop --tiny)")
    if args.record and not args.rebuild:
        parser.error("--record re-records the manifest from a rebuild: use --tiny --rebuild --record")
    out = Path(args.out).resolve() if args.out else DEFAULT_TINY
    shipped = args.seed == 0 and not args.quick
    if args.tiny and not shipped and out == DEFAULT_TINY:
        parser.error(f"--seed {args.seed}{' --quick' if args.quick else ''} would overwrite the shipped population "
                     f"in {DEFAULT_TINY}; give --out")
    if args.tiny and args.rebuild and not shipped:
        parser.error("--rebuild checks the shipped population (seed 0, full steps): drop --seed/--quick")
    if args.record and out != DEFAULT_TINY:
        parser.error(f"--record writes the manifest of {DEFAULT_TINY}: drop --out")
    try:
        if args.tiny:
            pin_build_kernels()
            t0 = time.time()
            if args.rebuild:
                rebuild_tiny(out, args.record)
                what = "re-recorded " + str(MANIFEST.relative_to(REPO_ROOT)) if args.record else \
                    f"identical to {MANIFEST.relative_to(REPO_ROOT)}"
                print(f"rebuilt the tiny population in {out} in {time.time() - t0:.0f}s: {what}")
            elif shipped:
                if not out.exists():  # another folder for the default population: a verified copy
                    verify_tiny(DEFAULT_TINY)
                    shutil.copytree(DEFAULT_TINY, out)
                stamp = verify_tiny(out)
                print(f"tiny population in {out} verified against {MANIFEST.relative_to(REPO_ROOT)} "
                      f"(seed 0, recipe {stamp['recipe_hash']})")
                if stamp.get("versions") != library_versions():
                    print(f"note: built with {stamp.get('versions')}, this environment has {library_versions()}; "
                          f"the shipped files are unchanged, but a --rebuild here may give other bytes")
            elif build_tiny(out, seed=args.seed, quick=args.quick):
                print(f"built tiny population in {out} (seed {args.seed}) in {time.time() - t0:.0f}s")
        else:
            names = PUBLISHED_EXPERTS
            if args.only:
                names = tuple(n.strip() for n in args.only.split(",") if n.strip())
                bad = [n for n in names if n not in PUBLISHED_EXPERTS]
                if bad or not names:
                    parser.error(f"--only: unknown expert(s) {bad}; choose from {','.join(PUBLISHED_EXPERTS)}")
            download_published(Path(args.out) if args.out else HERE, names)
    except UsageError as exc:
        print(f"expert_init.py: error: {exc}", file=sys.stderr)
        return 2
    except RebuildDiffers as exc:
        print(f"expert_init.py: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"expert_init.py: error: {exc.filename or ''} {exc.strerror or exc}".replace("  ", " "),
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
