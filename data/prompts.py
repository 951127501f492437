"""What the model reads: the prompt builders of the evaluation types (data/schema.py's EVAL_TYPES names one per type).

A builder takes one split of a dataset, as evaluate.py hands it to a scorer,

    {"items": [item, ...], "icl_prompt": str | None, "split": "dev" | "test",
     "name": the -d NAME (or a multitask domain's dataset), "eval_type": str}

and returns one prompt text per item. check_prompt_lengths measures these texts (plus the tokens generated after
them) against the base model's context before a search starts, and the scorers generate from them. Pure string
work, no torch: search.py's -h imports this module through data/schema.py.
"""

# instruction line per dataset; knowledge_crosswords questions carry their own instruction (and an ICL example)
MC_INSTRUCTIONS = {"knowledge_crosswords": "",
                   "hellaswag": "Please choose an option that best completes the sentence."}
MC_DEFAULT_INSTRUCTION = "Please choose an option that best answers the question."

# AbstainQA's second question, asked after the model's answer
ABSTAIN_REFLECTION = ("\nProposed answer: {answer}\nIs the proposed answer true or false? "
                      "Directly answer with true or false.")


def multiple_choice_prompt(item, dataset, icl_prompt=None):
    """Instruction, "Question: ...", one "X: option" line per choice, and the cue "The answer is"."""
    instruction = MC_INSTRUCTIONS.get(dataset, MC_DEFAULT_INSTRUCTION)
    lines = ([instruction] if instruction else []) + ["Question: " + item["question"]]
    lines += [f"{key}: {text}" for key, text in item["choices"].items()]
    prompt = "\n".join(lines) + "\nThe answer is"
    return icl_prompt + "\n" + prompt if icl_prompt else prompt


def multiple_choice_prompts(data):
    return [multiple_choice_prompt(item, data["name"], data.get("icl_prompt")) for item in data["items"]]


def abstain_prompts(data):
    """The longest text AbstainQA sends: the multiple-choice prompt followed by the reflection question, with its
    answer slot empty (the answer and the verdict are the EvalType's two generations)."""
    return [prompt + ABSTAIN_REFLECTION.format(answer="") for prompt in multiple_choice_prompts(data)]


def question_prompts(data):
    """The question itself (exact match: the model continues it with the answer)."""
    return [item["question"] for item in data["items"]]


def plain_prompts(data):
    """The prompt item's text (continued as it is, or sent as one chat turn where the EvalType says chat)."""
    return [item["prompt"] for item in data["items"]]
