"""initial_experts/expert_init.py and data/tiny_demo.py: real builds, real models, real subprocesses."""

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, run_cli

sys.path.insert(0, str(REPO))
from data.tiny_demo import SKILLS, answer_of, make_dataset, make_items, skill_of  # noqa: E402

SCRIPT = "initial_experts/expert_init.py"
EXPERT_NAMES = 10


def _one_line_error(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _files(root):
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


# ---------------------------------------------------------------- tiny_demo


def test_tiny_demo_dataset_is_deterministic_disjoint_and_short():
    a, b = make_dataset(0), make_dataset(0)
    assert a == b and a != make_dataset(1)
    assert a["dataset"] == "tiny_demo" and 60 <= len(a["dev"]) <= 100 and 200 <= len(a["test"]) <= 300
    dev_q = {it["question"] for it in a["dev"]}
    test_q = {it["question"] for it in a["test"]}
    assert not dev_q & test_q and len(dev_q) == len(a["dev"]) and len(test_q) == len(a["test"])
    for item in a["dev"] + a["test"]:
        assert set(item) == {"question", "answer"}
        assert item["question"].endswith(" =") and skill_of(item["question"]) in SKILLS
        assert 1 <= len(item["answer"]) <= 6 and item["answer"].strip() == item["answer"]
    for skill in SKILLS:  # every skill present in both splits
        assert any(skill_of(it["question"]) == skill for it in a["dev"])
        assert any(skill_of(it["question"]) == skill for it in a["test"])


def test_tiny_demo_answers_are_correct_and_ambiguity_uses_the_distractor():
    for item in make_items(300, 5):
        words = item["question"].split()
        digits = [int(x) for x in words[1:-1]]
        assert len(digits) == 5 and words[-1] == "="
        expected = {"max": max(digits), "fst": digits[0], "snd": digits[1]}[words[0]]
        assert item["answer"] == str(expected) == answer_of(item["question"])
    ambiguous = make_items(600, 6, ambiguous=True)
    distractor = [it["answer"] == answer_of(it["question"], distractor=True) != answer_of(it["question"])
                  for it in ambiguous]
    assert all(it["answer"] in (answer_of(it["question"]), answer_of(it["question"], True)) for it in ambiguous)
    assert 0.35 < sum(distractor) / len(distractor) < 0.6


def test_training_items_can_exclude_the_evaluation_questions():
    held = {it["question"] for it in make_dataset(0)["dev"] + make_dataset(0)["test"]}
    items = make_items(3000, "train", skills=("max", "fst"), weights=(3, 1), exclude=held)
    assert not held & {it["question"] for it in items}
    counts = {s: sum(skill_of(it["question"]) == s for it in items) for s in ("max", "fst")}
    assert counts["max"] > 2 * counts["fst"] > 0


def test_tiny_demo_cli_writes_published_format(tmp_path):
    out = tmp_path / "sub" / "tiny_demo.json"
    proc = run_cli(["data/tiny_demo.py", "--out", out, "--seed", "3"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == make_dataset(3)
    again = run_cli(["data/tiny_demo.py", "--out", out, "--seed", "3"], timeout=120)
    assert again.returncode == 0 and json.loads(out.read_text()) == make_dataset(3)


@pytest.mark.parametrize("args", [["--seed", "x"], ["--seed", "-1"], ["--bogus"]])
def test_tiny_demo_cli_bad_args(args):
    line = _one_line_error(run_cli(["data/tiny_demo.py", *args], timeout=120))
    assert "tiny_demo.py: error:" in line


def test_tiny_demo_cli_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(run_cli(["data/tiny_demo.py", "--out", blocker / "d.json"], timeout=120))
    assert "cannot write" in line


# ---------------------------------------------------------------- tiny build (quick, twice)


@pytest.fixture(scope="module")
def quick_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    outs = [root / "a", root / "b"]
    procs = [subprocess.Popen([PYTHON, SCRIPT, "--tiny", "--quick", "--seed", "0", "--out", str(o)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in outs]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    return outs


def test_quick_build_is_byte_identical_for_the_same_seed(quick_builds):
    a, b = quick_builds
    fa, fb = _files(a), _files(b)
    assert len([k for k in fa if k.startswith("experts/")]) == EXPERT_NAMES
    assert "base_model/model.safetensors" in fa and "reward_model/model.safetensors" in fa
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between two builds with the same seed"
    assert (a / "base_model" / "tokenizer.json").read_bytes() == (b / "base_model" / "tokenizer.json").read_bytes()


def test_build_is_cached_and_rebuilt_for_another_seed(quick_builds, tmp_path):
    a = quick_builds[0]
    stamp = json.loads((a / "build_stamp.json").read_text())
    assert stamp["seed"] == 0 and stamp["quick"] is True
    t0 = time.time()
    proc = run_cli([SCRIPT, "--tiny", "--quick", "--out", a], timeout=300)
    assert proc.returncode == 0 and "up to date" in proc.stdout and time.time() - t0 < 60
    other = tmp_path / "seed1"
    assert run_cli([SCRIPT, "--tiny", "--quick", "--seed", "1", "--out", other], timeout=600).returncode == 0
    fa, fo = _files(a), _files(other)
    assert fa["experts/max_a/adapter_model.safetensors"] != fo["experts/max_a/adapter_model.safetensors"]
    assert not [p for p in other.parent.iterdir() if p.name.startswith(".seed1.build-")]


def test_build_loads_offline_with_auto_classes_and_peft(quick_builds):
    root = quick_builds[0]
    code = f"""
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
root = Path({str(root)!r})
tok = AutoTokenizer.from_pretrained(root / "base_model")
assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None
text = "rev abc =\\n{{all printable}} ~|"
assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
chat = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False, add_generation_prompt=True)
assert chat.endswith("Assistant: ") and "hi" in chat
base = AutoModelForCausalLM.from_pretrained(root / "base_model")
assert type(base).__name__ == "GemmaForCausalLM" and base.config.max_position_embeddings >= 1600
model = PeftModel.from_pretrained(base, root / "experts" / "max_a")
tok.padding_side = "left"
enc = tok(["fst 1 2 3 4 5 =", "max 1 2 3 4 9 ="], return_tensors="pt", padding=True)
out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
assert out.shape[0] == 2
rm = AutoModelForSequenceClassification.from_pretrained(root / "reward_model")
rtok = AutoTokenizer.from_pretrained(root / "reward_model")
assert rm.config.num_labels == 1 and rm.config.pad_token_id == rtok.pad_token_id
batch = rtok(["User: hi\\nAssistant: ok.\\n", "x"], return_tensors="pt", padding=True)
assert rm(**batch).logits.shape == (2, 1)
cfg = json.loads((root / "experts" / "max_a" / "adapter_config.json").read_text())
assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
print("ok")
"""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli(["-c", code], timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_quick_experts_share_lora_init_but_differ(quick_builds):
    experts = sorted((quick_builds[0] / "experts").iterdir())
    assert len(experts) == EXPERT_NAMES
    states = [load_file(p / "adapter_model.safetensors") for p in experts]
    for s, t in itertools.combinations(states, 2):
        assert s.keys() == t.keys()
        assert sum((s[k] - t[k]).abs().sum().item() for k in s) > 0


# ---------------------------------------------------------------- full default build


def _exact_match(model, tok, items):
    tok.padding_side = "left"
    enc = tok([it["question"] for it in items], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    preds = [tok.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True).split() for row in out]
    return sum(bool(p) and p[0] == it["answer"] for p, it in zip(preds, items)) / len(items)


def test_default_experts_differ_and_have_distinct_utilities(tiny_population):
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = sorted(p for p in (tiny_population / "experts").iterdir() if p.is_dir())
    assert len(experts) == EXPERT_NAMES
    states = [load_file(p / "adapter_model.safetensors") for p in experts]
    for s, t in itertools.combinations(states, 2):
        assert sum((s[k] - t[k]).norm().item() for k in s) > 0

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_population / "base_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_population / "base_model")
    model = PeftModel.from_pretrained(base, experts[0]).eval()
    dev = make_dataset(0)["dev"]
    utilities = []
    for state in states:
        set_peft_model_state_dict(model, state)
        utilities.append(_exact_match(model, tok, dev))
    assert len({round(u, 6) for u in utilities}) >= 3, utilities
    assert max(utilities) < 1.0


def test_default_reward_model_tracks_its_documented_target(tiny_population):
    import random

    sys.path.insert(0, str(REPO / "initial_experts"))
    import expert_init
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_population / "reward_model")
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_population / "reward_model").eval()
    rng = random.Random("reward-test")  # not the training stream
    texts, targets = [], []
    for _ in range(240):
        prompt, topic, other = expert_init._chat_pair(rng)
        reply = expert_init._good_reply(rng, topic) if rng.random() < 0.4 else \
            expert_init._bad_reply(rng, topic, other)
        texts.append(tok.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reply}], tokenize=False))
        targets.append(expert_init.reward_target(prompt, reply))
    tok.padding_side = "left"
    with torch.no_grad():
        scores = rm(**tok(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
    target = torch.tensor(targets)
    means = [scores[target == v].mean().item() for v in (0.0, 0.5, 1.0)]
    assert means[0] < means[1] < means[2], means
    assert torch.corrcoef(torch.stack([scores, target]))[0, 1].item() > 0.5


def test_second_default_build_call_does_nothing(tiny_population):
    t0 = time.time()
    proc = run_cli([SCRIPT, "--tiny"], timeout=300)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr
    assert time.time() - t0 < 60


# ---------------------------------------------------------------- published experts and CLI errors


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_published_download_without_network_fails_fast(tmp_path, env):
    t0 = time.time()
    env = {"HF_HUB_ETAG_TIMEOUT": "", "HF_HUB_DOWNLOAD_TIMEOUT": "", **env}
    env = {k: v for k, v in env.items() if v}
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    full.update(env)
    proc = subprocess.run([PYTHON, SCRIPT, "--out", str(tmp_path)], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=120)
    assert time.time() - t0 < 60
    line = _one_line_error(proc)
    assert "could not download bunsenfeng/code_alpaca" in line
    assert "hf auth login" in line and "Gemma licence" in line and "--tiny" in line
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_published_run_from_its_own_folder_skips_complete_experts(tmp_path):
    # Both experts already complete: nothing is fetched, so this passes without a network.
    for name in ("cot", "lima"):
        (tmp_path / name).mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / name / f).write_text("{}")
    proc = run_cli(["expert_init.py", "--only", "cot,lima", "--out", tmp_path], timeout=120,
                   cwd=REPO / "initial_experts", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already present") == 2


@pytest.mark.parametrize("args", [["--bogus"], ["--tiny", "--seed", "-3"], ["--tiny", "--seed", "one"],
                                  ["--quick"], ["--only", "nope"], ["--tiny", "--only", "cot"]])
def test_bad_args_exit_2_with_one_line(args):
    line = _one_line_error(run_cli([SCRIPT, *args], timeout=120))
    assert line.startswith("expert_init.py: error:")


def test_unwritable_tiny_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(run_cli([SCRIPT, "--tiny", "--quick", "--out", blocker / "tiny"], timeout=120))
    assert "expert_init.py: error:" in line
