"""Tiny demo objectives for the CPU population: one per objective family, each a few hundred short items.

    tiny_mc       multiple choice (A-D): biggest digit, sums, "which one is an animal", opposites, colours,
                  the next number                          -e multiple_choice / AbstainQA -d tiny_mc
    tiny_mc_icl   the same kind of questions with an "icl_prompt" of three solved examples
    tiny_em       exact match, one-word answers ("2 plus 3 =" -> "5", "opposite of hot =" -> "cold")
    tiny_domain   the multitask domain tiny_mc + tiny_em (data/schema.py MULTITASK_DOMAINS)
    tiny_rm       prompts for the reward-model objectives (rm_default, rm_verbose, rm_concise)
    tiny_human    prompts for the judge objective (human)

Everything is written with the small fixed vocabulary below (lower-case English words, digits, a few
punctuation marks); vocabulary_text() returns every string the generators can put into a file, so a
tokenizer built from it covers every item. The same seed always gives the same items, and no item
appears in both dev and test. The demo exact-match objective tiny_demo lives in data/tiny_demo.py.

    python data/tiny_data.py [--out_dir data/eval] [--seed 0]
"""

import argparse
import random
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"tiny_mc": (50, 150), "tiny_mc_icl": (50, 150), "tiny_em": (50, 150), "tiny_rm": (40, 100),
         "tiny_human": (40, 100)}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "eval"
LETTERS = "ABCD"

DIGITS = [str(d) for d in range(10)]
ANIMALS = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "duck", "goat"]
THINGS = ["bread", "milk", "rice", "apple", "cup", "hat", "door", "book", "shoe", "box"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
             ("day", "night"), ("wet", "dry"), ("open", "shut"), ("full", "empty"), ("in", "out"),
             ("left", "right"), ("yes", "no")]
COLOURS = [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"), ("sun", "yellow"),
           ("tomato", "red"), ("orange", "orange"), ("night", "black")]
COLOUR_WORDS = sorted({c for _, c in COLOURS} | {"pink", "brown", "grey"})

MC_TEMPLATES = {
    "biggest": "which number is the biggest?",
    "plus": "what is {a} plus {b}?",
    "animal": "which one is an animal?",
    "opposite": "what is the opposite of {w}?",
    "colour": "what colour is the {w}?",
    "next": "which number comes after {a}?",
}
EM_TEMPLATES = {
    "plus": "{a} plus {b} =",
    "minus": "{a} minus {b} =",
    "opposite": "opposite of {w} =",
    "colour": "colour of {w} =",
    "next": "after {a} =",
    "bigger": "bigger of {a} and {b} =",
}
RM_TOPICS = ["cats", "dogs", "rain", "music", "bread", "trains", "rivers", "chess", "stars", "tea", "gardens",
             "boats", "bees", "snow", "maps", "clocks", "forests", "kites", "apples", "bridges", "owls",
             "books", "the sea", "the moon"]
RM_ASKS = ["tell me about {t}", "what do you know about {t}?", "describe {t}", "say something about {t}",
           "why do people like {t}?", "write a line about {t}", "what is good about {t}?",
           "give me a fact about {t}"]
HUMAN_GOALS = ["sleep well", "learn to cook", "save money", "keep a plant alive", "make a new friend",
               "read more books", "get up early", "learn a song", "walk every day", "keep my room clean",
               "drink more water", "learn to swim", "start a garden", "write a short story", "bake bread",
               "ride a bike", "learn to draw", "plan a trip", "study for a test", "care for a cat",
               "fix a flat tyre", "make tea", "stay calm", "learn a new word every day"]
HUMAN_ASKS = ["how can i {g}?", "give me one tip to {g}", "what should i do to {g}?", "help me {g}",
              "what is the best way to {g}?", "i want to {g}. where do i start?"]
ICL_EXAMPLES = [
    ("what is 1 plus 2?", ["4", "3", "7", "0"], "B"),
    ("which one is an animal?", ["cup", "bread", "hat", "dog"], "D"),
    ("what is the opposite of up?", ["down", "hot", "old", "wet"], "A"),
]


# ---------------------------------------------------------------- multiple choice

def _mc_item(rng, skill):
    """(question, four options, index of the right one)."""
    if skill == "biggest":
        options = rng.sample(DIGITS, 4)
        return MC_TEMPLATES[skill], options, options.index(max(options, key=int))
    if skill == "plus":
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        right = str(a + b)
        wrong = rng.sample([d for d in DIGITS if d != right], 3)
        return MC_TEMPLATES[skill].format(a=a, b=b), *_place(rng, right, wrong)
    if skill == "animal":
        return MC_TEMPLATES[skill], *_place(rng, rng.choice(ANIMALS), rng.sample(THINGS, 3))
    if skill == "opposite":
        pair = rng.choice(OPPOSITES)
        word, right = pair if rng.random() < 0.5 else pair[::-1]
        others = [w for p in OPPOSITES if p != pair for w in p]
        return MC_TEMPLATES[skill].format(w=word), *_place(rng, right, rng.sample(others, 3))
    if skill == "colour":
        thing, right = rng.choice(COLOURS)
        wrong = rng.sample([c for c in COLOUR_WORDS if c != right], 3)
        return MC_TEMPLATES[skill].format(w=thing), *_place(rng, right, wrong)
    if skill == "next":
        a = rng.randint(0, 8)
        right = str(a + 1)
        wrong = rng.sample([d for d in DIGITS if d != right], 3)
        return MC_TEMPLATES[skill].format(a=a), *_place(rng, right, wrong)
    raise ValueError(f"unknown multiple-choice skill {skill!r}")


def _place(rng, right, wrong):
    options = list(wrong)
    position = rng.randrange(len(options) + 1)
    options.insert(position, right)
    return options, position


def make_mc(seed=0, dev=50, test=150, icl=False):
    """tiny_mc (or tiny_mc_icl with icl=True): skills in turn, answer letters spread over A-D."""
    rng = random.Random(f"tiny_mc:{seed}:{int(icl)}")
    skills = list(MC_TEMPLATES)
    # the in-context examples are never asked, so the icl prompt cannot give an answer away
    seen = {(q, tuple(o)) for q, o, _ in ICL_EXAMPLES}
    items = []
    while len(items) < dev + test:
        skill = skills[len(items) % len(skills)]
        question, options, right = _mc_item(rng, skill)
        if (question, tuple(options)) in seen:
            continue
        seen.add((question, tuple(options)))
        items.append({"question": question, "choices": dict(zip(LETTERS, options)),
                      "answer": LETTERS[right], "domain": skill})
    name = "tiny_mc_icl" if icl else "tiny_mc"
    data = {"dataset": name}
    if icl:
        data["icl_prompt"] = icl_prompt()
    return _split(data, items, dev, rng)


def icl_prompt():
    """Three solved examples in the evaluator's multiple-choice layout (Question / X: option / The answer is)."""
    blocks = []
    for question, options, answer in ICL_EXAMPLES:
        lines = [f"Question: {question}"] + [f"{k}: {o}" for k, o in zip(LETTERS, options)]
        blocks.append("\n".join(lines) + f"\nThe answer is {answer}")
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------- exact match

def _em_pool():
    """Every exact-match item the templates allow: {skill: [(question, answer), ...]}."""
    pool = {
        "plus": [(EM_TEMPLATES["plus"].format(a=a, b=b), str(a + b)) for a in range(10) for b in range(10 - a)],
        "minus": [(EM_TEMPLATES["minus"].format(a=a, b=b), str(a - b)) for a in range(10) for b in range(a + 1)],
        "opposite": [(EM_TEMPLATES["opposite"].format(w=w), o) for p in OPPOSITES for w, o in (p, p[::-1])],
        "colour": [(EM_TEMPLATES["colour"].format(w=t), c) for t, c in COLOURS],
        "next": [(EM_TEMPLATES["next"].format(a=a), str(a + 1)) for a in range(9)],
        "bigger": [(EM_TEMPLATES["bigger"].format(a=a, b=b), str(max(a, b)))
                   for a in range(10) for b in range(10) if a != b],
    }
    return pool


def make_em(seed=0, dev=50, test=150):
    """tiny_em: skills in turn while each lasts, every question distinct."""
    rng = random.Random(f"tiny_em:{seed}")
    pool = _em_pool()
    for skill in pool:
        rng.shuffle(pool[skill])
    items = []
    while len(items) < dev + test:
        if not any(pool.values()):
            raise ValueError(f"tiny_em has only {len(items)} distinct questions; asked for {dev + test}")
        for skill, left in pool.items():
            if left and len(items) < dev + test:
                question, answer = left.pop()
                items.append({"question": question, "answer": answer, "domain": skill})
    return _split({"dataset": "tiny_em"}, items, dev, rng)


# ---------------------------------------------------------------- prompts

def _prompt_set(name, asks, fillers, key, seed, dev, test):
    rng = random.Random(f"{name}:{seed}")
    prompts = [ask.format(**{key: f}) for f in fillers for ask in asks]
    if dev + test > len(prompts):
        raise ValueError(f"{name} has only {len(prompts)} distinct prompts; asked for {dev + test}")
    rng.shuffle(prompts)
    return _split({"dataset": name}, [{"prompt": p} for p in prompts[:dev + test]], dev, rng)


def make_rm(seed=0, dev=40, test=100):
    return _prompt_set("tiny_rm", RM_ASKS, RM_TOPICS, "t", seed, dev, test)


def make_human(seed=0, dev=40, test=100):
    return _prompt_set("tiny_human", HUMAN_ASKS, HUMAN_GOALS, "g", seed, dev, test)


def _split(data, items, dev, rng):
    rng.shuffle(items)
    for i, item in enumerate(items):
        item["id"] = i
    data["dev"], data["test"] = items[:dev], items[dev:]
    return data


# ---------------------------------------------------------------- all sets, vocabulary

def make_all(seed=0):
    """{name: dataset} for every tiny set, at the default sizes."""
    return {
        "tiny_mc": make_mc(seed, *SIZES["tiny_mc"]),
        "tiny_mc_icl": make_mc(seed, *SIZES["tiny_mc_icl"], icl=True),
        "tiny_em": make_em(seed, *SIZES["tiny_em"]),
        "tiny_rm": make_rm(seed, *SIZES["tiny_rm"]),
        "tiny_human": make_human(seed, *SIZES["tiny_human"]),
    }


# eval type each set is meant for (tiny_domain is the multitask domain over tiny_mc and tiny_em)
EVAL_TYPE = {"tiny_mc": "multiple_choice", "tiny_mc_icl": "multiple_choice", "tiny_em": "exact_match",
             "tiny_rm": "rm_default", "tiny_human": "human"}


def vocabulary_text():
    """Every string the tiny generators can write into a file (templates, word lists, digits, choice letters,
    the icl prompt, the set names): a tokenizer trained or built on these covers every tiny item."""
    strings = list(MC_TEMPLATES.values()) + list(EM_TEMPLATES.values()) + RM_ASKS + HUMAN_ASKS
    strings += DIGITS + ANIMALS + THINGS + [w for p in OPPOSITES for w in p] + [t for t, _ in COLOURS]
    strings += COLOUR_WORDS + RM_TOPICS + HUMAN_GOALS + list(LETTERS) + [icl_prompt()]
    strings += list(SIZES) + list(MC_TEMPLATES) + list(EM_TEMPLATES)
    return [re.sub(r"\{[a-z]\}", "", s) for s in strings]


def vocabulary():
    """The word-level vocabulary: sorted set of tokens of vocabulary_text() (see tokens())."""
    return sorted({t for s in vocabulary_text() for t in tokens(s)})


def tokens(text):
    """Words, single digits and single punctuation marks: how a tiny word-level tokenizer splits text."""
    return re.findall(r"[A-Za-z_]+|\d|[^\sA-Za-z_\d]", text)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the tiny demo objectives (tiny_mc, tiny_mc_icl, tiny_em, "
                                             "tiny_rm, tiny_human) into a folder.")
    ap.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR), help="output folder (default: data/eval)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from data.nlgraph import write_json
    from data.schema import validate
    for name, data in make_all(args.seed).items():
        path = Path(args.out_dir) / f"{name}.json"
        validate(data, EVAL_TYPE[name], path)
        write_json(data, path)
        print(f"{path}: {len(data['dev'])} dev / {len(data['test'])} test items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
