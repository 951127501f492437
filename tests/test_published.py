"""The published toolkit's data and result files (issue 27): `data/build.py --published` installs its 35 evaluation
files checked against data/published.sha256; every objective runs on the installed files (trimmed to their 4
shortest dev and test items for the tiny model); a finished search holds the published result files.

The local copy of the published files is ../shared/upstream-data/eval next to the checkout; without it the tests
that need it are skipped. Perspective and Vertex AI are faked at the network boundary only, as in test_evaluate.py.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, only_dir, run_cli
from data.schema import MULTITASK_DOMAINS

UPSTREAM = REPO.parent / "shared" / "upstream-data" / "eval"  # ../shared next to the checkout
needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"no local copy of the published files in "
                                                                  f"{UPSTREAM}")
ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TINY_BASE = REPO / "initial_experts" / "tiny" / "base_model"
TINY_REWARD = REPO / "initial_experts" / "tiny" / "reward_model"
N_ITEMS = 4

# the eval types each published file is read with (README "Objectives"; docs/published.md)
MULTIPLE_CHOICE = ["citation_prediction_classification", "hearsay", "hellaswag", "knowledge_crosswords", "medmcqa",
                   "medqa", "mmlu", "mmlu_pro", "normad_country", "normad_value", "scifact", "stem", "truthfulqa"]
EXACT_MATCH = ["gsm8k", "mgsm_hindi", "mgsm_japanese", "nlgraph"]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(folder):
    return {p.name: sha256(p) for p in sorted(Path(folder).glob("*.json"))}


def install(*args):
    return run_cli(["data/build.py", "--published", *map(str, args)], timeout=300, env=ENV)


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# installing

def test_manifest_names_the_35_published_files():
    from data import published
    manifest = published.read_manifest()
    assert len(manifest) == 35 and all(len(h) == 64 for h in manifest.values())
    assert {"human_phd_application.json", "nlgraph.json", "knowledge_crosswords.json", "stem.json",
            "normad_country.json", "normad_value.json"} <= manifest.keys()
    if UPSTREAM.is_dir():
        assert digests(UPSTREAM) == manifest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The published files installed from the local copy with --from, into a folder of their own."""
    if not UPSTREAM.is_dir():
        pytest.skip(f"no local copy of the published files in {UPSTREAM}")
    out = tmp_path_factory.mktemp("published") / "eval"
    proc = install("--from", UPSTREAM, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": installed") == 35
    return out


def test_install_from_a_local_copy_is_byte_identical_and_a_second_install_changes_nothing(installed):
    assert digests(installed) == digests(UPSTREAM) and len(digests(installed)) == 35
    before = {p.name: p.stat().st_mtime_ns for p in installed.iterdir()}
    again = install("--from", UPSTREAM, "--out", installed)
    assert again.returncode == 0 and again.stdout.count(": unchanged") == 35, again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in installed.iterdir()} == before


@needs_upstream
def test_a_tampered_or_incomplete_copy_is_refused_and_nothing_is_installed(tmp_path):
    copy, out = tmp_path / "copy", tmp_path / "eval"
    shutil.copytree(UPSTREAM, copy)
    out.mkdir()
    (out / "nlgraph.json").write_text("the file that was there")
    tampered = copy / "mmlu.json"
    tampered.chmod(0o644)
    tampered.write_bytes(tampered.read_bytes().replace(b'"answer": "A"', b'"answer": "B"', 1))
    proc = install("--from", copy, "--out", out)
    line = one_line_error(proc)
    assert proc.returncode == 1 and f"{tampered}: sha256" in line and "refused, nothing was installed" in line
    assert os.listdir(out) == ["nlgraph.json"] and (out / "nlgraph.json").read_text() == "the file that was there"
    (copy / "stem.json").chmod(0o644)
    (copy / "stem.json").unlink()
    proc = install("--from", copy, "--out", out)
    assert proc.returncode == 2 and f"{copy / 'stem.json'}: missing" in one_line_error(proc)
    assert os.listdir(out) == ["nlgraph.json"]


def test_without_network_the_download_stops_with_one_line_pointing_to_from(tmp_path):
    """The download goes through a proxy that refuses connections (the network boundary): one line, exit 2, no
    folder made."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with block ends: connections to it are refused
    proxy = f"http://127.0.0.1:{port}"
    proc = run_cli(["data/build.py", "--published", "--out", tmp_path / "eval"], timeout=120,
                   env={**ENV, "https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""})
    line = one_line_error(proc)
    assert proc.returncode == 2 and line.startswith("data/build.py: cannot download https://raw.githubusercontent"
                                                    ".com/RKS-2804/test-fin/75897bcf68f2609b8eed776217947180085a8edb/")
    assert "python data/build.py --published --from DIR" in line
    assert not (tmp_path / "eval").exists()


def test_generating_the_sets_keeps_an_installed_published_nlgraph(installed, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(installed, out)
    proc = run_cli(["data/build.py", "--out", out], timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"{out / 'nlgraph.json'}: kept" in proc.stdout and sha256(out / "nlgraph.json") == sha256(
        UPSTREAM / "nlgraph.json")
    assert (out / "tiny_mc.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# every objective on the installed files

def _shortest(items):
    def text(item):
        return item.get("question", item.get("prompt", "")) + "".join(map(str, item.get("choices", {}).values()))
    return sorted(items, key=lambda item: len(text(item)))[:N_ITEMS]


@pytest.fixture(scope="module")
def trimmed(installed, tmp_path_factory):
    """Every installed file with its N_ITEMS shortest dev and test items (the tiny model has 2,048 positions)."""
    out = tmp_path_factory.mktemp("trimmed")
    for path in installed.glob("*.json"):
        data = json.loads(path.read_text())
        data.update(dev=_shortest(data["dev"]), test=_shortest(data["test"]))
        (out / path.name).write_text(json.dumps(data, ensure_ascii=False))
    return out


# (command, -e, -d): the starter scripts as they are (their GPU settings overridden for the tiny population: later
# flags win), and one search for each other objective the published files are read with
SEARCHES = {
    "search_nlgraph.sh": (["bash", "search_nlgraph.sh"], "exact_match", "nlgraph"),
    "search_legal.sh": (["bash", "search_legal.sh"], "multitask", "legal"),
    "search_concise.sh": (["bash", "search_concise.sh", "--reward_model", TINY_REWARD], "rm_concise", "rm"),
    "multiple_choice": (["search.py", "-n", "mc", "-e", "multiple_choice", "-d", "knowledge_crosswords"], None, None),
    "AbstainQA": (["search.py", "-n", "abstain", "-e", "AbstainQA", "-d", "truthfulqa"], None, None),
    "science": (["search.py", "-n", "science", "-e", "multitask", "-d", "science", "--clean_up_on_end", "0"], None,
                None),
    "culture": (["search.py", "-n", "culture", "-e", "multitask", "-d", "culture"], None, None),
}


@pytest.fixture(scope="module")
def searches(trimmed, three_experts, tmp_path_factory):
    """{case: finished search directory}, each search run when first asked for."""
    done = {}

    def run(case):
        if case not in done:
            command, _, _ = SEARCHES[case]
            root = tmp_path_factory.mktemp(case.replace(".", "_"))
            prefix = [] if command[0] == "bash" else [sys.executable]
            proc = subprocess.run(
                prefix + [str(c) for c in command] + [
                    "-g", "cpu", "-i", str(three_experts), "-b", str(TINY_BASE), "--data_dir", str(trimmed),
                    "--output_root", str(root), "-m", "1", "--populate_initial_experts", "0",
                    "--starting_test_set_eval", "0", "--seed", "3"],
                cwd=REPO, capture_output=True, text=True, timeout=600,
                env={**os.environ, **ENV, "PYTHON": sys.executable})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[case] = only_dir(root)
        return done[case]
    return run


@pytest.mark.parametrize("case", list(SEARCHES))
def test_a_one_iteration_search_runs_on_the_installed_files(searches, case):
    directory = searches(case)
    recorded = json.loads((directory / "args.json").read_text())
    _, eval_type, dataset = SEARCHES[case]
    if eval_type:  # a starter script: its objective, on the installed data
        assert (recorded["eval_type"], recorded["dataset"]) == (eval_type, dataset)
    metrics = json.loads((directory / "final_metrics.json").read_text())
    assert metrics["iterations"] == 1 and isinstance(metrics["ending_best_single_test_accuracy"], float)
    if recorded["eval_type"] == "multitask":
        names = {"legal": ("hearsay", "citation_prediction_classification"), "science": ("scifact", "stem"),
                 "culture": ("normad_country", "normad_value")}[recorded["dataset"]]
        for name in names:
            assert 0.0 <= metrics[f"ending_best_single_test_{name}"] <= 1.0


@pytest.fixture
def evaluator(trimmed, monkeypatch):
    """evaluate.py in this process, reading the trimmed files, with Perspective and Vertex AI faked at the network
    boundary (the fakes of test_evaluate.py); its options restored afterwards."""
    import evaluate as ev
    import services
    from test_evaluate import FakeGemini, FakePerspectiveHttp
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    ev.configure(reset=True, data_dir=str(trimmed), reward_model=str(TINY_REWARD), max_new_tokens=8,
                 api_backoff_s=0.0, perspective_qps=1000.0, judge_qps=1000.0)
    services.PERSPECTIVE_HTTP, services.JUDGE_MODEL_FACTORY = FakePerspectiveHttp(), FakeGemini
    yield ev
    services.PERSPECTIVE_HTTP = services.JUDGE_MODEL_FACTORY = None
    ev.configure(reset=True)


def test_every_installed_file_evaluates_with_its_objectives(evaluator, installed, trimmed, tiny):
    """All 35 files, each with the eval types it is read with, and the four multitask domains."""
    jobs = [(name, "multiple_choice") for name in MULTIPLE_CHOICE] + [(name, "exact_match") for name in EXACT_MATCH]
    jobs += [("rm", t) for t in ("rm_default", "rm_verbose", "rm_concise")] + [("realtoxicityprompts", "external_api")]
    jobs += [(p.stem, "human") for p in sorted(installed.glob("human_*.json"))]
    jobs += [(domain, "multitask") for domain in ("legal", "medical", "science", "culture")]
    assert {name for name, _ in jobs} | {"legal", "medical", "science", "culture"} >= {p.stem for p in
                                                                                      installed.glob("*.json")}
    expert = str(tiny.experts / "max_a")
    for name, eval_type in jobs:
        utility, details = evaluator.evaluate_split(expert, eval_type, name, "cpu", str(TINY_BASE), "dev")
        parts = MULTITASK_DOMAINS[name] if eval_type == "multitask" else [name]
        items = [item for part in parts for item in json.loads((trimmed / f"{part}.json").read_text())["dev"]]
        assert len(details["scores"]) == len(items) and isinstance(utility, float), (name, eval_type)
        if eval_type in ("multiple_choice", "multitask"):
            assert details["golds"] == [item["answer"] for item in items]
        if eval_type == "human":
            assert all(1.0 <= s <= 10.0 for s in details["scores"])


def test_strict_exact_match_reads_worked_solutions_as_golds():
    """The published mgsm_* golds are worked solutions ending in the answer ("... 答え: 3"): strict scoring compares
    the last number of the output with the gold's."""
    import evaluate as ev
    gold = "りんごは 5 個です。\n2 個食べました。\n残りは 5 - 2 = 3 個です。\n答え: 3"
    assert ev.exact_match_score("last_number", gold, ev.extract_answer("last_number", gold, "残りは 3 個")) == 1.0
    assert ev.exact_match_score("last_number", gold, "5") == 0.0
    assert ev.exact_match_score("last_number", "3", "3") == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the published result files of a finished search

def published_vote(golds, preds_lists):
    """The published overall_metrics ensemble: per item the prediction with the most votes (the first met on a tie)."""
    correct = 0
    for j, gold in enumerate(golds):
        votes = {}
        for preds in preds_lists:
            votes[preds[j]] = votes.get(preds[j], 0) + 1
        correct += max(votes, key=votes.get) == gold
    return correct / len(golds)


def test_published_layout_links_and_args(searches):
    directory = searches("multiple_choice")
    assert os.readlink(directory / "best") == "global_best" and not os.path.lexists(directory / "worst")
    kept = searches("science")  # --clean_up_on_end 0 keeps global_worst/, and worst/ with it
    assert os.readlink(kept / "worst") == "global_worst" and (kept / "worst" / "adapter_model.safetensors").is_file()
    recorded = json.loads((directory / "args.json").read_text())
    args = eval((directory / "args.txt").read_text(), {"Namespace": argparse.Namespace})  # as published: str(args)
    assert args.name == directory.name
    assert {k: v for k, v in vars(args).items() if k != "name"} == {
        k: v for k, v in recorded.items() if k not in ("name", "args_sha256")}


def test_multiple_choice_files_are_what_the_published_evaluator_writes(searches, trimmed):
    import evaluate as ev
    directory = searches("multiple_choice")
    data = json.loads((trimmed / "knowledge_crosswords.json").read_text())
    preds_lists = []
    for folder in [f"candidate_{i}" for i in range(3)] + ["best"]:
        for split, suffix in (("test", ""), ("dev", "_dev")):
            outputs = json.loads((directory / folder / f"golds_preds_{split}.json").read_text())["outputs"]
            golds = [item["answer"] for item in data[split]]
            preds = [ev.parse_choice_published(item["choices"], out) or "Z" for item, out in zip(data[split], outputs)]
            assert (directory / folder / f"golds{suffix}.json").read_text() == json.dumps(golds)
            assert (directory / folder / f"preds{suffix}.json").read_text() == json.dumps(preds)
            assert not (directory / folder / f"scores{suffix}.json").exists()
            if split == "test" and folder != "best":
                preds_lists.append(preds)
    metrics = json.loads((directory / "final_metrics.json").read_text())
    golds = [item["answer"] for item in data["test"]]
    assert published_vote(golds, preds_lists) == pytest.approx(metrics["ending_top-k_ensemble_test_accuracy"])


def test_exact_match_files_are_what_the_published_evaluator_writes(searches, trimmed):
    directory = searches("search_nlgraph.sh")  # --scoring published: the gold as a substring of the output
    data = json.loads((trimmed / "nlgraph.json").read_text())
    means = []
    for i in range(3):
        for split, suffix in (("test", ""), ("dev", "_dev")):
            outputs = json.loads((directory / f"candidate_{i}" / f"golds_preds_{split}.json").read_text())["outputs"]
            scores = [1 if item["answer"] in out else 0 for item, out in zip(data[split], outputs)]
            assert (directory / f"candidate_{i}" / f"scores{suffix}.json").read_text() == json.dumps(scores)
            assert not (directory / f"candidate_{i}" / f"golds{suffix}.json").exists()
            if split == "test":
                means.append(sum(scores) / len(scores))
    metrics = json.loads((directory / "final_metrics.json").read_text())
    assert sum(means) / 3 == pytest.approx(metrics["ending_top-k_ensemble_test_accuracy"])


def test_a_resumed_finished_search_rewrites_the_published_files(searches, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(searches("multiple_choice"), directory, symlinks=True)
    before = {p: p.read_bytes() for p in directory.rglob("*.json") if p.is_file() and not p.is_symlink()}
    (directory / "candidate_1" / "preds.json").unlink()
    (directory / "best").unlink()
    (directory / "args.txt").write_text("damaged")
    proc = run_cli(["search.py", "--resume", directory], timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.readlink(directory / "best") == "global_best"
    assert eval((directory / "args.txt").read_text(), {"Namespace": argparse.Namespace}).name == "copy"
    for path, data in before.items():
        if path.name != "state.json":
            assert path.read_bytes() == data, path
