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


def simple_evaluate(adapter, task, folder, tiny, **options):
    """lm_eval.simple_evaluate's figure for the adapter folder, loaded fresh with peft on the base model."""
    from lm_eval import simple_evaluate as lm_eval_simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), adapter).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny.base), batch_size=8)
    result = lm_eval_simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                     **options)
    figures = result["results"][task]
    return next(v for k, v in figures.items() if "," in k and "_stderr" not in k)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_search_figures_equal_simple_evaluate(task, tiny, data, tmp_path):
    """tiny_gen with --lm_eval_dev_limit: its dev set is a seeded draw of 15 of the 20 validation documents."""
    import harness
    folder = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    limit = ["--lm_eval_dev_limit", "15"] if task == "tiny_gen" else []
    proc = subprocess.run([sys.executable, "search.py", "-n", "lm", *lm_eval_args(task, folder, *limit), "-m", "1",
                           "-p", "3", "--batch_size", "8", "--seed", "5", "--correctness_emergence", "1",
                           "--output_root", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    directory = only_dir(out)
    metrics = json.loads((directory / "final_metrics.json").read_text())
    best = str(directory / "global_best")
    dev = {}
    if limit:
        assert "lm-eval task tiny_gen: dev = 15 of the 20 validation documents" in (directory / "log.txt").read_text()
        indices = harness.load_suite(task, str(folder), 15)[1][0].splits["dev"][1]
        dev = {"samples": {f"{task}_dev": indices}}
    dev_items = 15 if limit else SPLITS["validation"][1]
    assert metrics["ending_best_validation_utility"] == simple_evaluate(best, f"{task}_dev", folder, tiny, **dev)
    assert metrics["ending_best_single_test_accuracy"] == simple_evaluate(best, task, folder, tiny)
    assert metrics[f"ending_best_single_test_{task}"] == metrics["ending_best_single_test_accuracy"]
    # the starting figures are the experts' own
    pad = json.loads((directory / "utility_scratchpad.json").read_text())
    experts = sorted(os.listdir(tiny.experts))
    for i, name in enumerate(experts):
        assert pad[f"candidate_{i}_history"][0] == simple_evaluate(str(tiny.experts / name), f"{task}_dev", folder,
                                                                   tiny, **dev), name
    starting = str(tiny.experts / metrics["starting_best_expert"])
    assert metrics["starting_best_single_test_accuracy"] == simple_evaluate(starting, task, folder, tiny)
    # per-item scores came back: paired statistics, and one 0/1 row per candidate and iteration
    assert metrics["test_gain_items"] == SPLITS["test"][1]
    emergence = json.loads((directory / "correctness_emergence.json").read_text())
    assert len(emergence) == 10 and all(len(rows) == 2 for rows in emergence.values())
    assert all(set(row) <= {0.0, 1.0} and len(row) == dev_items for row in emergence["0"])
    assert "top3_ensemble_test_accuracy" in metrics


PERPLEXITY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}} {{answer}}"
metric_list:
  - metric: word_perplexity
"""


def test_one_split_is_cut_in_two_and_a_lower_is_better_metric_turned_around(tiny, data, tmp_path):
    """Tasks with a test split only: dev is a seeded half of it (--lm_eval_dev_limit draws from that half), test the
    other half, and the log says so; word perplexity (lower is better, log-likelihood of whole texts) enters the
    utility negated."""
    import evaluate
    import harness
    folder = write_tasks(tmp_path / "tasks", splits=("test",))
    ppl = (folder / "tiny_gen.yaml").read_text().split("output_type")[0].replace("task: tiny_gen", "task: tiny_ppl")
    (folder / "tiny_ppl.yaml").write_text(ppl + PERPLEXITY)
    notes = harness.check("tiny_ll,tiny_ppl", str(folder), 5)
    assert notes[0].startswith("lm-eval task tiny_ll: only split 'test': dev = 15 documents drawn with seed 1234, "
                               "test = the other 15; dev = 5 of the 15 test documents")
    assert "word_perplexity is lower-is-better: the utility counts it negated" in notes[1]
    _, plans = harness.load_suite("tiny_ll,tiny_ppl", str(folder), 5)
    (_, dev), (_, test) = plans[0].splits["dev"], plans[0].splits["test"]
    assert len(dev) == 5 and len(test) == 15 and not set(dev) & set(test) and dev == sorted(dev)
    assert plans[1].splits == plans[0].splits  # the same cut for every task of the same size
    try:
        evaluate.configure(lm_eval_include_path=str(folder), lm_eval_dev_limit=5, batch_size=8)
        utility, details = evaluate.evaluate_split(str(tiny.experts / "max_a"), "lm_eval", "tiny_ll,tiny_ppl", "cpu",
                                                   str(tiny.base), "dev")
    finally:
        evaluate.configure(reset=True)
    parts = details["parts"]
    expected = simple_evaluate(str(tiny.experts / "max_a"), "tiny_ppl", folder, tiny, samples={"tiny_ppl": dev})
    assert parts["tiny_ppl"]["value"] == expected > 1 and parts["tiny_ppl"]["utility"] == -expected
    assert parts["tiny_ll"]["items"] == 5
    assert utility == (parts["tiny_ll"]["utility"] + parts["tiny_ppl"]["utility"]) / 2
    # a perplexity has no per-item score that averages to it: no paired statistics, no vote
    assert details["scores"] == [] and details["golds"] == [None] * 10


LOGLIKELIHOOD = """output_type: loglikelihood
doc_to_text: "{{question}}"
doc_to_target: " {{answer}}"
metric_list:
  - metric: acc
"""


def test_loglikelihood_task_on_the_resident_model_equals_simple_evaluate(tiny, data, tmp_path):
    """A plain log-likelihood task (acc: the answer is the greedy continuation), scored in this process on the
    resident host after another adapter was swapped in, equals simple_evaluate on a fresh peft load."""
    import evaluate
    folder = write_tasks(tmp_path / "tasks")
    for name in ("tiny_next", "tiny_next_dev"):
        text = (folder / "tiny_gen_dev.yaml" if name.endswith("dev") else folder / "tiny_gen.yaml").read_text()
        head = text.split("output_type")[0].replace("task: tiny_gen", f"task: {name.removesuffix('_dev')}")
        (folder / f"{name}.yaml").write_text(head + LOGLIKELIHOOD)
    expert = str(tiny.experts / "snd_b")
    try:
        evaluate.configure(lm_eval_include_path=str(folder), batch_size=8)
        evaluate.evaluate_split(str(tiny.experts / "fst_a"), "lm_eval", "tiny_next", "cpu", str(tiny.base), "dev")
        results = {split: evaluate.evaluate_split(expert, "lm_eval", "tiny_next", "cpu", str(tiny.base), split)
                   for split in ("dev", "test")}
    finally:
        evaluate.configure(reset=True)
    assert 0 < results["dev"][0] < 1 and results["dev"][0] == simple_evaluate(expert, "tiny_next_dev", folder, tiny)
    assert results["test"][0] == simple_evaluate(expert, "tiny_next", folder, tiny)
    details = results["test"][1]
    assert len(details["scores"]) == SPLITS["test"][1] and sum(details["scores"]) / 30 == results["test"][0]
    assert details["golds"] == [None] * 30  # acc of a log-likelihood task is not a choice among options: no vote
