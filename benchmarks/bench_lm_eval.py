"""Per-candidate cost of an lm-evaluation-harness objective (-e lm_eval) against the project's own multiple-choice
objective, on the same items with the same prompts.

tiny_mc's dev items (the tiny population, CPU unless -g says otherwise) are written as a local lm-eval task whose
prompt is exactly multiple_choice_prompt()'s and whose choices are the option letters (" A", " B", ... scored by
log-likelihood). Every expert is evaluated on the resident host, warm, --repeats times, interleaved:
  - multiple_choice, --mc_scoring logits (one forward pass per item, the letter with the highest log-probability),
  - multiple_choice, --mc_scoring generate (the default: generate, then read the letter),
  - lm_eval on the local task (harness.py: lm-eval's evaluator on an HFLM around the resident model).
Prints seconds per candidate, the share spent in model calls, and whether lm-eval's accuracy equals the logits
objective's for every expert (both pick the letter with the highest log-probability). Nothing is asserted.

    python benchmarks/bench_lm_eval.py [-g cpu] [--repeats 3] [--batch_size 32]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

TASK = """task: tiny_mc_letters
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {dev}
    test: {dev}
validation_split: validation
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: letters
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write_task(folder, items):
    """tiny_mc's dev items as a local lm-eval task with the project's prompt text."""
    from evaluate import multiple_choice_prompt
    dev = folder / "dev.jsonl"
    rows = [{"prompt": multiple_choice_prompt(item, "tiny_mc"), "letters": list(item["choices"]),
             "answer": item["answer"]} for item in items]
    dev.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_mc_letters.yaml").write_text(TASK.format(dev=dev))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-g", "--gpu", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args()
    import torch
    import evaluate as ev
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base, experts = REPO / "initial_experts/tiny/base_model", sorted((REPO / "initial_experts/tiny/experts").iterdir())
    items = json.loads((REPO / "data/eval/tiny_mc.json").read_text())["dev"]
    folder = Path(tempfile.mkdtemp(prefix="bench_lm_eval_"))
    write_task(folder, items)
    ways = {"multiple_choice (logits)": ("multiple_choice", "tiny_mc", {"mc_scoring": "logits"}),
            "multiple_choice (generate)": ("multiple_choice", "tiny_mc", {"mc_scoring": "generate"}),
            "lm_eval (log-likelihood)": ("lm_eval", "tiny_mc_letters", {})}
    seconds = {w: [] for w in ways}
    forward = {w: 0.0 for w in ways}
    utilities = {w: {} for w in ways}
    for way, (eval_type, dataset, options) in ways.items():  # warm: base model, data, lm-eval tasks loaded
        ev.configure(reset=True, batch_size=a.batch_size, lm_eval_include_path=str(folder), **options)
        ev.evaluate_split(str(experts[0]), eval_type, dataset, a.gpu, str(base), "dev")
    for _ in range(a.repeats):
        for way, (eval_type, dataset, options) in ways.items():
            ev.configure(reset=True, batch_size=a.batch_size, lm_eval_include_path=str(folder), **options)
            for expert in experts:
                start = time.perf_counter()
                utility, details = ev.evaluate_split(str(expert), eval_type, dataset, a.gpu, str(base), "dev")
                seconds[way].append(time.perf_counter() - start)
                forward[way] += details["forward_seconds"]
                utilities[way][expert.name] = utility
    print(f"{len(items)} tiny_mc dev items, {len(experts)} experts x {a.repeats} repeats, batch size "
          f"{a.batch_size}, device {a.gpu}, torch threads {torch.get_num_threads()}")
    for way in ways:
        mean = sum(seconds[way]) / len(seconds[way])
        print(f"  {way:28s} {mean * 1000:7.1f} ms per candidate  (model calls {forward[way] / sum(seconds[way]):.0%})")
    logits, harness = utilities["multiple_choice (logits)"], utilities["lm_eval (log-likelihood)"]
    print(f"  lm_eval accuracy equals the logits objective's for every expert: {logits == harness}")
    ratio = (sum(seconds["lm_eval (log-likelihood)"]) / sum(seconds["multiple_choice (logits)"]))
    print(f"  lm_eval / multiple_choice (logits): {ratio:.2f}x the time per candidate")


if __name__ == "__main__":
    main()
