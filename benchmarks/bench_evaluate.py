"""How fast is one candidate evaluation, and how much of it is model forward passes?

On the tiny population (CPU unless -g says otherwise):
  1. resident host (this toolkit): base model loaded once, each adapter copied into the LoRA slot, batched
     left-padded generation: seconds per candidate and the share spent inside model.generate / forward;
  2. the published evaluation on the same adapters and prompts (benchmarks/published_baseline.evaluate, CPU only),
     in this process with its imports done as in the published pool worker: from_pretrained of the base model,
     load_adapter, tokenizer, batches of 10, generate(max_new_tokens=10), substring scoring without its sleep;
  3. multiple choice scored by one forward pass (mc_scoring=logits) vs by generation, on a set with short prompts
     (tiny_mc) and one with a shared in-context example (tiny_mc_icl, the knowledge_crosswords format);
  4. generation alone (tiny_demo dev, its exact-match budget, every expert): batches of 32 (the former CPU default)
     vs the automatic batch size (all prompts in one batch here), each with generate(), with the greedy loop
     (_greedy_decode) without prefix sharing, and with it (what the search runs), interleaved --repeats times;
     whether all six give the same outputs.
Figures are printed; nothing is asserted. Targets: forward share >= 90%, >= 5x faster than the published strategy,
logits >= 3x faster than generate.

    python benchmarks/bench_evaluate.py [-g cpu] [--published_runs 3] [--candidates 10] [--sections 1,2,3,4]
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


def generation_levers(ev, experts, base, device, dev, repeats):
    """Seconds per candidate of generation alone (batch_generate as the exact-match scorer calls it), for batches of
    32 and the automatic size, through generate() and through the greedy loop; median over interleaved repeats."""
    import generation as gen  # where the decoding choice is read
    host = ev.get_host(base, device)
    questions = [item["question"] for item in dev]
    golds = [str(item["answer"]) for item in dev]
    budget = ev.exact_match_budget(host.tokenizer, golds, ev.exact_match_rule("tiny_demo"))
    plain, holes = gen._plain_decoder, gen._layers_take_holes
    loops = ("generate()", "greedy loop", "greedy, shared")  # the last is what the search runs
    variants = {(batch, loop): None for batch in (32, None) for loop in loops}
    times = {key: [] for key in variants}
    for r in range(repeats):
        for batch, loop in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            gen._plain_decoder = plain if loop != "generate()" else (lambda model: False)
            gen._layers_take_holes = holes if loop == "greedy, shared" else (lambda model: False)
            try:
                start, outputs = time.perf_counter(), []
                for expert in experts:
                    model = host.load(str(expert))
                    outputs.append(ev.batch_generate(model, host.tokenizer, questions, budget, batch_size=batch))
                times[(batch, loop)].append((time.perf_counter() - start) / len(experts))
                variants[(batch, loop)] = outputs
            finally:
                gen._plain_decoder, gen._layers_take_holes = plain, holes
    auto = gen._rows_that_fit(host.model, len(questions), max(map(len, ev.encode(host.tokenizer, questions))), budget)
    print(f"generation alone, tiny_demo dev ({len(questions)} prompts, {budget} new tokens at most), {len(experts)} "
          f"experts, median of {repeats} interleaved repeats (s per candidate):")
    reference = times[(32, "generate()")]
    for (batch, loop), values in times.items():
        median = sorted(values)[len(values) // 2]
        print(f"  batch {batch or f'auto ({auto})':>9}, {loop:<14}: {median:.4f}  "
              f"({sorted(reference)[len(reference) // 2] / median:.2f}x batch 32 with generate())")
    same = all(v == variants[(32, "generate()")] for v in variants.values())
    print(f"  outputs identical across the six: {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-g", "--gpu", default="cpu", help="'cpu' or a GPU index (default cpu)")
    parser.add_argument("--candidates", type=int, default=10, help="resident evaluations to time (default 10)")
    parser.add_argument("--published_runs", type=int, default=3, help="published evaluations to time (default 3)")
    parser.add_argument("--sections", default="1,2,3,4", help="which parts to run (default all)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of section 4 (default 5)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch threads in both strategies (default $OMP_NUM_THREADS or 1)")
    args = parser.parse_args()
    device = args.gpu if args.gpu == "cpu" else int(args.gpu)
    sections = {s.strip() for s in args.sections.split(",")}

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

        if sections & {"1", "2"}:
            sec, share = resident(ev, experts, base, device, "exact_match", "tiny_demo", args.candidates)
            print(f"resident host     : {sec:7.3f} s/candidate   forward share {share:6.1%}")
        if "2" in sections and device == "cpu":
            psec, pshare = published(experts, base, demo["dev"], args.published_runs, args.threads)
            print(f"published strategy: {psec:7.3f} s/candidate   forward share {pshare:6.1%}   "
                  f"(imports done; from_pretrained + load_adapter + tokenizer per evaluation, batches of 10)")
            print(f"speed-up          : {psec / sec:7.1f}x   (target >= 5x; forward share target >= 90%)")
        elif "2" in sections:
            print("published strategy: not measured on a GPU here (benchmarks/published_baseline.py runs on CPU)")

        # tiny_mc: short prompts sharing only the instruction line; tiny_mc_icl: the knowledge_crosswords format,
        # whose in-context example is a long prefix shared by every prompt (mc_scoring=logits computes it once)
        for dataset in ("tiny_mc", "tiny_mc_icl") if "3" in sections else ():
            ev.configure(mc_scoring="generate")
            gsec, gshare = resident(ev, experts, base, device, "multiple_choice", dataset, args.candidates)
            ev.configure(mc_scoring="logits")
            lsec, lshare = resident(ev, experts, base, device, "multiple_choice", dataset, args.candidates)
            print(f"multiple choice {dataset} dev: generate {gsec:.3f} s/candidate, logits {lsec:.3f} s/candidate "
                  f"-> {gsec / lsec:.1f}x (target >= 3x); forward share {gshare:.1%} / {lshare:.1%}")
        if "4" in sections:
            ev.configure(mc_scoring="generate")
            generation_levers(ev, experts, base, device, demo["dev"], args.repeats)


if __name__ == "__main__":
    main()
