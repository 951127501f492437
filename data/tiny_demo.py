"""Generated exact-match demo objective `tiny_demo` for the embedded tiny population.

Every question asks for one digit picked from a list of five digits by one of three operations:

    max 3 9 2 5 1 =      -> 9      the largest digit
    fst 3 9 2 5 1 =      -> 3      the first digit
    snd 3 9 2 5 1 =      -> 9      the second digit

The prompt is the question exactly as stored (it ends with "="); a model answers " <digit>"
and stops. Each operation also has a distractor convention (max -> smallest, fst -> last,
snd -> fourth). The tiny base model is pre-trained on data where each operation follows
its intended or its distractor convention at random, so it knows how to compute both but
not which one is meant; each tiny expert is fine-tuned on the intended convention of one
or two operations (initial_experts/expert_init.py). A merge can combine what several
experts learned.

The question space (3 operations x 10^5 digit lists) is split once, by a hash of the
question, into a training part and a reserved evaluation part (1 question in 8). Dev and
test are drawn only from the reserved part and training data only from the rest, so the
split sizes (or the dataset seed) never change what the tiny population is trained on.

    python data/tiny_demo.py [--out data/eval/tiny_demo.json] [--seed 0]
"""

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

SKILLS = ("max", "fst", "snd")
DEV_SIZE = 1000
TEST_SIZE = 3000
PARTS = ("train", "eval")
EVAL_SHARE = 8  # 1 question in EVAL_SHARE belongs to the reserved evaluation part (37,500 questions)


def _digits(rng):
    return [rng.randrange(10) for _ in range(5)]


# skill -> digits -> (intended answer, distractor answer)
_RULES = {
    "max": lambda d: (max(d), min(d)),
    "fst": lambda d: (d[0], d[4]),
    "snd": lambda d: (d[1], d[3]),
}


def skill_of(question):
    """Operation of a tiny_demo question (its first word)."""
    return question.split(" ", 1)[0]


def answer_of(question, distractor=False):
    """The intended (or distractor) answer of a tiny_demo question."""
    digits = [int(x) for x in question.split()[1:-1]]
    return str(_RULES[skill_of(question)](digits)[1 if distractor else 0])


def part_of(question):
    """"eval" for the reserved evaluation part of the question space, else "train" (fixed by a hash)."""
    digest = hashlib.sha256(question.encode()).digest()
    return "eval" if digest[0] % EVAL_SHARE == 0 else "train"


def make_items(n, seed, skills=SKILLS, weights=None, exclude=(), ambiguous=False, part="train"):
    """n distinct {"question", "answer"} items drawn from the given skill mixture.

    Skills are interleaved round-robin when weights is None, so small splits stay balanced;
    with weights each item's skill is drawn at random. Only questions of the given part of
    the question space are produced ("train" for training data, "eval" for dev/test; see
    part_of), and never one in `exclude`. ambiguous=True gives the base model's
    pre-training data: each answer follows the intended or the distractor convention
    with probability 1/2.
    """
    unknown = [s for s in skills if s not in _RULES]
    if unknown or not skills:
        raise ValueError(f"unknown tiny_demo skill(s) {unknown}; choose from {list(SKILLS)}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {list(PARTS)}")
    rng = random.Random(f"tiny_demo:{seed}")
    seen = set(exclude)
    items = []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct tiny_demo items for skills {list(skills)}")
        skill = skills[len(items) % len(skills)] if weights is None else rng.choices(skills, weights=weights)[0]
        digits = _digits(rng)
        question = f"{skill} {' '.join(map(str, digits))} ="
        pick = ambiguous and rng.random() < 0.5
        if question in seen or part_of(question) != part:
            continue
        seen.add(question)
        items.append({"question": question, "answer": str(_RULES[skill](digits)[1 if pick else 0])})
    return items


def make_dataset(seed=0, dev_size=DEV_SIZE, test_size=TEST_SIZE):
    """The published-format dataset from the reserved evaluation part; dev and test never share a question."""
    items = make_items(dev_size + test_size, seed, part="eval")
    random.Random(f"tiny_demo-split:{seed}").shuffle(items)
    return {"dataset": "tiny_demo", "dev": items[:dev_size], "test": items[dev_size:]}


def write_dataset(out, seed=0):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = make_dataset(seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"tiny_demo.py: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    default_out = Path(__file__).resolve().parent / "eval" / "tiny_demo.json"
    parser = _Parser(description="Write the generated tiny_demo exact-match objective.")
    parser.add_argument("--out", default=str(default_out), help="output json (default: data/eval/tiny_demo.json)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        data = write_dataset(args.out, args.seed)
    except OSError as exc:
        print(f"tiny_demo.py: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(data['dev'])} dev, {len(data['test'])} test items (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
