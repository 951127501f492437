"""Build benchmark evaluation files from the Hugging Face Hub (or local copies) with the `datasets` library.

    python data/prepare_data.py NAME [NAME ...] [--out_dir data/eval] [--seed 0] [--local_dir DIR]
    python data/prepare_data.py all          # every set with a public source
    python data/prepare_data.py --list       # sources, splits and sizes

Each NAME becomes <out_dir>/NAME.json in the data/schema.py format, sampled with a fixed seed (the same
seed and source give the same file). Sizes follow the published files: 200 dev / 1000 test where the
source has enough labelled items; --list and the NOTES below say where it does not.

Offline: --local_dir DIR reads DIR/NAME/ instead of the Hub, a snapshot of the source repository, e.g.
    hf download cais/mmlu --repo-type dataset --local-dir DIR/mmlu
When DIR/NAME/<config>/ exists (hub snapshots keep one folder per config: cais/mmlu all/,
nguha/legalbench hearsay/, allenai/scifact claims/ and corpus/), that folder is read; split names come from
the file names as `datasets` infers them (test-00000-of-00001.parquet, validation.jsonl, ...).

Exit status: 0 every requested file written; 1 some NAME has no public source (how to add it is printed);
2 a source could not be read (Hub unreachable, gated, missing local copy): one line says which and what to do.
"""

import argparse
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "eval"


class SourceError(RuntimeError):
    """A source that could not be read; the message is the one line printed before exiting 2."""


# ---------------------------------------------------------------- converters: source rows -> our items
# Each takes an iterable of rows as `datasets` yields them (dicts keyed by the source's column names) and
# returns the usable items; rows that cannot be scored (no label, malformed) are skipped.

def _mc(question, options, answer_index, **extra):
    options = [str(o).strip() for o in options]
    return {"question": str(question).strip(), "choices": dict(zip(LETTERS, options)),
            "answer": LETTERS[answer_index], **extra}


def convert_mmlu(rows, seed=0):
    """cais/mmlu: question, subject, choices [4], answer (class index 0-3)."""
    items = []
    for i, row in enumerate(rows):
        if isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"]):
            items.append(_mc(row["question"], row["choices"], row["answer"], id=i, domain=row["subject"]))
    return items


def convert_mmlu_pro(rows, seed=0):
    """TIGER-Lab/MMLU-Pro: question_id, question, options [up to 10], answer (letter), answer_index, category.
    Padding options "N/A" are dropped (the answer is re-lettered), as the published file has 4-10 choices."""
    items = []
    for row in rows:
        index = row["answer_index"]
        if not isinstance(index, int) or not 0 <= index < len(row["options"]):
            continue
        kept = [(j, o) for j, o in enumerate(row["options"]) if str(o).strip() != "N/A" or j == index]
        options = [o for _, o in kept]
        answer = [j for j, _ in kept].index(index)
        items.append(_mc(row["question"], options, answer, id=row["question_id"], domain=row["category"]))
    return items


def convert_hellaswag(rows, seed=0):
    """Rowan/hellaswag: ind, activity_label, ctx, endings [4], label ("0"-"3"; empty in the hidden test split)."""
    items = []
    for row in rows:
        label = str(row["label"]).strip()
        if not label.isdigit() or int(label) >= len(row["endings"]):
            continue
        items.append(_mc(row["ctx"], row["endings"], int(label), id=row["ind"], domain=row["activity_label"]))
    return items


GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def convert_gsm8k(rows, seed=0):
    """openai/gsm8k main: question, answer (worked solution ending in "#### <number>") -> the number."""
    items = []
    for i, row in enumerate(rows):
        m = GSM8K_FINAL.search(row["answer"])
        if m:
            items.append({"question": row["question"].strip(), "answer": m.group(1).replace(",", "").strip(),
                          "id": i, "domain": "gsm8k"})
    return items


def convert_truthfulqa(rows, seed=0):
    """truthfulqa/truthful_qa multiple_choice: question, mc1_targets {choices, labels} (exactly one label 1).
    The source lists the true answer first, so options are shuffled (per question, from the seed)."""
    items = []
    for i, row in enumerate(rows):
        targets = row["mc1_targets"]
        options, labels = list(targets["choices"]), list(targets["labels"])
        if labels.count(1) != 1 or len(options) != len(labels) or len(options) > len(LETTERS):
            continue
        order = list(range(len(options)))
        random.Random(f"{seed}:{row['question']}").shuffle(order)
        items.append(_mc(row["question"], [options[j] for j in order], order.index(labels.index(1)), id=i))
    return items


def convert_medqa(rows, seed=0):
    """GBaker/MedQA-USMLE-4-options: question, options {A..D: text}, answer_idx (letter), answer (text)."""
    items = []
    for i, row in enumerate(rows):
        options = row["options"]
        keys = sorted(options) if isinstance(options, dict) else list(LETTERS[:len(options)])
        texts = [options[k] for k in keys] if isinstance(options, dict) else list(options)
        if row["answer_idx"] not in keys:
            continue
        items.append(_mc(row["question"], texts, keys.index(row["answer_idx"]), id=i))
    return items


def convert_medmcqa(rows, seed=0):
    """openlifescienceai/medmcqa: id, question, opa..opd, cop (0-3; -1 in the unlabelled test split),
    subject_name."""
    items = []
    for row in rows:
        if not isinstance(row["cop"], int) or not 0 <= row["cop"] <= 3:
            continue
        options = [row["opa"], row["opb"], row["opc"], row["opd"]]
        items.append(_mc(row["question"], options, row["cop"], id=row["id"], domain=row["subject_name"]))
    return items


SCIFACT_LABELS = {"SUPPORT": "A", "CONTRADICT": "B"}


def convert_scifact(rows, seed=0, corpus=()):
    """allenai/scifact claims (id, claim, evidence_doc_id, evidence_label, ...) joined with its corpus
    (doc_id, title, abstract [sentences]). Claims without a SUPPORT/CONTRADICT label (not enough info)
    are skipped; each (claim, document) pair is one item."""
    docs = {str(d["doc_id"]): d for d in corpus}
    items, seen = [], set()
    for row in rows:
        label = str(row["evidence_label"]).strip().upper()
        doc = docs.get(str(row["evidence_doc_id"]).strip())
        key = (row["id"], str(row["evidence_doc_id"]))
        if label not in SCIFACT_LABELS or doc is None or key in seen:
            continue
        seen.add(key)
        evidence = " ".join([doc["title"].strip().rstrip(".") + "."] + [s.strip() for s in doc["abstract"]])
        question = ("Does the scientific evidence below support or contradict the claim?\n\n"
                    f"Evidence: {evidence}\nClaim: {row['claim'].strip()}")
        items.append({"question": question, "choices": {"A": "Support", "B": "Contradict"},
                      "answer": SCIFACT_LABELS[label], "id": f"{row['id']}-{row['evidence_doc_id']}"})
    return items


def _yes_no(question, answer, item_id):
    answer = str(answer).strip().lower()
    if answer not in ("yes", "no"):
        return None
    return {"question": question, "choices": {"A": "Yes", "B": "No"}, "answer": "A" if answer == "yes" else "B",
            "id": item_id}


def convert_hearsay(rows, seed=0):
    """nguha/legalbench hearsay: text (the evidence), answer ("Yes"/"No"), index, slice."""
    items = []
    for row in rows:
        question = ("Under the Federal Rules of Evidence, hearsay is an out-of-court statement offered to prove "
                    "the truth of the matter it asserts. Decide whether the evidence below is hearsay.\n\n"
                    f"Evidence: {row['text'].strip()}\nIs this evidence hearsay?")
        item = _yes_no(question, row["answer"], str(row["index"]))
        if item:
            items.append(item)
    return items


def convert_citation_prediction(rows, seed=0):
    """nguha/legalbench citation_prediction_classification: text (a legal proposition), citation (a case),
    answer ("Yes"/"No"), index."""
    items = []
    for row in rows:
        question = ("Decide whether the cited case supports the legal proposition.\n\n"
                    f"Proposition: {row['text'].strip()}\nCase: {row['citation'].strip()}\n"
                    "Does the case support the proposition?")
        item = _yes_no(question, row["answer"], str(row["index"]))
        if item:
            items.append(item)
    return items


RM_MAX_CHARS = 2000


def convert_rm(rows, seed=0):
    """HuggingFaceH4/ultrafeedback_binarized: prompt_id, prompt, chosen, rejected, ... -> the prompt.
    Prompts over RM_MAX_CHARS characters are skipped to keep generation and reward scoring affordable."""
    items, seen = [], set()
    for row in rows:
        prompt = str(row["prompt"]).strip()
        if prompt and len(prompt) <= RM_MAX_CHARS and prompt not in seen:
            seen.add(prompt)
            items.append({"prompt": prompt, "id": row["prompt_id"]})
    return items


def convert_realtoxicityprompts(rows, seed=0):
    """allenai/real-toxicity-prompts: filename, begin, end, challenging, prompt {text, toxicity, ...},
    continuation {...} -> the prompt text; domain says whether it is in the challenging subset."""
    items = []
    for i, row in enumerate(rows):
        text = (row["prompt"] or {}).get("text")
        if text and text.strip():
            items.append({"prompt": text, "id": i,
                          "domain": "challenging" if row["challenging"] else "not_challenging"})
    return items


# ---------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    repo: str
    config: str | None
    dev_splits: tuple
    test_splits: tuple
    convert: Callable
    dev: int = 200
    test: int = 1000
    same_items: bool = False     # dev and test are the same items (the source is too small to split)
    eval_type: str = "multiple_choice"           # what the converted file is validated for
    tables: dict = field(default_factory=dict)   # extra converter inputs: keyword -> (config, split)
    note: str = ""

    @property
    def pooled(self):
        """dev and test drawn without overlap from one pool of items."""
        return self.dev_splits == self.test_splits and not self.same_items


SOURCES = {
    "mmlu": Source("cais/mmlu", "all", ("validation",), ("test",), convert_mmlu),
    "mmlu_pro": Source("TIGER-Lab/MMLU-Pro", None, ("validation",), ("test",), convert_mmlu_pro, dev=70,
                       note="dev is all 70 validation questions (the only held-out split besides test)"),
    "hellaswag": Source("Rowan/hellaswag", None, ("train",), ("validation",), convert_hellaswag,
                        note="test comes from validation: the source's test labels are hidden"),
    "gsm8k": Source("openai/gsm8k", "main", ("train",), ("test",), convert_gsm8k, eval_type="exact_match"),
    "truthfulqa": Source("truthfulqa/truthful_qa", "multiple_choice", ("validation",), ("validation",),
                         convert_truthfulqa, test=617,
                         note="817 questions in all: 200 dev / the other 617 test"),
    "medqa": Source("GBaker/MedQA-USMLE-4-options", None, ("train",), ("test",), convert_medqa),
    "medmcqa": Source("openlifescienceai/medmcqa", None, ("train",), ("validation",), convert_medmcqa,
                      note="test comes from validation: the source's test answers are hidden"),
    "scifact": Source("allenai/scifact", "claims", ("train", "validation"), ("train", "validation"),
                      convert_scifact, tables={"corpus": ("corpus", "train")},
                      note="only about 730 labelled (claim, abstract) pairs (test labels are hidden): "
                           "200 dev / the rest (about 530) test"),
    "hearsay": Source("nguha/legalbench", "hearsay", ("test",), ("test",), convert_hearsay, dev=94, test=94,
                      same_items=True, note="94 labelled questions: dev and test are the same 94, as published"),
    "citation_prediction_classification": Source(
        "nguha/legalbench", "citation_prediction_classification", ("test",), ("test",),
        convert_citation_prediction, dev=108, test=108, same_items=True,
        note="108 labelled questions: dev and test are the same 108, as published"),
    "rm": Source("HuggingFaceH4/ultrafeedback_binarized", None, ("train_prefs",), ("test_prefs",), convert_rm,
                 test=550, eval_type="rm_default",
                 note="reward-model prompts: UltraFeedback's instructions (drawn from ShareGPT, FLAN, "
                      "Evol-Instruct, UltraChat, TruthfulQA, FalseQA) are the prompts open reward "
                      "models are trained and compared on; 550 test as published"),
    "realtoxicityprompts": Source("allenai/real-toxicity-prompts", None, ("train",), ("train",),
                                  convert_realtoxicityprompts, eval_type="external_api",
                                  note="one split only: 200 dev and 1000 test drawn without overlap"),
}

# sets with no Hub source in our format: how to add them
NO_PUBLIC_SOURCE = {
    "nlgraph": "generated by this project: python data/nlgraph.py (or python data/build.py for every generated set)",
    "knowledge_crosswords": "Knowledge Crosswords (Ding et al., 2023) is distributed on GitHub, not the Hub: "
                            "turn its questions into multiple-choice items {question, choices {A..D}, answer} "
                            "with a few solved examples as \"icl_prompt\", 200 dev / 1000 test, in "
                            "data/eval/knowledge_crosswords.json",
    "normad_country": "NormAd (Rao et al., 2024) stories judged per country: write multiple-choice items "
                      "{question (story + country), choices {A: yes, B: no, C: neutral}, answer} to "
                      "data/eval/normad_country.json (published: 500 dev / 2000 test)",
    "normad_value": "NormAd (Rao et al., 2024) stories judged per cultural value: write multiple-choice items "
                    "{question (story + value), choices {A: yes, B: no, C: neutral}, answer} to "
                    "data/eval/normad_value.json (published: 500 dev / 2000 test)",
    "stem": "the STEM part of MMLU-Pro: run `python data/prepare_data.py mmlu_pro`, keep the items whose domain "
            "is math, physics, chemistry, engineering, computer science or biology, and save them as "
            "data/eval/stem.json (published: 30 dev / 473 test)",
    "human": "judge prompt sets are hand-written: save 25 dev / 25 test {\"prompt\": ...} items about one topic "
             "as data/eval/human_<topic>.json (see data/eval/human_phd_application.json) and run with -e human",
}


def how_to_add(name):
    key = "human" if name.startswith("human_") else name
    return NO_PUBLIC_SOURCE.get(key)


# ---------------------------------------------------------------- loading

def _quiet_libraries():
    """Retry warnings and progress bars would bury the one line that says what failed."""
    import datasets
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        import huggingface_hub
        huggingface_hub.utils.logging.set_verbosity_error()
        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


def _is_unreachable(exc):
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"ConnectionError", "Timeout", "TimeoutError", "ConnectError", "OfflineModeIsEnabled",
                    "LocalEntryNotFoundError", "ProxyError", "SSLError"}:
            return True
        if "couldn't reach" in str(e).lower() or "offline mode" in str(e).lower():
            return True
    return False


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def hub_failure(name, repo, config, exc):
    where = f"{name} ({repo}" + (f", config {config}" if config else "") + ")"
    fixes = ("connect to the network, or set HF_HUB_OFFLINE=1 to use copies already in the Hugging Face cache, "
             "log in with `hf auth login` for gated sets, or convert downloaded copies with --local_dir DIR")
    if _is_unreachable(exc):
        return f"prepare_data: {where} failed: the Hugging Face Hub is unreachable ({_one_line(exc)}); {fixes}"
    if type(exc).__name__ in ("DatasetNotFoundError", "GatedRepoError", "RepositoryNotFoundError"):
        return (f"prepare_data: {where} failed: not found or gated on the Hub ({_one_line(exc)}); accept its "
                f"terms on huggingface.co and log in with `hf auth login`, or use --local_dir DIR")
    return f"prepare_data: {where} failed: {_one_line(exc)}; {fixes}"


def load_rows(name, source, config, splits, local_dir=None):
    """Rows of the given splits (concatenated, in source order) as a datasets.Dataset."""
    import datasets
    parts = []
    for split in splits:
        if local_dir is not None:
            parts.append(_load_local(name, source, config, split, Path(local_dir)))
        else:
            parts.append(_load_hub(name, source.repo, config, split))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub(name, repo, config, split):
    import datasets
    try:
        try:
            return datasets.load_dataset(repo, config, split=split)
        except Exception as e:
            # script-based repositories no longer load; the Hub's parquet export of the same data does
            if _is_unreachable(e) or "script" not in str(e).lower():
                raise
            return datasets.load_dataset(repo, data_dir=config or "default", revision="refs/convert/parquet",
                                         split=split)
    except Exception as e:  # network, auth, missing repo or split: all end the run with one line
        raise SourceError(hub_failure(name, repo, config, e)) from None


def _load_local(name, source, config, split, local_dir):
    import datasets
    folder = local_dir / name
    if config and (folder / config).is_dir():
        folder = folder / config
    if not folder.is_dir():
        raise SourceError(f"prepare_data: {name}: no local copy at {folder}; download it with "
                          f"`hf download {source.repo} --repo-type dataset --local-dir "
                          f"{local_dir / name}` or drop --local_dir to read the Hub")
    try:
        loaded = datasets.load_dataset(str(folder))
    except Exception as e:
        raise SourceError(f"prepare_data: {name}: cannot read the local copy in {folder}: {_one_line(e)}") from None
    if split not in loaded:
        raise SourceError(f"prepare_data: {name}: {folder} has no {split!r} split (found: {', '.join(loaded)}); "
                          f"name the files after their split, e.g. {split}.parquet or {split}.jsonl")
    return loaded[split]


# ---------------------------------------------------------------- building

def build_items(source, dev_rows, test_rows, seed, dev=None, test=None, tables=None):
    """(dev items, test items) from converted rows, sampled with the seed."""
    tables = tables or {}
    n_dev = source.dev if dev is None else dev
    n_test = source.test if test is None else test
    rng = random.Random(f"{source.repo}:{source.config}:{seed}")
    dev_pool = source.convert(dev_rows, seed, **tables)
    rng.shuffle(dev_pool)
    if source.same_items:
        return dev_pool[:n_dev], dev_pool[:n_test]
    if source.pooled:
        return dev_pool[:n_dev], dev_pool[n_dev:n_dev + n_test]
    test_pool = source.convert(test_rows, seed, **tables)
    rng.shuffle(test_pool)
    return dev_pool[:n_dev], test_pool[:n_test]


def prepare(name, out_dir=DEFAULT_OUT_DIR, seed=0, local_dir=None, dev=None, test=None):
    """Build one benchmark file; returns (path, dev count, test count). Raises SourceError."""
    from data.nlgraph import write_json
    from data.schema import DataError, validate
    source = SOURCES[name]
    dev_rows = load_rows(name, source, source.config, source.dev_splits, local_dir)
    test_rows = dev_rows if source.test_splits == source.dev_splits else \
        load_rows(name, source, source.config, source.test_splits, local_dir)
    tables = {key: load_rows(name, source, config, (split,), local_dir)
              for key, (config, split) in source.tables.items()}
    dev_items, test_items = build_items(source, dev_rows, test_rows, seed, dev, test, tables)
    data = {"dataset": name, "dev": dev_items, "test": test_items}
    path = Path(out_dir) / f"{name}.json"
    try:
        validate(data, source.eval_type, path)
    except DataError as e:
        raise SourceError(f"prepare_data: {name}: the converted data is not usable: {e}") from None
    write_json(data, path)
    return path, len(dev_items), len(test_items)


def list_sources():
    lines = []
    for name, s in SOURCES.items():
        where = s.repo + (f" [{s.config}]" if s.config else "")
        splits = "+".join(s.dev_splits) + " -> dev, " + "+".join(s.test_splits) + " -> test"
        lines.append(f"{name:36s} {where:50s} {s.dev} dev / {s.test} test ({splits})"
                     + (f"; {s.note}" if s.note else ""))
    for name, how in NO_PUBLIC_SOURCE.items():
        lines.append(f"{name + ('_<topic>' if name == 'human' else ''):36s} no Hub source: {how}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build benchmark evaluation files (data/eval/NAME.json) from the "
                                             "Hugging Face Hub or local copies.",
                                 epilog="sources: " + ", ".join(SOURCES) + "; `all` builds every one")
    ap.add_argument("names", nargs="*", help="datasets to build (see --list)")
    ap.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR), help="output folder (default: data/eval)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--local_dir", default=None,
                    help="read DIR/NAME/ (a downloaded snapshot of the source) instead of the Hub")
    ap.add_argument("--dev", type=int, default=None, help="override the dev size")
    ap.add_argument("--test", type=int, default=None, help="override the test size")
    ap.add_argument("--list", action="store_true", help="list sources, splits and sizes")
    args = ap.parse_args(argv)
    if args.list:
        print(list_sources())
        return 0
    if not args.names:
        ap.error("name at least one dataset (or `all`); --list shows them")
    names = list(SOURCES) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in SOURCES and how_to_add(n) is None]
    if unknown:
        ap.error(f"unknown dataset(s) {', '.join(unknown)}; sources: {', '.join(SOURCES)} "
                 f"(or {', '.join(NO_PUBLIC_SOURCE)} for how to add the others)")
    missing = []
    _quiet_libraries()
    for name in names:
        if name not in SOURCES:
            print(f"{name}: no public source; {how_to_add(name)}")
            missing.append(name)
            continue
        try:
            path, n_dev, n_test = prepare(name, args.out_dir, args.seed, args.local_dir, args.dev, args.test)
        except SourceError as e:
            print(str(e), file=sys.stderr)
            return 2
        note = f" ({SOURCES[name].note})" if SOURCES[name].note else ""
        print(f"{path}: {n_dev} dev / {n_test} test items{note}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
