"""-e lm_eval: lm-evaluation-harness tasks as the objective, on local YAML tasks over the tiny sets. The search's
figures are checked against lm_eval.simple_evaluate on the saved adapters, loaded fresh with peft."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, only_dir

ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
SPLITS = {"validation": ("dev", 20), "test": ("test", 30)}  # split file -> (tiny_demo_quick split, documents)

TASKS = {
    # multiple choice by log-likelihood: which digit follows "fst 4 5 7 8 5 ="
    "tiny_ll": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    # generate-until, exact match after a filter (the tiny experts answer " 4")
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder, splits=("validation", "test")):
    """folder/<task>.yaml for each of TASKS over JSONL files drawn from tiny_demo_quick, and <task>_dev.yaml, the same
    task with its validation split as its test split: what simple_evaluate scores for the search's dev set."""
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads((REPO / "data/eval/tiny_demo_quick.json").read_text())
    files = {}
    for split in splits:
        source, count = SPLITS[split]
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(item) + "\n" for item in data[source][:count]))
    for name, body in TASKS.items():
        head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n" + "".join(
            f"    {split}: {path}\n" for split, path in files.items())
        declared = "".join(f"{split}_split: {split}\n" for split in splits)
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{head}{declared}{body}")
        if "validation" in splits:
            (folder / f"{name}_dev.yaml").write_text(f"task: {name}_dev\n{head}test_split: validation\n{body}")
    return folder


def lm_eval_args(tasks, folder, *extra):
    return ["-e", "lm_eval", "--lm_eval_tasks", tasks, "--lm_eval_include_path", str(folder), "-g", "cpu",
            "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model", *extra]


def simple_evaluate(adapter, task, folder, tiny):
    """lm_eval.simple_evaluate's figure for the adapter folder, loaded fresh with peft on the base model."""
    from lm_eval import simple_evaluate as lm_eval_simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), adapter).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny.base), batch_size=8)
    result = lm_eval_simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    figures = result["results"][task]
    return next(v for k, v in figures.items() if "," in k and "_stderr" not in k)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_search_figures_equal_simple_evaluate(task, tiny, data, tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "search.py", "-n", "lm", *lm_eval_args(task, folder), "-m", "1", "-p", "3",
                           "--batch_size", "8", "--seed", "5", "--correctness_emergence", "1",
                           "--output_root", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    directory = only_dir(out)
    metrics = json.loads((directory / "final_metrics.json").read_text())
    best = str(directory / "global_best")
    assert metrics["ending_best_validation_utility"] == simple_evaluate(best, f"{task}_dev", folder, tiny)
    assert metrics["ending_best_single_test_accuracy"] == simple_evaluate(best, task, folder, tiny)
    assert metrics[f"ending_best_single_test_{task}"] == metrics["ending_best_single_test_accuracy"]
    # the starting figures are the experts' own
    pad = json.loads((directory / "utility_scratchpad.json").read_text())
    experts = sorted(os.listdir(tiny.experts))
    for i, name in enumerate(experts):
        assert pad[f"candidate_{i}_history"][0] == simple_evaluate(str(tiny.experts / name), f"{task}_dev", folder,
                                                                   tiny), name
    starting = str(tiny.experts / metrics["starting_best_expert"])
    assert metrics["starting_best_single_test_accuracy"] == simple_evaluate(starting, task, folder, tiny)
    # per-item scores came back: paired statistics, and one 0/1 row per candidate and iteration
    assert metrics["test_gain_items"] == SPLITS["test"][1]
    emergence = json.loads((directory / "correctness_emergence.json").read_text())
    assert len(emergence) == 10 and all(len(rows) == 2 for rows in emergence.values())
    assert all(set(row) <= {0.0, 1.0} and len(row) == SPLITS["validation"][1] for row in emergence["0"])
    assert "top3_ensemble_test_accuracy" in metrics
