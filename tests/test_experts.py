"""initial_experts/expert_init.py and data/tiny_demo.py: real builds, real models, real subprocesses."""

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, run_cli

sys.path.insert(0, str(REPO))
from data.tiny_demo import SKILLS, answer_of, make_dataset, make_items, part_of, skill_of  # noqa: E402

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


def test_tiny_demo_dataset_is_deterministic_disjoint_and_large():
    a, b = make_dataset(0), make_dataset(0)
    assert a == b and a != make_dataset(1)
    assert a["dataset"] == "tiny_demo" and len(a["dev"]) >= 1000 and len(a["test"]) >= 3000
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


def test_evaluation_questions_come_from_a_reserved_part_that_training_never_draws():
    evaluation = make_dataset(0)["dev"] + make_dataset(0)["test"] + make_dataset(1, 50, 50)["test"]
    assert {part_of(it["question"]) for it in evaluation} == {"eval"}
    training = make_items(5000, "0:pretrain", ambiguous=True) + make_items(2000, "0:expert:x", skills=("max",))
    assert {part_of(it["question"]) for it in training} == {"train"}
    # the reserved part is about 1 question in 8 of the whole space
    space = [f"{s} {' '.join(f'{i:05d}')} =" for s in SKILLS for i in range(0, 100000, 7)]
    assert 0.11 < sum(part_of(q) == "eval" for q in space) / len(space) < 0.14
    # smaller splits are a prefix-free redraw from the same reserved part; training data has no split argument
    small = make_dataset(0, 10, 20)
    assert {part_of(it["question"]) for it in small["dev"] + small["test"]} == {"eval"}
    with pytest.raises(ValueError, match="unknown part"):
        make_items(1, 0, part="dev")


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


def _all_files(root):
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# The outer environments of two machines: AVX2 kernels, MKL's own dispatch and 2 threads, against whatever this
# machine picks by itself (AVX-512 where it has it). The build pins its kernels, so neither may leak into the bytes.
OUTER_ENVS = ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
              {})


@pytest.fixture(scope="module")
def quick_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    outs = [root / "avx2", root / "native"]
    procs = []
    for out, extra in zip(outs, OUTER_ENVS):
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS",
                                                                 "MKL_NUM_THREADS", "PYTHONHASHSEED")}
        env.update(extra)
        procs.append(subprocess.Popen([PYTHON, SCRIPT, "--tiny", "--quick", "--seed", "0", "--out", str(out)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
    return outs


def test_quick_build_is_byte_identical_under_other_cpu_kernels(quick_builds):
    a, b = quick_builds
    fa, fb = _all_files(a), _all_files(b)
    assert len([k for k in fa if k.endswith("adapter_model.safetensors")]) == EXPERT_NAMES
    assert "base_model/model.safetensors" in fa and "reward_model/model.safetensors" in fa
    assert "base_model/tokenizer.json" in fa and "build_stamp.json" in fa
    assert fa.keys() == fb.keys()
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"{differ} differ between builds under ATEN_CPU_CAPABILITY=avx2 and the machine's default"
    stamp = json.loads(fa["build_stamp.json"])
    assert stamp["kernels"]["ATEN_CPU_CAPABILITY"] == "default" and stamp["kernels"]["MKL_CBWR"] == "COMPATIBLE"
    assert stamp["versions"]["torch"] == torch.__version__


def test_build_is_cached_and_rebuilt_for_another_seed(quick_builds, tmp_path):
    a = quick_builds[0]
    stamp = json.loads((a / "build_stamp.json").read_text())
    assert stamp["seed"] == 0 and stamp["quick"] is True
    proc = run_cli([SCRIPT, "--tiny", "--quick", "--out", a], timeout=300)
    assert proc.returncode == 0 and "up to date" in proc.stdout
    other = tmp_path / "seed1"
    assert run_cli([SCRIPT, "--tiny", "--quick", "--seed", "1", "--out", other], timeout=900).returncode == 0
    fa, fo = _files(a), _files(other)
    assert fa["experts/max_a/adapter_model.safetensors"] != fo["experts/max_a/adapter_model.safetensors"]
    assert not [p for p in other.parent.iterdir() if p.name.startswith(".seed1.build-")]


def test_build_with_another_stamp_is_rebuilt(quick_builds, tmp_path):
    # A population built by other library versions (or kernels, or recipe) is never taken as up to date.
    copy = tmp_path / "copy"
    shutil.copytree(quick_builds[0], copy)
    stamp = json.loads((copy / "build_stamp.json").read_text())
    stamp["versions"]["torch"] = "0.0.0"
    (copy / "build_stamp.json").write_text(json.dumps(stamp))
    proc = run_cli([SCRIPT, "--tiny", "--quick", "--out", copy], timeout=900)
    assert proc.returncode == 0 and "built tiny population" in proc.stdout, proc.stderr[-2000:]
    assert _all_files(copy) == _all_files(quick_builds[0])


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


def test_default_experts_are_specialists_and_their_average_beats_each(tiny_population):
    """What docs/tiny.md says of the shipped population: each expert has learnt the intended convention of its own
    operation (its name's prefix) and not the others, and a merge of total weight 1 (the uniform average, in LoRA
    factor space as --merge_method weighted_average) beats every single expert by a clear margin."""
    from merge import merge_state_dicts
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
    dev = make_dataset(0)["dev"][:300]
    by_op = {op: [it for it in dev if skill_of(it["question"]) == op] for op in SKILLS}

    def accuracy(state):
        set_peft_model_state_dict(model, state)
        per_op = {op: _exact_match(model, tok, items) for op, items in by_op.items()}
        # the whole slice's accuracy from the per-operation ones (one generation pass per item)
        return per_op, sum(per_op[op] * len(items) for op, items in by_op.items()) / len(dev)

    utilities = []
    for path, state in zip(experts, states):
        per_op, utility = accuracy(state)
        own = path.name.split("_")[0]
        assert per_op[own] > 0.85, (path.name, per_op)
        assert all(per_op[op] < 0.75 for op in SKILLS if op != own), (path.name, per_op)
        utilities.append(utility)
    _, average = accuracy(merge_state_dicts(states, [1 / len(states)] * len(states), "weighted_average"))
    assert average > max(utilities) + 0.05, (average, utilities)


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


def _manifest():
    entries = {}
    for line in (REPO / "initial_experts" / "tiny.sha256").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split("  ", 1)
            entries[name] = digest
    return entries


def _hashes(root):
    # golds_preds_*.json: what evaluate.py writes beside a candidate it scores, not part of the population
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.match("golds_preds_*.json")}


def test_shipped_population_matches_the_manifest(tiny_population):
    expected = {k[len("initial_experts/tiny/"):]: v for k, v in _manifest().items()
                if k.startswith("initial_experts/tiny/")}
    assert len([k for k in expected if k.endswith("adapter_model.safetensors")]) == EXPERT_NAMES
    found = _hashes(tiny_population)
    assert found.keys() == expected.keys()
    assert [k for k in expected if found[k] != expected[k]] == []
    assert sum(p.stat().st_size for p in tiny_population.rglob("*") if p.is_file()) < 2_000_000


def test_generated_data_matches_the_manifest(tmp_path):
    expected = {k[len("data/eval/"):]: v for k, v in _manifest().items() if k.startswith("data/eval/")}
    assert {"tiny_demo.json", "nlgraph.json", "tiny_mc.json"} <= expected.keys()
    assert run_cli(["data/build.py", "--out", tmp_path], timeout=600).returncode == 0
    assert run_cli(["data/tiny_demo.py", "--out", tmp_path / "tiny_demo.json"], timeout=120).returncode == 0
    assert _hashes(tmp_path) == expected


def test_default_call_verifies_and_touches_nothing(tiny_population):
    before = {p: p.stat().st_mtime_ns for p in tiny_population.rglob("*")}
    proc = run_cli([SCRIPT, "--tiny"], timeout=300)
    assert proc.returncode == 0 and "verified against initial_experts/tiny.sha256" in proc.stdout, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in tiny_population.rglob("*")} == before
    assert "torch" not in proc.stdout  # no note: this environment has the versions it was built with


def test_verify_refuses_a_changed_population(tiny_population, tmp_path):
    fresh = tmp_path / "fresh"
    proc = run_cli([SCRIPT, "--tiny", "--out", fresh], timeout=300)  # a verified copy of the shipped files
    assert proc.returncode == 0 and "verified" in proc.stdout, proc.stderr
    assert _hashes(fresh) == _hashes(tiny_population)

    weights = fresh / "experts" / "max_a" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    line = _one_line_error(run_cli([SCRIPT, "--tiny", "--out", fresh], timeout=300))
    assert "experts/max_a/adapter_model.safetensors" in line and "--rebuild --record" in line

    shutil.rmtree(fresh)
    shutil.copytree(tiny_population, fresh)
    stamp = json.loads((fresh / "build_stamp.json").read_text())
    stamp["recipe_hash"] = "0" * 16
    (fresh / "build_stamp.json").write_text(json.dumps(stamp))
    line = _one_line_error(run_cli([SCRIPT, "--tiny", "--out", fresh], timeout=300))
    assert "another recipe" in line and "0" * 16 in line


# ---------------------------------------------------------------- published experts and CLI errors


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_published_download_without_network_fails_with_one_line(tmp_path, env):
    # How fast it gives up is a figure of benchmarks/bench_tiny.py; the timeout only guards against a hang.
    env = {"HF_HUB_ETAG_TIMEOUT": "", "HF_HUB_DOWNLOAD_TIMEOUT": "", **env}
    env = {k: v for k, v in env.items() if v}
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    full.update(env)
    proc = subprocess.run([PYTHON, SCRIPT, "--out", str(tmp_path)], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)
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
                                  ["--quick"], ["--only", "nope"], ["--tiny", "--only", "cot"], ["--rebuild"],
                                  ["--tiny", "--record"], ["--tiny", "--quick"], ["--tiny", "--seed", "2"],
                                  ["--tiny", "--rebuild", "--quick", "--out", "/tmp/x"],
                                  ["--tiny", "--rebuild", "--record", "--out", "/tmp/x"]])
def test_bad_args_exit_2_with_one_line(args):
    line = _one_line_error(run_cli([SCRIPT, *args], timeout=120))
    assert line.startswith("expert_init.py: error:")


def test_unwritable_tiny_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(run_cli([SCRIPT, "--tiny", "--quick", "--out", blocker / "tiny"], timeout=120))
    assert "expert_init.py: error:" in line
