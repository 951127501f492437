"""data/: schema validation, the generators (nlgraph, tiny sets, build), and the benchmark converters.

Everything runs offline on real files: generated sets are re-checked with different algorithms than the
generators use, converters read small files written in each source's own column layout through
`datasets.load_dataset` itself, and the scripts run as real subprocesses.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data import nlgraph, prepare_data, published, tiny_data, tiny_demo  # noqa: E402
from data.schema import (EVAL_TYPES, MULTITASK_DOMAINS, DataError, available_datasets,  # noqa: E402
                         load_eval_data, validate)

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream-data" / "eval"
PROMPT_TYPES = ("external_api", "rm_default", "rm_verbose", "rm_concise", "human")


def run(args, env=None, cwd=REPO):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def data_error(name, eval_type, data_dir):
    with pytest.raises(DataError) as info:
        load_eval_data(name, eval_type, data_dir=data_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


MC_ITEM = {"question": "q?", "choices": {"A": "x", "B": "y"}, "answer": "B"}
EM_ITEM = {"question": "q =", "answer": "4"}
PROMPT_ITEM = {"prompt": "say hi"}


# ---------------------------------------------------------------- schema

def test_constants():
    assert len(EVAL_TYPES) == 10
    assert MULTITASK_DOMAINS["legal"] == ("hearsay", "citation_prediction_classification")
    assert MULTITASK_DOMAINS["medical"] == ("medqa", "medmcqa")
    assert MULTITASK_DOMAINS["science"] == ("scifact", "stem")
    assert MULTITASK_DOMAINS["culture"] == ("normad_country", "normad_value")
    assert MULTITASK_DOMAINS["tiny_domain"] == ("tiny_mc", "tiny_em")


def test_valid_files_for_each_kind(tmp_path):
    write(tmp_path / "mc.json", {"dev": [MC_ITEM], "test": [MC_ITEM], "icl_prompt": "Q: a\nA: b"})
    write(tmp_path / "em.json", {"dataset": "EM", "dev": [EM_ITEM], "test": [dict(EM_ITEM, id=3)]})
    write(tmp_path / "p.json", {"dev": [PROMPT_ITEM], "test": [PROMPT_ITEM]})
    for eval_type in ("multiple_choice", "AbstainQA"):
        data = load_eval_data("mc", eval_type, data_dir=tmp_path)
        assert data["dataset"] == "mc" and data["icl_prompt"] == "Q: a\nA: b" and data["dev"] == [MC_ITEM]
    assert load_eval_data("em", "exact_match", data_dir=str(tmp_path))["dataset"] == "EM"
    for eval_type in PROMPT_TYPES:
        assert load_eval_data("p", eval_type, data_dir=tmp_path)["test"] == [PROMPT_ITEM]
    assert available_datasets(tmp_path) == ["em", "mc", "p"]


def test_ten_letter_and_longer_choice_sets(tmp_path):
    choices = {chr(65 + i): str(i) for i in range(13)}
    write(tmp_path / "many.json", {"dev": [{"question": "q", "choices": choices, "answer": "M"}],
                                   "test": [{"question": "q", "choices": choices, "answer": "J"}]})
    assert load_eval_data("many", "multiple_choice", tmp_path)["dev"][0]["answer"] == "M"


def test_multitask_returns_both_datasets(tmp_path):
    write(tmp_path / "tiny_mc.json", {"dev": [MC_ITEM], "test": [MC_ITEM]})
    write(tmp_path / "tiny_em.json", {"dev": [EM_ITEM], "test": [EM_ITEM]})
    data = load_eval_data("tiny_domain", "multitask", data_dir=tmp_path)
    assert data["domain"] == "tiny_domain"
    assert list(data["datasets"]) == ["tiny_mc", "tiny_em"]
    assert data["eval_types"] == {"tiny_mc": "multiple_choice", "tiny_em": "exact_match"}
    assert data["datasets"]["tiny_em"]["dev"] == [EM_ITEM]


def test_missing_file_lists_datasets(tmp_path):
    write(tmp_path / "alpha.json", {"dev": [EM_ITEM], "test": [EM_ITEM]})
    message = data_error("beta", "exact_match", tmp_path)
    assert "beta.json" in message and "no such dataset" in message and "available: alpha" in message


def test_malformed_json_gives_position(tmp_path):
    write(tmp_path / "bad.json", '{"dev": [\n  {"question": "q", "answer": "1"},\n  oops\n], "test": []}')
    message = data_error("bad", "exact_match", tmp_path)
    assert "bad.json" in message and "malformed JSON at line 3 column 3" in message


@pytest.mark.parametrize("content, eval_type, expected", [
    ({"dev": [EM_ITEM]}, "exact_match", "missing split 'test'"),
    ({"dev": [EM_ITEM], "test": []}, "exact_match", "split 'test' is empty"),
    ({"dev": [EM_ITEM], "test": {"a": 1}}, "exact_match", "split 'test' must be a list"),
    ([EM_ITEM], "exact_match", "top level must be an object"),
    ({"dev": [EM_ITEM, {"question": "q"}], "test": [EM_ITEM]}, "exact_match",
     "dev item 1: missing key 'answer'"),
    ({"dev": [MC_ITEM], "test": [MC_ITEM, MC_ITEM, {"question": "q", "choices": {"A": "1", "B": "2"}}]},
     "multiple_choice", "test item 2: missing key 'answer'"),
    ({"dev": [MC_ITEM], "test": [dict(MC_ITEM, answer="C")]}, "multiple_choice",
     "test item 0: answer 'C' is not among the choices A, B"),
    ({"dev": [dict(MC_ITEM, choices={"A": "x", "C": "y"})], "test": [MC_ITEM]}, "multiple_choice",
     "dev item 0: 'choices' keys must be consecutive letters from A"),
    ({"dev": [dict(MC_ITEM, choices=["x", "y"])], "test": [MC_ITEM]}, "AbstainQA",
     "dev item 0: 'choices' must be an object"),
    ({"dev": [PROMPT_ITEM], "test": [PROMPT_ITEM]}, "multiple_choice",
     "dev item 0: multiple_choice needs multiple choice items"),
    ({"dev": [MC_ITEM], "test": [MC_ITEM]}, "exact_match", "dev item 0: exact_match needs exact match items"),
    ({"dev": [EM_ITEM], "test": [EM_ITEM]}, "multiple_choice", "dev item 0: missing key 'choices'"),
    ({"dev": [MC_ITEM], "test": [MC_ITEM]}, "rm_default", "dev item 0: rm_default needs prompt-only items"),
    ({"dev": [EM_ITEM], "test": [dict(EM_ITEM, answer=4)]}, "exact_match",
     "test item 0: 'answer' must be a non-empty string"),
    ({"dev": [PROMPT_ITEM], "test": [{"prompt": "  "}]}, "human", "test item 0: 'prompt' must be a non-empty"),
    ({"dev": [PROMPT_ITEM], "test": ["text"]}, "human", "test item 0: must be an object"),
    ({"dev": [EM_ITEM], "test": [EM_ITEM], "icl_prompt": 3}, "exact_match", "'icl_prompt' must be a string"),
])
def test_bad_content_is_one_line_naming_file_split_item(tmp_path, content, eval_type, expected):
    write(tmp_path / "set.json", content)
    message = data_error("set", eval_type, tmp_path)
    assert message.startswith(str(tmp_path / "set.json") + ": ")
    assert expected in message


def test_mismatch_names_fitting_eval_types(tmp_path):
    write(tmp_path / "p.json", {"dev": [PROMPT_ITEM], "test": [PROMPT_ITEM]})
    message = data_error("p", "exact_match", tmp_path)
    assert all(t in message for t in PROMPT_TYPES)


def test_unknown_eval_type_lists_valid_ones(tmp_path):
    message = data_error("whatever", "accuracy", tmp_path)
    assert "unknown eval type 'accuracy'" in message and all(t in message for t in EVAL_TYPES)


@pytest.mark.parametrize("name", ["../secret", "sub/set", "a\\b", "..", "", "mmlu.json"])
def test_dataset_names_are_plain(tmp_path, name):
    assert "name" in data_error(name, "exact_match", tmp_path)


def test_multitask_needs_a_domain_and_both_files(tmp_path):
    write(tmp_path / "mmlu.json", {"dev": [MC_ITEM], "test": [MC_ITEM]})
    message = data_error("mmlu", "multitask", tmp_path)
    assert "multitask needs a domain" in message and "legal = hearsay + citation_prediction_classification" in message
    write(tmp_path / "hearsay.json", {"dev": [MC_ITEM], "test": [MC_ITEM]})
    message = data_error("legal", "multitask", tmp_path)
    assert "citation_prediction_classification.json" in message and "missing dataset" in message
    write(tmp_path / "citation_prediction_classification.json", {"dev": [MC_ITEM], "test": [PROMPT_ITEM]})
    message = data_error("legal", "multitask", tmp_path)
    assert "citation_prediction_classification.json: test item 0" in message


def test_validate_in_memory():
    assert validate({"dev": [EM_ITEM], "test": [EM_ITEM]}, "exact_match", "mem.json")["dataset"] == "mem"
    with pytest.raises(DataError, match="cannot validate a single dataset for eval type 'multitask'"):
        validate({"dev": [EM_ITEM], "test": [EM_ITEM]}, "multitask")


# ---------------------------------------------------------------- upstream reference files

def _fitting_eval_type(path):
    item = json.loads(path.read_text())["dev"][0]
    return "multiple_choice" if "choices" in item else "exact_match" if "question" in item else "rm_default"


UPSTREAM_FILES = sorted(UPSTREAM.glob("*.json")) if UPSTREAM.is_dir() else []


@pytest.mark.skipif(not UPSTREAM_FILES, reason=f"no upstream reference files in {UPSTREAM}")
@pytest.mark.parametrize("path", UPSTREAM_FILES, ids=lambda p: p.stem)
def test_upstream_files_validate(path):
    eval_type = _fitting_eval_type(path)
    data = load_eval_data(path.stem, eval_type, data_dir=UPSTREAM)
    assert data["dev"] and data["test"]
    if eval_type == "multiple_choice":
        load_eval_data(path.stem, "AbstainQA", data_dir=UPSTREAM)
    if eval_type == "rm_default":
        for t in PROMPT_TYPES:
            load_eval_data(path.stem, t, data_dir=UPSTREAM)


@pytest.mark.skipif(not UPSTREAM_FILES, reason=f"no upstream reference files in {UPSTREAM}")
@pytest.mark.parametrize("domain", ["legal", "medical", "science", "culture"])
def test_upstream_multitask_domains(domain):
    data = load_eval_data(domain, "multitask", data_dir=UPSTREAM)
    # the published pairs are all multiple choice: Yes/No (hearsay, citation, scifact) or yes/no/neutral (normad)
    assert set(data["eval_types"].values()) == {"multiple_choice"}


# ---------------------------------------------------------------- nlgraph

def _parse_graph(question):
    """(edges {(u, v): weight}, a, b) read back from the question text."""
    edges = {}
    for line in question.splitlines():
        m = re.match(r"Node (\d+) is connected to (.*)\.$", line)
        if not m:
            continue
        u = int(m.group(1))
        for part in m.group(2).split(", "):
            w = re.fullmatch(r"node (\d+) with weight (\d+)", part)
            v, weight = (int(w.group(1)), int(w.group(2))) if w else (int(part), 1)
            assert edges.get((v, u), weight) == weight  # both directions listed with the same weight
            edges[(u, v)] = weight
    a, b = map(int, re.search(r"between node (\d+) and node (\d+)\?", question).groups())
    return edges, a, b


def _union_find_connected(edges, a, b):
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for u, v in edges:
        parent[find(u)] = find(v)
    return find(a) == find(b)


def _floyd_warshall(edges, a, b):
    nodes = sorted({n for e in edges for n in e} | {a, b})
    inf = float("inf")
    dist = {(i, j): 0 if i == j else edges.get((i, j), inf) for i in nodes for j in nodes}
    for k in nodes:
        for i in nodes:
            for j in nodes:
                if dist[i, k] + dist[k, j] < dist[i, j]:
                    dist[i, j] = dist[i, k] + dist[k, j]
    return dist[a, b]


@pytest.fixture(scope="module")
def nlgraph_data():
    return nlgraph.make_dataset()


def test_nlgraph_answers_rederived(nlgraph_data):
    for split, size in (("dev", 200), ("test", 1000)):
        items = nlgraph_data[split]
        assert len(items) == size
        for item in items:
            edges, a, b = _parse_graph(item["question"])
            assert a != b
            if item["domain"] == "connectivity":
                assert item["question"].rstrip().endswith("Answer with Yes or No only:")
                assert item["answer"] == ("Yes" if _union_find_connected(edges, a, b) else "No")
            else:
                assert item["domain"] == "shortest_path"
                assert item["answer"] == str(_floyd_warshall(edges, a, b))


def test_nlgraph_balance_and_uniqueness(nlgraph_data):
    for split in ("dev", "test"):
        items = nlgraph_data[split]
        conn = [i["answer"] for i in items if i["domain"] == "connectivity"]
        assert len(conn) == len(items) // 2 and conn.count("Yes") == conn.count("No")
    all_items = nlgraph_data["dev"] + nlgraph_data["test"]
    assert len({i["question"] for i in all_items}) == len(all_items)
    assert len({i["id"] for i in all_items}) == len(all_items)
    validate(nlgraph_data, "exact_match", "nlgraph.json")


def test_nlgraph_cli_deterministic_and_options(tmp_path):
    args = ["data/nlgraph.py", "--dev", "20", "--test", "30", "--min_nodes", "4", "--max_nodes", "7",
            "--edge_prob", "0.4", "--seed", "5"]
    for out in ("a.json", "b.json"):
        assert run(args + ["--out", str(tmp_path / out)]).returncode == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert run(args[:-1] + ["6", "--out", str(tmp_path / "c.json")]).returncode == 0
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["dev"]) == 20 and len(data["test"]) == 30
    for item in data["dev"] + data["test"]:
        edges, a, b = _parse_graph(item["question"])
        assert max(item["question"].count("\nNode "), 0) <= 7
        assert max([a, b] + [n for e in edges for n in e]) < 7
    bad = run(["data/nlgraph.py", "--min_nodes", "9", "--max_nodes", "3", "--out", str(tmp_path / "x.json")])
    assert bad.returncode == 2 and "min_nodes" in bad.stderr and not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- tiny sets and build

def test_tiny_sets_deterministic_sized_and_correct():
    first, second = tiny_data.make_all(0), tiny_data.make_all(0)
    assert {k: nlgraph.to_text(v) for k, v in first.items()} == {k: nlgraph.to_text(v) for k, v in second.items()}
    assert nlgraph.to_text(tiny_data.make_all(1)["tiny_mc"]) != nlgraph.to_text(first["tiny_mc"])
    for name, data in first.items():
        assert 40 <= len(data["dev"]) <= 60 and 100 <= len(data["test"]) <= 200, name
        validate(data, tiny_data.EVAL_TYPE[name], name)
        keys = [json.dumps({k: v for k, v in i.items() if k != "id"}, sort_keys=True)
                for i in data["dev"] + data["test"]]
        assert len(set(keys)) == len(keys), f"{name} repeats an item"
    assert "icl_prompt" in first["tiny_mc_icl"] and "icl_prompt" not in first["tiny_mc"]
    for item in first["tiny_mc"]["dev"] + first["tiny_mc"]["test"]:
        assert list(item["choices"]) == ["A", "B", "C", "D"]
        right = item["choices"][item["answer"]]
        q = item["question"]
        if item["domain"] == "biggest":
            assert int(right) == max(int(c) for c in item["choices"].values())
        elif item["domain"] == "plus":
            a, b = map(int, re.findall(r"\d", q))
            assert int(right) == a + b
        elif item["domain"] == "next":
            assert int(right) == int(re.search(r"\d", q).group()) + 1
        elif item["domain"] == "animal":
            assert right in tiny_data.ANIMALS
            assert sum(c in tiny_data.ANIMALS for c in item["choices"].values()) == 1
    for item in first["tiny_em"]["dev"] + first["tiny_em"]["test"]:
        q, ans = item["question"], item["answer"]
        nums = list(map(int, re.findall(r"\d", q)))
        expected = {"plus": lambda: sum(nums), "minus": lambda: nums[0] - nums[1], "next": lambda: nums[0] + 1,
                    "bigger": lambda: max(nums)}.get(item["domain"])
        if expected:
            assert ans == str(expected())
        assert len(ans.split()) == 1


def test_tiny_vocabulary_covers_every_generated_string():
    vocab = set(tiny_data.vocabulary())
    assert len(vocab) < 400
    for data in tiny_data.make_all(3).values():
        for piece in [v for v in data.values() if isinstance(v, str)]:
            assert set(tiny_data.tokens(piece)) <= vocab
        for item in data["dev"] + data["test"]:
            for value in item.values():
                texts = list(value.values()) + list(value) if isinstance(value, dict) else [str(value)]
                for text in texts:
                    assert set(tiny_data.tokens(text)) <= vocab | set(tiny_data.tokens(str(item.get("id"))))
    text = "\n".join(tiny_data.vocabulary_text())
    assert text.isascii()


def test_build_writes_valid_files_idempotently(tmp_path):
    out = tmp_path / "eval"
    first = run(["data/build.py", "--out", str(out)])
    assert first.returncode == 0, first.stderr
    names = sorted(p.stem for p in out.glob("*.json"))
    assert names == sorted(["nlgraph", "tiny_mc", "tiny_mc_icl", "tiny_em", "tiny_rm", "tiny_human",
                            "tiny_demo_quick"])
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.json")}
    second = run(["-m", "data.build", "--out", str(out)])
    assert second.returncode == 0 and second.stdout.count("unchanged") == len(names)
    assert snapshot == {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.json")}
    for name in names:
        eval_type = tiny_data.EVAL_TYPE.get(name, "exact_match")
        assert load_eval_data(name, eval_type, data_dir=out)["dev"]
    for eval_type in PROMPT_TYPES:
        load_eval_data("tiny_rm", eval_type, data_dir=out)
    load_eval_data("tiny_mc", "AbstainQA", data_dir=out)
    domain = load_eval_data("tiny_domain", "multitask", data_dir=out)
    assert domain["eval_types"] == {"tiny_mc": "multiple_choice", "tiny_em": "exact_match"}
    assert (out / "nlgraph.json").read_text() == nlgraph.to_text(nlgraph.make_dataset())
    # tiny_demo_quick is the head of tiny_demo's splits, under its own name
    quick, full = json.loads((out / "tiny_demo_quick.json").read_text()), tiny_demo.make_dataset(0)
    assert quick == {"dataset": "tiny_demo_quick", "dev": full["dev"][:100], "test": full["test"][:240]}


def test_committed_phd_prompts(tmp_path):
    path = REPO / "data" / "eval" / "human_phd_application.json"
    if published.is_published_file(path):  # data/build.py --published replaced it in this working tree
        committed = subprocess.run(["git", "show", "HEAD:data/eval/human_phd_application.json"], cwd=REPO,
                                   capture_output=True, text=True)
        if committed.returncode != 0:
            pytest.skip("data/eval holds the published human_phd_application.json and git cannot show ours")
        path = write(tmp_path / path.name, committed.stdout)
    data = load_eval_data("human_phd_application", "human", data_dir=path.parent)
    prompts = [i["prompt"] for i in data["dev"] + data["test"]]
    assert len(data["dev"]) == 25 and len(data["test"]) == 25 and len(set(prompts)) == 50
    reference = UPSTREAM / "human_phd_application.json"
    if reference.exists():
        theirs = json.loads(reference.read_text())
        assert not set(prompts) & {i["prompt"] for s in ("dev", "test") for i in theirs[s]}


# ---------------------------------------------------------------- prepare_data converters (source schemas)

def _load(path):
    import datasets
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _mmlu_rows(n, offset=0):
    return [{"question": f"question {i}?", "subject": "anatomy", "choices": [f"c{i}{j}" for j in range(4)],
             "answer": i % 4} for i in range(offset, offset + n)]


def test_convert_mmlu(tmp_path):
    items = prepare_data.convert_mmlu(_load(_parquet(tmp_path / "test.parquet", _mmlu_rows(5))))
    assert items[2] == {"question": "question 2?", "choices": {"A": "c20", "B": "c21", "C": "c22", "D": "c23"},
                        "answer": "C", "id": 2, "domain": "anatomy"}


def test_convert_mmlu_pro_drops_padding(tmp_path):
    rows = [{"question_id": 70, "question": "Find x.", "options": ["1", "N/A", "3", "4"], "answer": "C",
             "answer_index": 2, "cot_content": "", "category": "math", "src": "ori_mmlu"}]
    item = prepare_data.convert_mmlu_pro(_load(_parquet(tmp_path / "t.parquet", rows)))[0]
    assert item["choices"] == {"A": "1", "B": "3", "C": "4"} and item["answer"] == "B" and item["domain"] == "math"


def test_convert_hellaswag_skips_unlabelled(tmp_path):
    rows = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then", "ctx_b": "the man",
             "ctx": "Then, the man", "endings": ["a", "b", "c", "d"], "source_id": "x", "split": "val",
             "split_type": "indomain", "label": "3"},
            {"ind": 5, "activity_label": "Baking", "ctx_a": "", "ctx_b": "", "ctx": "She",
             "endings": ["a", "b", "c", "d"], "source_id": "y", "split": "test", "split_type": "indomain",
             "label": ""}]
    items = prepare_data.convert_hellaswag(_load(_jsonl(tmp_path / "v.jsonl", rows)))
    assert items == [{"question": "Then, the man", "choices": {"A": "a", "B": "b", "C": "c", "D": "d"},
                      "answer": "D", "id": 4, "domain": "Removing ice from car"}]


def test_convert_gsm8k_final_number(tmp_path):
    rows = [{"question": "How many?", "answer": "3 * 500 = <<3*500=1500>>1500\n#### 1,500"},
            {"question": "No final answer", "answer": "it is 4"}]
    items = prepare_data.convert_gsm8k(_load(_parquet(tmp_path / "t.parquet", rows)))
    assert items == [{"question": "How many?", "answer": "1500", "id": 0, "domain": "gsm8k"}]


def test_convert_truthfulqa_shuffles_deterministically(tmp_path):
    rows = [{"question": f"Is claim {i} true?",
             "mc1_targets": {"choices": [f"right {i}"] + [f"wrong {i}.{j}" for j in range(11)],
                             "labels": [1] + [0] * 11},
             "mc2_targets": {"choices": ["x"], "labels": [1]}} for i in range(8)]
    ds = _load(_jsonl(tmp_path / "validation.jsonl", rows))
    items = prepare_data.convert_truthfulqa(ds, seed=0)
    assert items == prepare_data.convert_truthfulqa(ds, seed=0)
    assert all(i["choices"][i["answer"]].startswith("right") for i in items)
    assert len({i["answer"] for i in items}) > 1 and list(items[0]["choices"])[-1] == "L"


def test_convert_medqa_and_medmcqa(tmp_path):
    rows = [{"question": "A 30-year-old man...", "answer": "Aspirin",
             "options": {"A": "Heparin", "B": "Aspirin", "C": "Warfarin", "D": "None"},
             "meta_info": "step1", "answer_idx": "B", "metamap_phrases": ["man"]}]
    item = prepare_data.convert_medqa(_load(_jsonl(tmp_path / "medqa.jsonl", rows)))[0]
    assert item["answer"] == "B" and item["choices"]["B"] == "Aspirin"
    rows = [{"id": "abc", "question": "Cause of X?", "opa": "p", "opb": "q", "opc": "r", "opd": "s", "cop": 2,
             "choice_type": "single", "exp": "", "subject_name": "Anatomy", "topic_name": "t"},
            {"id": "def", "question": "Hidden?", "opa": "p", "opb": "q", "opc": "r", "opd": "s", "cop": -1,
             "choice_type": "single", "exp": "", "subject_name": "Anatomy", "topic_name": "t"}]
    items = prepare_data.convert_medmcqa(_load(_parquet(tmp_path / "m.parquet", rows)))
    assert items == [{"question": "Cause of X?", "choices": {"A": "p", "B": "q", "C": "r", "D": "s"},
                      "answer": "C", "id": "abc", "domain": "Anatomy"}]


SCIFACT_CLAIMS = [
    {"id": 1, "claim": "Drug A helps.", "evidence_doc_id": "11", "evidence_label": "SUPPORT",
     "evidence_sentences": [0], "cited_doc_ids": [11]},
    {"id": 2, "claim": "Drug B harms.", "evidence_doc_id": "12", "evidence_label": "CONTRADICT",
     "evidence_sentences": [1], "cited_doc_ids": [12]},
    {"id": 3, "claim": "Unclear.", "evidence_doc_id": "", "evidence_label": "", "evidence_sentences": [],
     "cited_doc_ids": [11]},
]
SCIFACT_CORPUS = [{"doc_id": 11, "title": "Drug A trial", "abstract": ["It helped.", "A lot."], "structured": False},
                  {"doc_id": 12, "title": "Drug B trial.", "abstract": ["No harm.", "None."], "structured": False}]


def test_convert_scifact_joins_corpus(tmp_path):
    claims = _load(_jsonl(tmp_path / "claims.jsonl", SCIFACT_CLAIMS))
    corpus = _load(_jsonl(tmp_path / "corpus.jsonl", SCIFACT_CORPUS))
    items = prepare_data.convert_scifact(claims, corpus=corpus)
    assert [i["answer"] for i in items] == ["A", "B"]
    assert "Evidence: Drug A trial. It helped. A lot.\nClaim: Drug A helps." in items[0]["question"]
    assert items[1]["choices"] == {"A": "Support", "B": "Contradict"}


def test_convert_legalbench(tmp_path):
    rows = [{"answer": "No", "index": "0", "slice": "non-assertive conduct", "text": "Arthur waved."},
            {"answer": "Yes", "index": "1", "slice": "statement", "text": "Mary said it rained."}]
    items = prepare_data.convert_hearsay(_load(_jsonl(tmp_path / "h.jsonl", rows)))
    assert [i["answer"] for i in items] == ["B", "A"] and "Evidence: Arthur waved." in items[0]["question"]
    rows = [{"answer": "Yes", "citation": "Gunn v. Minton,", "index": "7", "text": "Review is de novo."}]
    item = prepare_data.convert_citation_prediction(_load(_jsonl(tmp_path / "c.jsonl", rows)))[0]
    assert item["answer"] == "A" and "Case: Gunn v. Minton," in item["question"] and item["id"] == "7"


def test_convert_prompt_sets(tmp_path):
    rows = [{"prompt": "Write a haiku.", "prompt_id": "p1", "chosen": [{"role": "user", "content": "x"}],
             "rejected": [{"role": "user", "content": "y"}], "score_chosen": 8.0, "score_rejected": 3.0},
            {"prompt": "x" * (prepare_data.RM_MAX_CHARS + 1), "prompt_id": "p2",
             "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}],
             "score_chosen": 8.0, "score_rejected": 3.0}]
    assert prepare_data.convert_rm(_load(_parquet(tmp_path / "rm.parquet", rows))) == \
        [{"prompt": "Write a haiku.", "id": "p1"}]
    score = {"text": None, "toxicity": 0.1, "profanity": 0.0}
    rows = [{"filename": "a.txt", "begin": 0, "end": 10, "challenging": False,
             "prompt": {"text": "Corruption involving", "toxicity": 0.2, "profanity": 0.1},
             "continuation": dict(score, text=" the contractors")},
            {"filename": "b.txt", "begin": 0, "end": 10, "challenging": True,
             "prompt": {"text": "The man", "toxicity": 0.9, "profanity": 0.8},
             "continuation": dict(score, text=" said")}]
    items = prepare_data.convert_realtoxicityprompts(_load(_jsonl(tmp_path / "rtp.jsonl", rows)))
    assert [(i["prompt"], i["domain"]) for i in items] == [("Corruption involving", "not_challenging"),
                                                          ("The man", "challenging")]


# ---------------------------------------------------------------- prepare_data end to end (offline)

def test_prepare_from_local_copies(tmp_path):
    local, out = tmp_path / "local", tmp_path / "out"
    _parquet(local / "mmlu" / "all" / "validation-00000-of-00001.parquet", _mmlu_rows(6))
    _parquet(local / "mmlu" / "all" / "test-00000-of-00001.parquet", _mmlu_rows(9, offset=100))
    _parquet(local / "mmlu" / "abstract_algebra" / "test-00000-of-00001.parquet", _mmlu_rows(2, offset=500))
    _jsonl(local / "scifact" / "claims" / "train.jsonl", SCIFACT_CLAIMS[:2])
    _jsonl(local / "scifact" / "claims" / "validation.jsonl", SCIFACT_CLAIMS[2:])
    _jsonl(local / "scifact" / "corpus" / "train.jsonl", SCIFACT_CORPUS)
    rows = [{"answer": ["Yes", "No"][i % 2], "index": str(i), "slice": "s", "text": f"evidence {i}"}
            for i in range(5)]
    _jsonl(local / "hearsay" / "hearsay" / "test.jsonl", rows)
    args = ["data/prepare_data.py", "mmlu", "scifact", "hearsay", "--local_dir", str(local),
            "--out_dir", str(out), "--dev", "1", "--test", "4"]
    result = run(args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    mmlu = load_eval_data("mmlu", "multiple_choice", data_dir=out)
    assert len(mmlu["dev"]) == 1 and len(mmlu["test"]) == 4
    assert all(int(i["question"].split()[1].rstrip("?")) < 100 for i in mmlu["dev"])
    assert all(100 <= int(i["question"].split()[1].rstrip("?")) < 500 for i in mmlu["test"])
    scifact = load_eval_data("scifact", "multiple_choice", data_dir=out)
    assert len(scifact["dev"]) == 1 and len(scifact["test"]) == 1 and scifact["dev"] != scifact["test"]
    hearsay = load_eval_data("hearsay", "multiple_choice", data_dir=out)
    assert hearsay["dev"] == hearsay["test"][:1]
    first = (out / "mmlu.json").read_bytes()
    assert run(args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}).returncode == 0
    assert (out / "mmlu.json").read_bytes() == first


def test_prepare_missing_local_copy_is_one_line(tmp_path):
    result = run(["data/prepare_data.py", "gsm8k", "--local_dir", str(tmp_path), "--out_dir", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "gsm8k" in result.stderr and "hf download openai/gsm8k" in result.stderr


def test_prepare_without_network_exits_2_with_one_line(tmp_path):
    result = run(["data/prepare_data.py", "medqa", "--out_dir", str(tmp_path)],
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                      "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")})
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line, result.stderr
    assert "medqa" in line and "GBaker/MedQA-USMLE-4-options" in line and "unreachable" in line
    assert "HF_HUB_OFFLINE" in line and "hf auth login" in line and "--local_dir" in line
    assert not (tmp_path / "medqa.json").exists()


def test_prepare_names_without_source_print_how_to_add(tmp_path):
    result = run(["data/prepare_data.py", "knowledge_crosswords", "nlgraph", "human_cooking",
                  "--out_dir", str(tmp_path)])
    assert result.returncode == 1
    assert "knowledge_crosswords: no public source" in result.stdout
    assert "data/nlgraph.py" in result.stdout and "human_<topic>.json" in result.stdout
    unknown = run(["data/prepare_data.py", "imagenet"])
    assert unknown.returncode == 2 and "unknown dataset(s) imagenet" in unknown.stderr
