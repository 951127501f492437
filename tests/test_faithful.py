"""What users compare with the published toolkit (issue 15): results files and their names, defaults, the README's
commands, and the defects found side by side (the published data files and result files: test_published.py). Real
searches on the tiny population (three experts, small data slices), real subprocesses."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, only_dir

ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GPU_SCRIPTS = ["search_nlgraph.sh", "search_legal.sh", "search_concise.sh", "search_phd_application.sh",
               "search_lm_eval.sh"]


def search(root, *args, check=True, timeout=900):
    cmd = [sys.executable, "search.py", "-n", "t", "-g", "cpu", "-b", "initial_experts/tiny/base_model",
           "--output_root", str(root), "--seed", "3", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"search failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def small_data(data, tmp_path_factory):
    """The first items of the tiny sets (20 dev / 20 test), in a data dir of their own."""
    out = tmp_path_factory.mktemp("eval")
    for name in ("tiny_demo", "tiny_mc", "tiny_em", "nlgraph"):
        full = json.loads((data / f"{name}.json").read_text())
        (out / f"{name}.json").write_text(json.dumps({**full, "dev": full["dev"][:20], "test": full["test"][:20]}))
    return out


def published_log_dicts(log):
    test = re.search(r"final metrics for test: (\{.*\})$", log, re.M)
    dev = re.search(r"final ensemble metrics for dev: (\{.*\})$", log, re.M)
    assert test and dev, log[-2000:]
    return ast.literal_eval(test.group(1)), ast.literal_eval(dev.group(1))


# ---------------------------------------------------------------------------------------------------------------
# results files

@pytest.fixture(scope="module")
def emergence_run(three_experts, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("emergence")
    search(root, "-e", "exact_match", "-d", "tiny_demo", "-i", three_experts, "--data_dir", small_data, "-m", 2,
           "--correctness_emergence", 1, "--starting_test_set_eval", 1)
    return only_dir(root)


def test_correctness_emergence_json_is_written_in_the_published_shape(emergence_run):
    rows = json.loads((emergence_run / "correctness_emergence.json").read_text())
    assert sorted(rows) == ["0", "1", "2"]
    state = json.loads((emergence_run / "state.json").read_text())
    for i, per_iteration in rows.items():
        assert len(per_iteration) == 3  # iterations 0, 1, 2
        assert all(len(row) == 20 and set(row) <= {0.0, 1.0} for row in per_iteration)
        # each row is the candidate's dev correctness then: its mean is the utility it had at that iteration
        history = state["candidates"][int(i)]["history"]
        assert [sum(row) / 20 for row in per_iteration] == pytest.approx(history)


def test_scratchpad_has_the_published_keys_and_shapes(emergence_run):
    pad = json.loads((emergence_run / "utility_scratchpad.json").read_text())
    assert isinstance(pad["best"], float) and isinstance(pad["worst"], float)
    assert isinstance(pad["history"], list) and len(pad["history"]) == 3
    assert all(isinstance(v, float) for v in pad["history"]) and pad["history"][-1] == pad["best"]
    for i in range(3):
        assert isinstance(pad[f"candidate_{i}"], float)
        assert len(pad[f"candidate_{i}_history"]) == 3 and pad[f"candidate_{i}_history"][-1] == pad[f"candidate_{i}"]
    # a script written for the published files: the best candidate is the one whose utility equals "best"
    assert max(pad[f"candidate_{i}"] for i in range(3)) <= pad["best"]


def test_log_has_the_published_final_metrics_lines(emergence_run):
    log = (emergence_run / "log.txt").read_text()
    test, dev = published_log_dicts(log)
    assert list(test) == ["starting_best_validation_utility", "ending_best_validation_utility",
                          "starting_best_single_test_accuracy", "ending_best_single_test_accuracy",
                          "starting_top-k_ensemble_test_accuracy", "ending_top-k_ensemble_test_accuracy",
                          "ending_best_candidate_on_validation"]
    assert list(dev) == ["starting_top-k_ensemble_dev_accuracy", "ending_top-k_ensemble_dev_accuracy"]
    metrics = json.loads((emergence_run / "final_metrics.json").read_text())
    assert {**test, **dev}.items() <= metrics.items()
    # exact match: the ensemble is the mean per-item score, i.e. the mean of the candidates' utilities
    pad = json.loads((emergence_run / "utility_scratchpad.json").read_text())
    assert dev["ending_top-k_ensemble_dev_accuracy"] == pytest.approx(sum(pad[f"candidate_{i}"] for i in range(3)) / 3)
    state = json.loads((emergence_run / "state.json").read_text())
    starting = [c["history"][0] for c in state["candidates"]]
    assert dev["starting_top-k_ensemble_dev_accuracy"] == pytest.approx(sum(starting) / 3)
    tests = [metrics[f"candidate_{i}_test_utility"] for i in range(3)]
    assert test["ending_top-k_ensemble_test_accuracy"] == pytest.approx(sum(tests) / 3)
    assert test["starting_top-k_ensemble_test_accuracy"] == pytest.approx(
        sum(c["starting_test_utility"] for c in state["candidates"]) / 3)
    best = test["ending_best_candidate_on_validation"]
    assert pad[f"candidate_{best}"] == pad["best"]


def test_multitask_per_dataset_figures_are_written(three_experts, small_data, tmp_path):
    search(tmp_path, "-e", "multitask", "-d", "tiny_domain", "-i", three_experts, "--data_dir", small_data, "-m", 1)
    directory = only_dir(tmp_path)
    metrics = json.loads((directory / "final_metrics.json").read_text())
    log = (directory / "log.txt").read_text()
    test, _ = published_log_dicts(log)
    for split in ("test", "dev"):
        for name in ("tiny_mc", "tiny_em"):
            key = f"ending_best_single_{split}_{name}"
            assert 0.0 <= metrics[key] <= 1.0 and test[key] == metrics[key]
            assert f"{key}: {metrics[key]:.4f}" in log
    a, b = metrics["ending_best_single_test_tiny_mc"], metrics["ending_best_single_test_tiny_em"]
    assert metrics["ending_best_single_test_accuracy"] == pytest.approx(0.0 if a + b == 0 else 2 * a * b / (a + b))


# ---------------------------------------------------------------------------------------------------------------
# defects

def test_ties_and_dare_score_the_initial_experts_as_they_are(three_experts, small_data, tmp_path):
    utilities = {}
    for method in ("weighted_average", "dare", "ties"):
        search(tmp_path / method, "-e", "exact_match", "-d", "tiny_demo", "-i", three_experts, "--data_dir",
               small_data, "-m", 0, "--merge_method", method)
        pad = json.loads((only_dir(tmp_path / method) / "utility_scratchpad.json").read_text())
        utilities[method] = [pad[f"candidate_{i}_history"][0] for i in range(3)]
    assert utilities["dare"] == utilities["weighted_average"] == utilities["ties"]


def test_prompts_longer_than_the_context_stop_before_anything_starts(three_experts, data, tmp_path):
    """nlgraph's prompts (up to 3,625 characters) do not fit the tiny model's 2,048 positions."""
    proc = search(tmp_path, "-e", "exact_match", "-d", "nlgraph", "-i", three_experts, check=False, timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert re.search(r"dataset nlgraph \(dev split\) item \d+: its prompt is \d+ tokens \+ 10 to generate, more than "
                     r"the 2048 positions", line), line
    assert os.listdir(tmp_path) == []  # no search directory, no worker started


# ---------------------------------------------------------------------------------------------------------------
# defaults and starter scripts

def test_defaults_follow_the_published_search():
    sys.path.insert(0, str(REPO))
    import search as search_module
    defaults = vars(search_module.build_parser().parse_args([]))
    assert defaults["project_name_wb"] == "bwr"
    assert defaults["clean_up_on_end"] == 1
    assert defaults["initial_experts_num"] is None
    assert defaults["scoring"] == "published"


def test_populate_without_a_population_size_is_one_line(three_experts, data, tmp_path):
    proc = search(tmp_path, "-e", "exact_match", "-d", "tiny_demo", "-i", three_experts,
                  "--populate_initial_experts", 1, check=False, timeout=120)
    assert proc.returncode == 2 and "--initial_experts_num" in proc.stderr and proc.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_starter_scripts_use_the_published_iterations_and_project(script):
    out = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, check=True).stdout
    assert re.search(r" -m 200( |$)", out) and " -p 10 " in out and re.search(r"--project_name_wb bwr( |$)", out)


# ---------------------------------------------------------------------------------------------------------------
# the README's commands

DOC_PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
ENV_PREFIX = re.compile(r"^(?:[A-Z_]+=\S* )+")  # GPUS=0,1 bash ..., RAY_AUTH_MODE=token .venv/bin/python ...
VENV = ".venv/bin/"  # the docs name the project's interpreter, so their commands run in a fresh shell as typed
FRESH_SHELL = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", **ENV}


def readme_commands(pages=DOC_PAGES):
    """Every command the README and the docs pages show, as written: lines of their code blocks (continuation
    lines joined) and `inline` commands, comments removed, environment assignments in front dropped."""
    commands = []
    for page in pages:
        text = (REPO / page).read_text()
        for block in re.findall(r"```\n(.*?)```", text, re.S) + re.findall(r"\n((?:    \S.*\n)+)", text):
            block = re.sub(r"\\\n\s*", "", block)
            commands += [line.split("  #")[0].strip() for line in block.splitlines()]
        commands += re.findall(r"`((?:[A-Z_]+=\S* )*(?:(?:\.venv/bin/)?(?:python|hf)|bash|make) [^`]+)`", text)
    commands = [ENV_PREFIX.sub("", c) for c in commands]
    return [c for c in commands if re.match(r"((\.venv/bin/)?(python|hf)|bash|make|ray|conda)\b", c)]


def test_every_readme_command_names_something_that_exists():
    commands = readme_commands()
    assert any(c.startswith(VENV + "hf auth login") for c in commands)
    assert any("benchmarks/performance_report.py" in c for c in commands)
    for command in commands:
        words = command.split()
        # a bare python or hf is not what a fresh shell after make demo has: they name the venv's
        assert not re.match(r"(python|hf)\b", command), command
        tool = words[0].removeprefix(VENV)
        if tool == "python":
            script = words[2] if words[1] == "-m" else words[1]
            assert words[1] == "-m" or (REPO / script).is_file(), command
        elif tool == "bash":
            assert "*" in words[1] or (REPO / words[1]).is_file(), command
        elif tool == "hf":
            # the pinned huggingface_hub ships `hf` (not huggingface-cli): the subcommand must exist
            sub = [w for w in words[1:] if not w.startswith("-")][:2]
            proc = subprocess.run([str(Path(sys.executable).parent / "hf"), *sub, "--help"], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, (command, proc.stderr[-500:])
        elif tool == "make":
            assert re.search(rf"^{words[1]}:", (REPO / "Makefile").read_text(), re.M), command
        elif tool == "conda":
            assert (REPO / "bwr.yml").is_file()


def test_every_python_command_of_the_docs_parses_its_arguments():
    """Each `.venv/bin/python <script> ARGS` the README and docs show, run as written from a fresh shell (no
    environment activated, a bare PATH) with -h appended: the interpreter it names has what the script imports, and
    every argument before -h has a valid flag, type and choice (argparse checks them in order)."""
    if not (REPO / VENV / "python").exists():
        pytest.skip("no .venv: make demo (or make test) builds it")
    seen = set()
    for command in readme_commands():
        words = command.split()
        if words[0] != VENV + "python" or words[1] in ("-m", "-c") or command in seen:
            continue
        seen.add(command)
        args = [a.strip("'\"") for a in words[2:] if a not in ("...",)]
        proc = subprocess.run([words[0], words[1], *args, "-h"], cwd=REPO, capture_output=True, text=True,
                              env=FRESH_SHELL, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout, (command, proc.stderr[-1000:])
    assert len(seen) > 20


def test_readme_commands_that_run_offline(tiny, tmp_path):
    env = {**os.environ, **ENV, "DRY_RUN": "1", "PYTHON": sys.executable}
    for script in GPU_SCRIPTS + ["search_demo.sh"]:
        for args in ([], ["-m", "20", "-p", "5"]):
            subprocess.run(["bash", script, *args], cwd=REPO, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "data/build.py"], cwd=REPO, env=env, check=True, capture_output=True)
    # python merge.py --weights 0.5,0.5 --adapters a b --output out, with two real adapters for a and b
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny.experts / "max_a", a)
    shutil.copytree(tiny.experts / "fst_b", b)
    subprocess.run([sys.executable, REPO / "merge.py", "--weights", "0.5,0.5", "--adapters", "a", "b", "--output",
                    "out"], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    for command in ("initial_experts/expert_init.py", "data/prepare_data.py", "search.py"):
        subprocess.run([sys.executable, command, "-h"], cwd=REPO, env=env, check=True, capture_output=True)
    # the README's quick search, verbatim from a fresh shell when the venv it names exists (its output folder aside)
    quick = next(c for c in readme_commands(["README.md"]) if c.startswith(VENV + "python search.py -n quick"))
    interpreter, fresh = (VENV + "python", FRESH_SHELL) if (REPO / VENV).is_dir() else (sys.executable, env)
    subprocess.run([interpreter, *quick.split()[1:], "--output_root", str(tmp_path / "runs")], cwd=REPO, env=fresh,
                   check=True, capture_output=True, timeout=600)
    assert (only_dir(tmp_path / "runs") / "global_best").is_dir()
