"""End-to-end tests of search.py on the tiny population: real worker processes, real models, real files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, only_dir


def run_search(tmp_path, *extra, env=None, name="t", check=True, timeout=900, output=None):
    """output: a file for stdout and stderr instead of pipes (reading a pipe to its end waits for every process that
    inherited it, so a test that looks for processes left behind must not use one)."""
    args = [sys.executable, "search.py", "-n", name, "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
            "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model",
            "--output_root", str(tmp_path), "--seed", "7", *extra]
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    if output is None:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=full_env, timeout=timeout)
        said = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        with open(output, "w") as f:
            proc = subprocess.run(args, cwd=REPO, stdout=f, stderr=f, env=full_env, timeout=timeout)
        said = Path(output).read_text()[-3000:]
    if check and proc.returncode != 0:
        raise AssertionError(f"search failed ({proc.returncode}):\n{said}")
    return proc


@pytest.fixture(scope="module")
def two_iterations(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    proc = run_search(root, "-m", "2", "-p", "5", "--to_visualize", "1", "--correctness_emergence", "1")
    return root, only_dir(root), proc


def test_search_produces_every_output(two_iterations):
    root, directory, proc = two_iterations
    for name in ("args.json", "log.txt", "utility_scratchpad.json", "state.json", "final_metrics.json",
                 "utility_curve.png", "trajectory.png", "global_best", "candidate_0", "correctness_emergence.json"):
        assert os.path.exists(os.path.join(directory, name)), name
    # --clean_up_on_end 1 (the published default) removes the worst, as the published clean-up does
    assert not os.path.exists(os.path.join(directory, "global_worst"))
    pad = json.load(open(os.path.join(directory, "utility_scratchpad.json")))
    n = len([d for d in os.listdir(directory) if d.startswith("candidate_")])
    assert n == 10
    for key in ("best", "worst", "history"):
        assert key in pad
    for i in range(n):
        assert len(pad[f"candidate_{i}_history"]) == 3  # initial + 2 iterations
    assert pad["best"] >= max(pad[f"candidate_{i}_history"][0] for i in range(n))
    log = open(os.path.join(directory, "log.txt")).read()
    metrics = json.load(open(os.path.join(directory, "final_metrics.json")))
    for key in ("starting_best_validation_utility", "starting_best_single_test_accuracy",
                "ending_best_validation_utility", "ending_best_single_test_accuracy"):
        assert key in log and key in metrics
        assert 0.0 <= metrics[key] <= 1.0
    assert "top3_ensemble_test_accuracy" in metrics
    assert metrics["ending_best_validation_utility"] >= metrics["starting_best_validation_utility"]
    assert "profile:" in log and "forward" in log
    assert "1 local worker(s) on ['cpu'] started during validation" in log  # spawned before the expert checks
    assert os.path.basename(directory).startswith("t_")
    state = json.load(open(os.path.join(directory, "state.json")))
    # every candidate's per-item dev scores at every iteration; their mean is the utility recorded then
    emergence = json.load(open(os.path.join(directory, "correctness_emergence.json")))
    assert set(emergence) == {str(i) for i in range(n)}
    for i in range(n):
        rows, history = emergence[str(i)], pad[f"candidate_{i}_history"]
        assert len(rows) == len(history) == 3
        for scores, utility in zip(rows, history):
            assert sum(scores) / len(scores) == pytest.approx(utility)
    assert f"log: {os.path.join(directory, 'log.txt')}" in proc.stdout


def test_global_best_loads_in_peft_and_matches_its_utility(two_iterations, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, directory, _ = two_iterations
    base = AutoModelForCausalLM.from_pretrained(tiny.base)
    model = PeftModel.from_pretrained(base, os.path.join(directory, "global_best"))
    saved = load_file(os.path.join(directory, "global_best", "adapter_model.safetensors"))
    assert saved, "empty adapter"
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # evaluated afresh, in this process, global_best/ scores the dev utility the search recorded for it
    import evaluate
    recorded = json.load(open(os.path.join(directory, "state.json")))["best"]["utility"]
    utility = evaluate.evaluate(str(os.path.join(directory, "global_best")), "exact_match", "tiny_demo_quick", "cpu",
                                str(tiny.base))
    assert utility == pytest.approx(recorded)
    metrics = json.load(open(os.path.join(directory, "final_metrics.json")))
    assert metrics["ending_best_validation_utility"] == pytest.approx(recorded)


def test_same_seed_gives_identical_scratchpad(two_iterations, tmp_path):
    _, first, _ = two_iterations
    run_search(tmp_path, "-m", "2", "-p", "5")
    second = only_dir(tmp_path)
    a = json.load(open(os.path.join(first, "utility_scratchpad.json")))
    b = json.load(open(os.path.join(second, "utility_scratchpad.json")))
    assert a == b
    wa = load_file(os.path.join(first, "global_best", "adapter_model.safetensors"))
    wb = load_file(os.path.join(second, "global_best", "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_name_is_never_overwritten(two_iterations, tiny, data):
    root, first, _ = two_iterations
    before = set(os.listdir(root))
    run_search(root, "-m", "0")
    after = set(os.listdir(root))
    assert len(after - before) == 1
    assert (after - before).pop().startswith(os.path.basename(first) + "_")


def test_search_checks_its_arguments_without_torch():
    """search.py reads the merge methods and optimizers to check its arguments, and starts the workers, before it
    imports torch (2 s): merge.py and bwr.py import it where they use it (DESIGN.md, Performance)."""
    code = "import sys, search; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "search.py", "-h"], cwd=REPO, capture_output=True, text=True, check=True)
    for flag in ("--name", "--eval_type", "--dataset", "--gpus", "--initial_expert_directory", "--base_model",
                 "--patience", "--max_iteration", "--step_length", "--step_length_factor", "--minimum_step_length",
                 "--restart_stray_candidates", "--restart_patience", "--populate_initial_experts",
                 "--initial_experts_num", "--starting_test_set_eval", "--fast_merge", "--project_name_wb",
                 "--clean_up_on_end", "--only_one_or_two", "--to_visualize", "--correctness_emergence", "--dropK",
                 "--dropN", "--merge_method", "--merge_params", "--num_cpu_when_merging", "--seed", "--reset_mode",
                 "--rule", "--greedy", "--batch_size", "--mc_scoring", "--scoring", "--reward_model",
                 "--trust_remote_code", "--judge_model", "--wandb_mode", "--resume", "--lock_wait", "--backend",
                 "--ray_address", "--lm_eval_tasks", "--lm_eval_include_path", "--lm_eval_dev_limit"):
        assert flag in out.stdout, flag
    from data.schema import EVAL_TYPES
    text = " ".join(out.stdout.split())  # argparse re-wraps help text
    for name, row in EVAL_TYPES.items():  # -e's help is made from the table of evaluation types
        assert f"{name} ({row.help}; utility: {row.metric}" in text, name
    assert "{readme,published_code}" in text and "the published TIES ignores its weights" in text


@pytest.mark.parametrize("script,expect", [
    ("search_nlgraph.sh", ["-e exact_match", "-d nlgraph", "-g 0,1,2,3,4"]),
    ("search_legal.sh", ["-e multitask", "-d legal"]),
    ("search_concise.sh", ["-e rm_concise", "-d rm", "--trust_remote_code 1"]),
    ("search_phd_application.sh", ["-e human", "-d human_phd_application"]),
    ("search_demo.sh", ["-g cpu", "-d tiny_demo"]),
    ("search_lm_eval.sh", ["-e lm_eval", "--lm_eval_tasks arc_challenge,hellaswag", "-b google/gemma-7b-it"]),
])
def test_starter_scripts_pass_their_arguments(script, expect):
    out = subprocess.run(["bash", script, "-m", "20", "-p", "5"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, check=True).stdout
    assert "search.py" in out
    for piece in expect:
        assert piece in out, (piece, out)
    assert out.rstrip().endswith("-m 20 -p 5")


def test_starter_scripts_run_the_venv_interpreter_in_a_fresh_shell(tiny, data, tmp_path):
    """A fresh shell after `make demo` has no PYTHON and no activated .venv: the scripts pick .venv/bin/python
    (an explicit PYTHON= still wins), and the demo script runs for real that way."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # no interpreter with the requirements on PATH
    for script in ("search_nlgraph.sh", "search_legal.sh", "search_concise.sh", "search_phd_application.sh",
                   "search_lm_eval.sh"):
        out = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                             env={**env, "DRY_RUN": "1"}, check=True).stdout
        assert out.startswith(".venv/bin/python search.py "), out
        out = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                             env={**env, "DRY_RUN": "1", "PYTHON": "python3.11"}, check=True).stdout
        assert out.startswith("python3.11 search.py "), out
    venv = REPO / ".venv" / "bin" / "python"
    if not venv.exists():
        pytest.skip("no .venv (make demo builds it)")
    proc = subprocess.run(["bash", "search_demo.sh", "-d", "tiny_demo_quick", "-m", "1", "--output_root",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**env, "WANDB_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (only_dir(tmp_path) / "global_best" / "adapter_model.safetensors").is_file()


def test_search_without_its_requirements_says_how_to_get_them():
    """python -S: an interpreter without site-packages (a shell's python, not .venv's)."""
    proc = subprocess.run([sys.executable, "-S", "search.py", "-h"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "has no '" in lines[0] and ".venv/bin/python search.py" in lines[0] and "requirements.txt" in lines[0]


def test_gpu_script_without_gpu_stops_at_once_pointing_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run(["bash", "search_nlgraph.sh"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert "-g cpu" in proc.stderr and "search_demo.sh" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_other_merge_method_and_bounds_reset_run(tiny, data, tmp_path):
    run_search(tmp_path, "-m", "1", "--merge_method", "task_arithmetic", "--merge_params", '{"base_model_idx": 1}',
               "--reset_mode", "bounds", "--greedy", "0", "--populate_initial_experts", "1",
               "--initial_experts_num", "12", "--dropN", "0.3", "--clean_up_on_end", "0")
    directory = only_dir(tmp_path)
    assert os.path.exists(os.path.join(directory, "global_worst", "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(directory, "global_best", "adapter_model.safetensors"))
    pad = json.load(open(os.path.join(directory, "utility_scratchpad.json")))
    assert "candidate_11" in pad
