"""How fast is one candidate evaluation, and how much of it is model forward passes?

On the tiny population (CPU unless -g says otherwise):
  1. resident host (this toolkit): base model loaded once, each adapter copied into the LoRA slot, batched
     left-padded generation: seconds per candidate and the share spent inside model.generate / forward;
  2. the published evaluation on the same adapters and prompts (benchmarks/published_baseline.evaluate, CPU only),
     in this process with its imports done as in the published pool worker: from_pretrained of the base model,
     load_adapter, tokenizer, batches of 10, generate(max_new_tokens=10), substring scoring without its sleep;
  3. multiple choice scored by one forward pass (mc_scoring=logits) vs by generation, on a set with short prompts
     (tiny_mc) and one with a shared in-context example (tiny_mc_icl, the knowledge_crosswords format).
Figures are printed; nothing is asserted. Targets: forward share >= 90%, >= 5x faster than the published strategy,
logits >= 3x faster than generate.

    python benchmarks/bench_evaluate.py [-g cpu] [--published_runs 3] [--candidates 10]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def ensure_inputs(data_dir):
    """Tiny population and the generated tiny_demo / tiny_mc sets (each built only if missing or stale), copied
    into data_dir; returns tiny_demo."""
    for script in (["initial_experts/expert_init.py", "--tiny"], ["data/build.py"], ["data/tiny_demo.py"]):
        subprocess.run([sys.executable, *script], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    for name in ("tiny_demo", "tiny_mc", "tiny_mc_icl"):
        (data_dir / f"{name}.json").write_text((REPO / "data" / "eval" / f"{name}.json").read_text())
    return json.loads((data_dir / "tiny_demo.json").read_text())


def resident(ev, experts, base, device, eval_type, dataset, runs):
    """Seconds per evaluation and forward share, host already warm."""
    ev.evaluate(str(experts[0]), eval_type, dataset, device, base)  # loads the base model once (not timed)
    walls, forwards = [], []
    for i in range(runs):
        start = time.perf_counter()
        _, details = ev.evaluate_split(str(experts[i % len(experts)]), eval_type, dataset, device, base, "dev")
        walls.append(time.perf_counter() - start)
        forwards.append(details["forward_seconds"])
    return sum(walls) / runs, sum(forwards) / sum(walls)


def published(experts, base, dev, runs, threads):
    """The published evaluation (benchmarks/published_baseline.evaluate) in this process, its imports done, as in
    one of the published loop's pool workers: base model, adapter and tokenizer loaded for each candidate, batches of
    10, 10 new tokens, no 0.2 s sleep per correct answer (the published scorer's artefact is left out)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import published_baseline
    walls, forwards = [], []
    for i in range(runs):
        start = time.perf_counter()
        result = published_baseline.evaluate(str(experts[i % len(experts)]), base, dev, False, threads)
        walls.append(time.perf_counter() - start)
        forwards.append(result["forward"])
    return sum(walls) / runs, sum(forwards) / sum(walls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-g", "--gpu", default="cpu", help="'cpu' or a GPU index (default cpu)")
    parser.add_argument("--candidates", type=int, default=10, help="resident evaluations to time (default 10)")
    parser.add_argument("--published_runs", type=int, default=3, help="published evaluations to time (default 3)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch threads in both strategies (default $OMP_NUM_THREADS or 1)")
    args = parser.parse_args()
    device = args.gpu if args.gpu == "cpu" else int(args.gpu)

    import torch
    import evaluate as ev
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        demo = ensure_inputs(data_dir)
        tiny = REPO / "initial_experts" / "tiny"
        base = str(tiny / "base_model")
        experts = sorted(p for p in (tiny / "experts").iterdir() if (p / "adapter_config.json").is_file())
        ev.configure(data_dir=str(data_dir))
        n = len(demo["dev"])
        print(f"tiny population: {len(experts)} experts; exact_match tiny_demo dev ({n} items); device {device}; "
              f"{args.threads} torch thread(s)")

        sec, share = resident(ev, experts, base, device, "exact_match", "tiny_demo", args.candidates)
        print(f"resident host     : {sec:7.3f} s/candidate   forward share {share:6.1%}")
        if device == "cpu":
            psec, pshare = published(experts, base, demo["dev"], args.published_runs, args.threads)
            print(f"published strategy: {psec:7.3f} s/candidate   forward share {pshare:6.1%}   "
                  f"(imports done; from_pretrained + load_adapter + tokenizer per evaluation, batches of 10)")
        else:
            psec = float("nan")
            print("published strategy: not measured on a GPU here (benchmarks/published_baseline.py runs on CPU)")
        print(f"speed-up          : {psec / sec:7.1f}x   (target >= 5x; forward share target >= 90%)")

        # tiny_mc: short prompts sharing only the instruction line; tiny_mc_icl: the knowledge_crosswords format,
        # whose in-context example is a long prefix shared by every prompt (mc_scoring=logits computes it once)
        for dataset in ("tiny_mc", "tiny_mc_icl"):
            ev.configure(mc_scoring="generate")
            gsec, gshare = resident(ev, experts, base, device, "multiple_choice", dataset, args.candidates)
            ev.configure(mc_scoring="logits")
            lsec, lshare = resident(ev, experts, base, device, "multiple_choice", dataset, args.candidates)
            print(f"multiple choice {dataset} dev: generate {gsec:.3f} s/candidate, logits {lsec:.3f} s/candidate "
                  f"-> {gsec / lsec:.1f}x (target >= 3x); forward share {gshare:.1%} / {lshare:.1%}")


if __name__ == "__main__":
    main()
