"""A search that survives: SIGKILL + --resume bit for bit, dead workers, bad input, secrets."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_harness import write_tasks
from test_search import only_dir, run_search

SEARCH_ARGS = ["-m", "2", "-p", "5"]


def weights(directory, sub="global_best"):
    return load_file(os.path.join(directory, sub, "adapter_model.safetensors"))


def resume_search(directory):
    """search.py --resume DIRECTORY, to its end: the finished process."""
    return subprocess.run([sys.executable, "search.py", "--resume", directory], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900)


def same_result(a, b):
    pad_a = json.load(open(os.path.join(a, "utility_scratchpad.json")))
    pad_b = json.load(open(os.path.join(b, "utility_scratchpad.json")))
    assert pad_a == pad_b
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    run_search(root, *SEARCH_ARGS)
    return only_dir(root)


@pytest.mark.parametrize("point", ["evaluation:13", "move:3", "scratchpad:2", "before_commit:3"])
def test_sigkill_then_resume_is_bit_for_bit(reference, tmp_path, point):
    proc = run_search(tmp_path, *SEARCH_ARGS, env={"BWR_CRASH_AT": point}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    directory = only_dir(tmp_path)
    resumed = resume_search(directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(reference, directory)
    assert "resuming search" in open(os.path.join(directory, "log.txt")).read()


# --rule published_code: restarts after 2 history entries without improvement (-p 4), so that iteration 2 holds
# every branch (move, explore, restart-copy); global_worst/ kept to be read
PUBLISHED_ARGS = ["-m", "2", "-p", "4", "--rule", "published_code", "--clean_up_on_end", "0"]


@pytest.fixture(scope="module")
def published_reference(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    run_search(root, *PUBLISHED_ARGS)
    return only_dir(root)


def test_published_rule_logs_its_branches_and_keeps_the_worst_ever(published_reference, tiny):
    """Every proposal's log line names its branch; the Worst the rule reads, global_worst/, is the worst initial
    expert as it was (greedy acceptance never lowers a member), while the population's worst has moved on."""
    directory = published_reference
    log = open(os.path.join(directory, "log.txt")).read()
    proposals = [line for line in log.splitlines() if re.search(r"candidate_\d+: (move|explore|restart-copy) ", line)]
    assert len(proposals) == 20
    for branch in ("move (r4 > 0.2", "explore (uniform in +-max|t|", "restart-copy of candidate_"):
        assert any(branch in line for line in proposals), branch
    state = json.load(open(os.path.join(directory, "state.json")))
    initial = [c["history"][0] for c in state["candidates"]]
    worst = min(range(len(initial)), key=lambda i: (initial[i], i))
    assert state["worst"] == {"utility": initial[worst], "candidate": worst, "iteration": 0}
    assert min(c["utility"] for c in state["candidates"]) > initial[worst]  # the run this test relies on
    expert = sorted(os.listdir(tiny.experts))[worst]
    frozen = weights(directory, "global_worst")
    original = load_file(tiny.experts / expert / "adapter_model.safetensors")
    assert frozen.keys() == original.keys() and all(torch.equal(frozen[k], original[k]) for k in frozen)


def test_published_rule_resumes_bit_for_bit_after_sigkill(published_reference, tmp_path):
    # 10 initial evaluations, the starting best's test, 10 in iteration 1: killed part-way through iteration 2
    proc = run_search(tmp_path, *PUBLISHED_ARGS, env={"BWR_CRASH_AT": "evaluation:25"}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    directory = only_dir(tmp_path)
    resumed = resume_search(directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(published_reference, directory)
    for sub in ("global_worst", *(f"candidate_{i}" for i in range(10))):
        wa, wb = weights(published_reference, sub), weights(directory, sub)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub


def test_resume_reads_the_float_versions_of_earlier_states(reference, tmp_path):
    """A state.json written before versions counted weight changes numbered them by iteration, k + 0.5 for a
    restart in iteration k: such a state resumes to the same result, and its versions become integers."""
    proc = run_search(tmp_path, *SEARCH_ARGS, env={"BWR_CRASH_AT": "before_commit:3"}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    directory = only_dir(tmp_path)
    path = os.path.join(directory, "state.json")
    state = json.load(open(path))
    assert state["iteration"] == 1 and any(c["version"] == 1 for c in state["candidates"])
    for record in state["candidates"] + [state["best"]]:
        record["version"] += 0.5 if record["version"] else 0  # as if restarted in iteration 1
    open(path, "w").write(json.dumps(state))
    resumed = resume_search(directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(reference, directory)
    state = json.load(open(path))
    assert all(type(record["version"]) is int for record in state["candidates"] + [state["best"]])


def test_killed_worker_is_restarted_and_its_task_retried(reference, tmp_path):
    args = [sys.executable, "search.py", "-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
            "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model",
            "--output_root", str(tmp_path), "--seed", "7", *SEARCH_ARGS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    driver = psutil.Process(proc.pid)
    killed = False
    deadline = time.time() + 600
    # wait until the first iteration's evaluations run, then kill the worker in the middle of them
    while time.time() < deadline and proc.poll() is None and not killed:
        log = os.path.join(only_dir(tmp_path), "log.txt") if os.listdir(tmp_path) else None
        if log and os.path.exists(log) and "starting best" in open(log).read():
            for child in driver.children(recursive=True):
                if "spawn_main" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGKILL)
                    killed = True
                    break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=900)
    assert killed
    assert proc.returncode == 0, out[-3000:]
    log = open(os.path.join(only_dir(tmp_path), "log.txt")).read()
    assert "died" in log and "retrying once" in log and "SIGKILL" in log
    same_result(reference, only_dir(tmp_path))


def test_api_keys_never_reach_output_files(tiny, data, tmp_path):
    secret = "sk-FAKE-SECRET-4242424242"
    env = {"PERSPECTIVE_API_KEY": secret, "HF_TOKEN": secret, "WANDB_API_KEY": secret,
           "GOOGLE_API_KEY": secret}
    run_search(tmp_path, "-m", "1", "--wandb_mode", "offline", env=env)
    directory = only_dir(tmp_path)
    checked = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(folder, name)
            checked += 1
    assert checked > 10
    assert os.path.isdir(os.path.join(directory, "wandb"))


# --- bad input: one line, exit 2, no traceback, no directory left behind --------------------------------------

BASE = ["-n", "bad", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu", "-i", "initial_experts/tiny/experts",
        "-b", "initial_experts/tiny/base_model"]


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def make_expert_dir(tmp_path, tiny, count, tweak=None):
    import shutil
    folder = tmp_path / "experts"
    folder.mkdir()
    names = sorted(os.listdir(tiny.experts))[:count]
    for name in names:
        shutil.copytree(tiny.experts / name, folder / name)
    if tweak:
        tweak(folder, names)
    return str(folder)


def change_rank(folder, names):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(REPO / "initial_experts/tiny/base_model")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    import shutil
    shutil.rmtree(folder / names[-1])
    model.save_pretrained(folder / names[-1])


def bin_adapter(folder, names):
    (folder / names[0] / "adapter_model.safetensors").rename(folder / names[0] / "adapter_model.bin")


def lm_eval_case(tasks, damage=None, *extra):
    """-e lm_eval arguments over the local tiny tasks, with damage(folder) applied to their folder."""
    def make(t, tiny):
        folder = write_tasks(t / "tasks")
        if damage:
            damage(folder)
        return ["-n", "bad", "-e", "lm_eval", "--lm_eval_tasks", tasks, "--lm_eval_include_path", str(folder), "-g",
                "cpu", "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model", *extra]
    return make


def edit_task(name, old, new):
    def damage(folder):
        path = folder / f"{name}.yaml"
        path.write_text(path.read_text().replace(old, new))
    return damage


BAD_CASES = {
    "unknown eval type": (lambda t, tiny: replace(BASE, "-e", "sentiment"), "unknown eval type"),
    "eval type does not fit": (lambda t, tiny: replace(replace(BASE, "-e", "multiple_choice"), "-d", "tiny_rm"),
                               "tiny_rm"),
    "missing dataset": (lambda t, tiny: replace(BASE, "-d", "no_such_set"), "no_such_set"),
    "dataset with a path": (lambda t, tiny: replace(BASE, "-d", "../etc/passwd"), "path"),
    "missing expert folder": (lambda t, tiny: replace(BASE, "-i", str(t / "nowhere")), "does not exist"),
    "empty expert folder": (lambda t, tiny: (t.joinpath("empty").mkdir(), replace(BASE, "-i", str(t / "empty")))[1],
                            "no experts found"),
    "fewer than 3 experts": (lambda t, tiny: replace(BASE, "-i", make_expert_dir(t, tiny, 2)), "at least 3"),
    "different ranks": (lambda t, tiny: replace(BASE, "-i", make_expert_dir(t, tiny, 4, change_rank)), "differ"),
    "pickle adapter": (lambda t, tiny: replace(BASE, "-i", make_expert_dir(t, tiny, 4, bin_adapter)),
                       "safe_serialization"),
    "base model mismatch": (lambda t, tiny: replace(BASE, "-b", str(t / "nomodel")), "base model"),
    "bad merge params json": (lambda t, tiny: BASE + ["--merge_params", "{threshold: 1"], "merge_params"),
    "early rejection of an unbounded reward": (
        lambda t, tiny: replace(replace(BASE, "-e", "rm_default"), "-d", "tiny_rm") + ["--early_reject"],
        "an unbounded reward"),
    "early rejection of a harmonic mean": (
        lambda t, tiny: replace(replace(BASE, "-e", "multitask"), "-d", "science") + ["--early_reject"],
        "harmonic mean"),
    "early rejection with pso": (lambda t, tiny: BASE + ["--optimizer", "pso", "--early_reject", "0.01"],
                                 "needs greedy acceptance"),
    "early rejection without greedy": (lambda t, tiny: BASE + ["--greedy", "0", "--early_reject"], "--greedy 1"),
    "early rejection level": (lambda t, tiny: BASE + ["--early_reject", "1.5"], "--early_reject 1.5 is out of range"),
    "unknown merge param": (lambda t, tiny: BASE + ["--merge_method", "ties", "--merge_params", '{"thresh": 1}'],
                            "thresh"),
    "unknown merge method": (lambda t, tiny: BASE + ["--merge_method", "soup"], "soup"),
    "gpu not present": (lambda t, tiny: replace(BASE, "-g", "7"), "GPU 7"),
    "malformed gpus": (lambda t, tiny: replace(BASE, "-g", "0,,x"), "malformed"),
    "negative patience": (lambda t, tiny: BASE + ["-p", "-1"], "--patience"),
    "step length factor above 1": (lambda t, tiny: BASE + ["--step_length_factor", "1.5"], "--step_length_factor"),
    "dropK outside [0,1]": (lambda t, tiny: BASE + ["--dropK", "2"], "--dropK"),
    "name with a path separator": (lambda t, tiny: replace(BASE, "-n", "a/b"), "path separator"),
    "unknown flag": (lambda t, tiny: BASE + ["--frobnicate", "1"], "frobnicate"),
    "published rule with pso": (lambda t, tiny: BASE + ["--rule", "published_code", "--optimizer", "pso"],
                                "--optimizer bwr"),
    # the optimizers' own flags and refusals, declared on their classes (optimizers.py)
    "negative pso coefficient": (lambda t, tiny: BASE + ["--optimizer", "pso", "--inertia", "-1"],
                                 "--inertia -1.0 is out of range: it must be a number >= 0"),
    "all pso coefficients 0": (lambda t, tiny: BASE + ["--optimizer", "pso"] + [
        w for flag in ("inertia", "cognitive_coeff", "social_coeff", "repel_coeff") for w in (f"--{flag}", "0")],
        "pso needs one > 0"),
    "cma_es with dropN": (lambda t, tiny: BASE + ["--optimizer", "cma_es", "--dropN", "0.1"], "CMA-ES needs every"),
    "cma_es flag with bwr": (lambda t, tiny: BASE + ["--cma_sigma0", "0.3"],
                             "--cma_sigma0 is a cma_es setting; --optimizer bwr does not use it"),
    "bwr reset with random": (lambda t, tiny: BASE + ["--optimizer", "random", "--reset_mode", "bounds"],
                              "--reset_mode is a bwr setting"),
    "published rule with bounds reset": (lambda t, tiny: BASE + ["--rule", "published_code", "--reset_mode",
                                                                 "bounds"], "leave --reset_mode at scaled_random"),
    "published rule with base_model_idx 2": (lambda t, tiny: BASE + ["--rule", "published_code", "--merge_method",
                                                                     "ties", "--merge_params",
                                                                     '{"base_model_idx": 2}'], "use 0 or 1"),
    "resume of a non-search": (lambda t, tiny: ["--resume", str(t)], "not a search directory"),
    "missing perspective key": (lambda t, tiny: replace(replace(BASE, "-e", "external_api"), "-d", "tiny_rm"),
                                "PERSPECTIVE_API_KEY"),
    "missing vertex project": (lambda t, tiny: replace(replace(BASE, "-e", "human"), "-d", "tiny_human"),
                               "GOOGLE_CLOUD_PROJECT"),
    "lm_eval with -d": (lambda t, tiny: replace(BASE, "-e", "lm_eval"), "-d tiny_demo_quick has no use"),
    "lm_eval flag on another type": (lambda t, tiny: BASE + ["--lm_eval_tasks", "arc_easy"], "-e lm_eval option"),
    "unknown lm-eval task": (lm_eval_case("tiny_ll,no_such_task"), "unknown lm-eval task 'no_such_task'"),
    "lm-eval task YAML that does not parse": (
        lm_eval_case("tiny_ll", lambda f: (f / "broken.yaml").write_text("task: broken\ndataset_path: json\n  x: [")),
        "broken.yaml does not parse"),
    "lm-eval task without a usable split": (
        lm_eval_case("tiny_ll", edit_task("tiny_ll", "validation_split: validation\ntest_split: test",
                                          "training_split: validation")),
        "'tiny_ll' cannot be loaded: ValueError: Task dataset (path=json, name=None) must have valid or test docs"),
    "lm-eval task data file missing": (
        lm_eval_case("tiny_ll", lambda f: (f / "test.jsonl").unlink()),
        "'tiny_ll' cannot be loaded: FileNotFoundError"),
    "lm-eval dev limit 0": (lm_eval_case("tiny_ll", None, "--lm_eval_dev_limit", "0"), "--lm_eval_dev_limit 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tiny, data, tmp_path):
    make_args, expected = BAD_CASES[case]
    args = make_args(tmp_path, tiny)
    output_root = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PERSPECTIVE_API_KEY", "GOOGLE_CLOUD_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS")}
    proc = subprocess.run([sys.executable, "search.py", *args, "--output_root", str(output_root)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("search.py: error: ")
    assert expected in lines[0], lines[0]
    assert not output_root.exists() or not any(output_root.iterdir())


def test_unwritable_output_root(tiny, data, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file_not_dir"  # root ignores permission bits: a file where a folder must go
        target.write_text("x")
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    proc = subprocess.run([sys.executable, "search.py", *BASE, "--output_root", str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_resume_refuses_unsafe_changes_and_accepts_safe_ones(reference):
    proc = subprocess.run([sys.executable, "search.py", "--resume", reference, "-e", "multiple_choice"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--eval_type" in proc.stderr
    proc = subprocess.run([sys.executable, "search.py", "--resume", reference, "--batch_size", "4"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
