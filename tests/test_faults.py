"""Every fault ends cleanly: a table of bad inputs and faults run through search.py as real processes, then the
faults that need a running search (a full disk, signals, W&B without network) one by one."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from test_reliability import reference, same_result  # noqa: F401 - reference is a fixture
from test_search import only_dir, run_search

BASE = ["-n", "bad", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu", "-b", "initial_experts/tiny/base_model"]
SEARCH_ARGS = ["-m", "2", "-p", "5"]
QUIET_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "OMP_NUM_THREADS": "1"}


# --- building damaged inputs (real files) ---------------------------------------------------------------------

def experts_copy(root, tiny, damage=None):
    """A copy of the tiny experts under root/experts, with damage(folder, first expert, last expert) applied."""
    folder = root / "experts"
    shutil.copytree(tiny.experts, folder)
    names = sorted(os.listdir(folder))
    if damage:
        damage(folder, folder / names[0], folder / names[-1])
    return ["-i", str(folder)]


def set_tensor(value):
    def damage(folder, first, last):
        weights = load_file(last / "adapter_model.safetensors")
        key = sorted(weights)[3]
        weights[key] = weights[key].clone()
        weights[key].view(-1)[5] = value
        save_file(weights, last / "adapter_model.safetensors")
    return damage


def write_weights(content):
    def damage(folder, first, last):
        path = last / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(content(data))
    return damage


def edit_config(**changes):
    def damage(folder, first, last):
        config = json.loads((last / "adapter_config.json").read_text())
        config.update(changes)
        (last / "adapter_config.json").write_text(json.dumps(config))
    return damage


def write_config(text):
    def damage(folder, first, last):
        (last / "adapter_config.json").write_text(text)
    return damage


def drop_config(folder, first, last):
    (last / "adapter_config.json").unlink()


def to_bf16(folder, first, last):
    weights = load_file(last / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, last / "adapter_model.safetensors")


def no_tensors(folder, first, last):
    save_file({}, last / "adapter_model.safetensors")


def base_copy(root, tiny, drop=(), replace=None):
    folder = root / "base"
    shutil.copytree(tiny.base, folder)
    for name in drop:
        (folder / name).unlink()
    for name, text in (replace or {}).items():
        (folder / name).write_text(text)
    return ["-b", str(folder)]


def dataset_with(root, text):
    """tiny_demo_quick with one dev question replaced by text (raw JSON, so escapes stay as written)."""
    data = json.loads((REPO / "data/eval/tiny_demo_quick.json").read_text())
    data["dev"][3]["question"] = "@@MARK@@"
    folder = root / "data"
    folder.mkdir()
    (folder / "tiny_demo_quick.json").write_text(json.dumps(data).replace('"@@MARK@@"', text))
    return ["--data_dir", str(folder)]


# --- resume cases: a finished search, copied and damaged ------------------------------------------------------

def damaged_search(root, finished, damage):
    directory = root / "search" / os.path.basename(finished)
    shutil.copytree(finished, directory)
    damage(directory)
    return ["--resume", str(directory)]


def edit_args(**changes):
    def damage(directory):
        args = json.loads((directory / "args.json").read_text())
        args.update(changes)
        (directory / "args.json").write_text(json.dumps(args, indent=2))
    return damage


def write_file(name, content):
    def damage(directory):
        (directory / name).write_bytes(content(directory / name))
    return damage


def lose_candidate(directory):
    """A search stopped mid-way (stage "search") whose candidate_2/ was deleted by hand."""
    shutil.rmtree(directory / "candidate_2")
    state = json.loads((directory / "state.json").read_text())
    state["stage"] = "search"
    (directory / "state.json").write_text(json.dumps(state))


def other_search_state(directory):
    """state.json of another search (another seed): args.json is intact, but the state is not its own."""
    state = json.loads((directory / "state.json").read_text())
    state["args_sha256"] = "0" * 64
    (directory / "state.json").write_text(json.dumps(state))


def listening_socket():
    """A local TCP port that accepts connections (the kernel completes them) but never answers: a network where
    packets to a server go unanswered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    return server


def closed_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def with_file_size_limit(kib, command):
    """command under a file size limit (RLIMIT_FSIZE, bash's ulimit -f in KiB): a write past it fails with EFBIG,
    like a write to a full disk."""
    return ["bash", "-c", f'ulimit -f {kib} && exec "$0" "$@"', *command]


# name -> (arguments(root, tiny, finished), expected text of the one line, exit status, extra options)
CASES = {
    # 1. poisoned experts
    "expert with NaN": (lambda r, t, f: BASE + experts_copy(r, t, set_tensor(float("nan"))), "non-finite", 2, {}),
    "expert with inf": (lambda r, t, f: BASE + experts_copy(r, t, set_tensor(float("inf"))), "non-finite", 2, {}),
    # 2. broken expert files
    "random-byte weights": (lambda r, t, f: BASE + experts_copy(r, t, write_weights(lambda d: os.urandom(len(d)))),
                            "not a readable safetensors", 2, {}),
    "truncated weights": (lambda r, t, f: BASE + experts_copy(r, t, write_weights(lambda d: d[:len(d) // 2])),
                          "not a readable safetensors", 2, {}),
    "20-byte weights": (lambda r, t, f: BASE + experts_copy(r, t, write_weights(lambda d: d[:20])),
                        "not a readable safetensors", 2, {}),
    "empty weights file": (lambda r, t, f: BASE + experts_copy(r, t, write_weights(lambda d: b"")),
                           "not a readable safetensors", 2, {}),
    "weights without tensors": (lambda r, t, f: BASE + experts_copy(r, t, no_tensors), "holds no tensors", 2, {}),
    "garbled adapter config": (lambda r, t, f: BASE + experts_copy(r, t, write_config('{"r": 8, "lora_al')),
                               "adapter_config.json is damaged", 2, {}),
    "non-object adapter config": (lambda r, t, f: BASE + experts_copy(r, t, write_config("[8, 16]")),
                                  "a JSON object expected", 2, {}),
    "expert without config": (lambda r, t, f: BASE + experts_copy(r, t, drop_config), "no adapter_config.json",
                              2, {}),
    # 3. experts that do not fit together
    "lora_alpha differs": (lambda r, t, f: BASE + experts_copy(r, t, edit_config(lora_alpha=32)),
                           "differs in lora_alpha", 2, {}),
    "rank differs in config": (lambda r, t, f: BASE + experts_copy(r, t, edit_config(r=4)), "differs in r:", 2, {}),
    "rslora differs": (lambda r, t, f: BASE + experts_copy(r, t, edit_config(use_rslora=True)),
                       "differs in use_rslora", 2, {}),
    "dora differs": (lambda r, t, f: BASE + experts_copy(r, t, edit_config(use_dora=True)), "differs in use_dora",
                     2, {}),
    "target modules differ": (lambda r, t, f: BASE + experts_copy(r, t, edit_config(target_modules=["q_proj"])),
                              "differs in target_modules", 2, {}),
    "one bf16 expert": (lambda r, t, f: BASE + experts_copy(r, t, to_bf16), "differs in dtype", 2, {}),
    "fast_merge 0 on adapters": (lambda r, t, f: BASE + ["-i", str(t.experts), "--fast_merge", "0"],
                                 "use --fast_merge 1", 2, {}),
    # 4. a base model that cannot work
    "base without tokenizer": (lambda r, t, f: BASE + ["-i", str(t.experts)]
                               + base_copy(r, t, drop=("tokenizer.json", "tokenizer_config.json")),
                               "no tokenizer files", 2, {}),
    "base with broken tokenizer": (lambda r, t, f: BASE + ["-i", str(t.experts)]
                                   + base_copy(r, t, replace={"tokenizer.json": "{not json"}),
                                   "tokenizer of base model", 2, {}),
    "base without weights": (lambda r, t, f: BASE + ["-i", str(t.experts)] + base_copy(r, t, drop=("model.safetensors",)),
                             "has no weights", 2, {}),
    "base_model_idx out of range": (lambda r, t, f: BASE + ["-i", str(t.experts), "--merge_method", "ties",
                                                            "--merge_params", '{"base_model_idx": 10}'],
                                    "base_model_idx 10 is out of range", 2, {}),
    # 5. damaged or edited resume state
    "truncated state.json": (lambda r, t, f: damaged_search(r, f, write_file("state.json", lambda p: p.read_bytes()[:100])),
                             "state.json is damaged", 2, {}),
    "non-object state.json": (lambda r, t, f: damaged_search(r, f, write_file("state.json", lambda p: b"[1, 2]")),
                              "state.json is damaged", 2, {}),
    "state.json of other arguments": (lambda r, t, f: damaged_search(r, f, other_search_state),
                                      "belongs to other arguments", 2, {}),
    "garbled args.json": (lambda r, t, f: damaged_search(r, f, write_file("args.json", lambda p: p.read_bytes()[:-40])),
                          "args.json is damaged", 2, {}),
    "empty-object args.json": (lambda r, t, f: damaged_search(r, f, write_file("args.json", lambda p: b"{}")),
                               "checksum", 2, {}),
    "edited seed": (lambda r, t, f: damaged_search(r, f, edit_args(seed=8)), "checksum", 2, {}),
    "edited merge method": (lambda r, t, f: damaged_search(r, f, edit_args(merge_method="ties")), "checksum", 2, {}),
    "edited max_iteration": (lambda r, t, f: damaged_search(r, f, edit_args(max_iteration=50)), "checksum", 2, {}),
    "candidate folder missing": (lambda r, t, f: damaged_search(r, f, lose_candidate),
                                 "candidate_2/ is missing", 2, {}),
    # 6. a full disk: the first file cannot be written (exit 1: a fault, not a usage error; nothing left)
    "file size limit at the start": (lambda r, t, f: BASE + ["-i", str(t.experts)], "args.json", 1,
                                     {"file_size_kib": 1}),
    "file size limit for the first candidates": (lambda r, t, f: BASE + ["-i", str(t.experts)], "File too large", 1,
                                                 {"file_size_kib": 20}),
    # 7. no network with credentials present
    "W&B online requested, server refuses": (lambda r, t, f: BASE + ["-i", str(t.experts), "--wandb_mode", "online"],
                                             "does not answer", 2,
                                             {"env": {"WANDB_API_KEY": "x" * 40,
                                                      "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}}),
    # 8. odd names and text
    "300-character name": (lambda r, t, f: BASE + ["-i", str(t.experts), "-n", "a" * 300],
                           "not a usable folder name", 2, {}),
    "name with a tab": (lambda r, t, f: BASE + ["-i", str(t.experts), "-n", "a\tb"], "not a usable folder name", 2,
                        {}),
    "name with a star": (lambda r, t, f: BASE + ["-i", str(t.experts), "-n", "run*"], "not a usable folder name", 2,
                         {}),
    "lone surrogate in a dataset": (lambda r, t, f: BASE + ["-i", str(t.experts)]
                                    + dataset_with(r, '"what is \\ud800 2?"'), "lone surrogate", 2, {}),
    # 9. an lm-eval task whose data cannot be had (a Hub dataset, offline): refused while the workers start
    "lm-eval Hub task offline": (lambda r, t, f: ["-n", "bad", "-e", "lm_eval", "--lm_eval_tasks", "arc_easy", "-g",
                                                  "cpu", "-i", str(t.experts), "-b", str(t.base)],
                                 "lm-eval task 'arc_easy' cannot be loaded", 2,
                                 {"env": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}),
}


def processes_with(marker):
    """Pids of live processes whose environment holds marker (a search's workers inherit the driver's). Not counted:
    zombies (exited, not yet reaped by init) and multiprocessing's resource tracker, which the spawn start method
    runs beside the workers and which leaves by itself as soon as the driver's end of its pipe closes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                tracker = b"multiprocessing.resource_tracker" in f.read()
        except OSError:
            continue
        if not zombie and not tracker:
            found.append(int(pid))
    return found


def tree_digest(path):
    """Names and contents of every file under path (to show that a refused resume changed nothing)."""
    digest = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digest


LEFT_BEHIND = {}


@pytest.fixture(scope="module")
def finished(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    marker = uuid.uuid4().hex
    run_search(root / "runs", "-m", "1", "-p", "5", env={"BWR_FAULT_CASE": marker}, output=root / "out.txt")
    LEFT_BEHIND["finished"] = processes_with(marker)  # looked for the moment search.py has exited
    return only_dir(root / "runs")


def test_a_finished_search_leaves_no_process(finished):
    """Driver and workers leave without the interpreter's teardown (search.exit_at_once), the workers before the
    driver: none of their processes is alive once search.py has exited (a worker the driver left to notice its
    closed pipe lives on for about a second)."""
    assert (finished / "global_best").is_dir()
    assert LEFT_BEHIND["finished"] == []


def run_case(name, root, tiny, finished):
    make_args, expected, status, options = CASES[name]
    root.mkdir()
    args = make_args(root, tiny, finished)
    resumed = args[args.index("--resume") + 1] if "--resume" in args else None
    before = tree_digest(resumed) if resumed else None
    output_root = root / "out"
    if not resumed:
        args = args + ["--output_root", str(output_root)]
    marker = f"BWR_FAULT_CASE={uuid.uuid4().hex}"
    env = {**os.environ, **QUIET_ENV, **options.get("env", {}), "BWR_FAULT_CASE": marker.split("=")[1]}
    start = time.time()
    command = [sys.executable, "search.py", *args]
    if "file_size_kib" in options:
        command = with_file_size_limit(options["file_size_kib"], command)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    problems = []
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != status:
        problems.append(f"exit {proc.returncode}, expected {status}")
    if len(lines) != 1 or not lines[0].startswith("search.py: "):
        problems.append("not one line")
    if "Traceback" in proc.stderr:
        problems.append("traceback")
    if lines and expected not in lines[0]:
        problems.append(f"{expected!r} not in the line")
    if output_root.exists() and any(output_root.iterdir()):
        problems.append(f"left {os.listdir(output_root)}")
    if resumed and tree_digest(resumed) != before:
        problems.append("the refused resume changed the search directory")
    # the workers start while the driver validates: a refused input must not leave one running
    if processes_with(marker):
        problems.append(f"left worker processes {processes_with(marker)}")
    return name, problems, proc.stderr.strip()[-600:], time.time() - start


def test_table_of_bad_inputs_and_faults(tiny, data, finished, tmp_path):
    """Each case: exit status 2 (1 for a full disk), one line on stderr, no traceback, no new directory, no worker
    process left running, and a refused resume leaves the search directory byte for byte as it was."""
    assert len(CASES) >= 30
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda item: run_case(item[1], tmp_path / f"case{item[0]}", tiny, finished),
                                 enumerate(sorted(CASES))))
    failed = [f"{name}: {', '.join(problems)} | {stderr}" for name, problems, stderr, _ in outcomes if problems]
    seconds = sorted(o[3] for o in outcomes)
    slowest = max(outcomes, key=lambda o: o[3])
    print(f"{len(outcomes)} cases; median {seconds[len(seconds) // 2]:.1f}s, slowest {slowest[0]} {slowest[3]:.1f}s")
    assert not failed, "\n".join(failed)


# --- 7. network clients: bounded time, then one line ------------------------------------------------------------

@pytest.fixture
def services_module():
    """services.py (where the network boundary is read), with short timeouts; restored afterwards."""
    import evaluate
    import services
    saved = services.PERSPECTIVE_DISCOVERY_URL, services.PERSPECTIVE_HTTP, services.JUDGE_MODEL_FACTORY
    evaluate.configure(api_timeout_s=1.0, api_retries=1, api_backoff_s=0.1)
    yield services
    services.PERSPECTIVE_DISCOVERY_URL, services.PERSPECTIVE_HTTP, services.JUDGE_MODEL_FACTORY = saved
    services._PERSPECTIVE_CLIENT.clear()
    services._JUDGES.clear()
    evaluate.configure(reset=True)


def test_perspective_without_an_answering_network_fails_in_bounded_time(services_module, monkeypatch):
    server = listening_socket()  # connections are accepted by the kernel and then nothing is ever answered
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "fake-key")
    services_module.PERSPECTIVE_HTTP = None  # the real httplib2 client, as in production
    services_module.PERSPECTIVE_DISCOVERY_URL = f"http://127.0.0.1:{server.getsockname()[1]}/$discovery/rest"
    with pytest.raises(services_module.EvalError, match="Perspective API unreachable") as error:
        services_module.perspective_client()
    assert "\n" not in str(error.value)
    server.close()


class SilentGemini:
    """Network-boundary fake: a Vertex AI model whose requests never come back."""

    def __init__(self, name):
        pass

    def generate_content(self, text, generation_config=None):
        time.sleep(3600)


def test_vertex_judge_without_an_answer_fails_in_bounded_time(services_module):
    services_module.JUDGE_MODEL_FACTORY = SilentGemini
    with pytest.raises(services_module.EvalError, match="no answer within 1 s"):
        services_module.judge("prompt", "response")


def test_wandb_key_without_network_falls_back_to_offline(tiny, data, tmp_path):
    """WANDB_API_KEY set, the W&B server accepts connections but never answers: the search probes it for
    WANDB_PROBE_TIMEOUT seconds, says so in log.txt, logs offline, and finishes."""
    server = listening_socket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(QUIET_ENV)
    del env["WANDB_MODE"]
    env.update({"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
                "HOME": str(tmp_path)})
    proc = subprocess.run([sys.executable, "search.py", "-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
                           "-i", str(tiny.experts), "-b", str(tiny.base), "-m", "0", "--output_root",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    server.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    directory = only_dir(tmp_path / "out")
    log = open(os.path.join(directory, "log.txt")).read()
    assert "does not answer" in log and "logging offline" in log and "W&B logging in offline mode" in log
    assert any(name.startswith("offline-run") for name in os.listdir(os.path.join(directory, "wandb")))


# --- 9. signals: state saved, resume hint, nothing left, and --resume ends bit for bit ----------------------------

def leftovers(directory):
    return [name for name in os.listdir(directory) if name in (".staging", ".trash", ".global_worst.new")
            or (name.startswith(".") and ".tmp" in name)]


def resume(directory, timeout=900):
    return subprocess.run([sys.executable, "search.py", "--resume", directory], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **QUIET_ENV}, timeout=timeout)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_search_saves_state_and_resumes_bit_for_bit(reference, tmp_path, signum):
    """The process starts with SIGINT ignored (as under nohup): search.py installs its own handler all the same."""
    args = [sys.executable, "search.py", "-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
            "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model",
            "--output_root", str(tmp_path), "--seed", "7", *SEARCH_ARGS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **QUIET_ENV},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    # wait (bounded) until an iteration after the initial population runs: its staging folder .staging/<k>/ exists
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        staging = [os.path.join(tmp_path, name, ".staging") for name in os.listdir(tmp_path)]
        if any(os.path.isdir(os.path.join(folder, k)) for folder in staging for k in ("1", "2")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before its first iteration ran"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    directory = only_dir(tmp_path)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"interrupted ({signal.Signals(signum).name})" in lines[0]
    assert f"Resume with: python search.py --resume {directory}" in lines[0]
    assert leftovers(directory) == []
    resumed = resume(directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(reference, directory)


def test_worker_warnings_reach_the_log(tiny, data, tmp_path):
    """A warning logged inside a worker (the batch halving after a CUDA out-of-memory error, injected with
    BWR_OOM_ABOVE where a device short of memory would raise it) is written to log.txt, naming its task, and not
    to the worker's stderr."""
    proc = run_search(tmp_path, "-m", "1", "-p", "5", "--batch_size", "8", env={**QUIET_ENV, "BWR_OOM_ABOVE": "2"})
    log = open(os.path.join(only_dir(tmp_path), "log.txt")).read()
    halved = [line for line in log.splitlines() if "warning: CUDA out of memory on cpu" in line]
    # each worker halves once to 4 and once to 2, on its first task, then keeps batches of 2
    assert halved and len(halved) % 2 == 0, log
    assert sum(line.endswith("batch size lowered to 4") for line in halved) == len(halved) // 2, halved
    assert all(": warning: " in line and "candidate candidate_" in line for line in halved), halved
    assert "out of memory" not in proc.stderr  # the terminal gets it as a log.txt line (stdout), not from the worker


# --- 6. a full disk mid-search: one line naming the path, state consistent, nothing left, resume completes --------

def can_mount_tmpfs(path):
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {path}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("size_kib", [560])
def test_full_disk_mid_search_then_resume_on_a_larger_disk(reference, tmp_path, size_kib):
    """A real out-of-space (ENOSPC) on a small tmpfs, in a private mount namespace; then the same tmpfs grown and
    --resume: the result is the uninterrupted search's, bit for bit. Wherever the disk runs out (it depends on how
    many candidates are accepted), the promise is the same; a disk too small for the first candidates leaves
    nothing."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not shutil.which("unshare") or not can_mount_tmpfs(mount_point):
        pytest.skip("needs unshare and a tmpfs mount in a user namespace")
    saved = tmp_path / "saved"
    script = f"""
mount -t tmpfs -o size={size_kib}k tmpfs {mount_point} || exit 99
"$0" search.py -n t -e exact_match -d tiny_demo_quick -g cpu -i initial_experts/tiny/experts \
    -b initial_experts/tiny/base_model --output_root {mount_point}/out --seed 7 {" ".join(SEARCH_ARGS)} \
    > {tmp_path}/first.out 2> {tmp_path}/first.err
echo $? > {tmp_path}/first.rc
cp -a {mount_point}/out {saved}
mount -o remount,size=64m {mount_point}
for d in {mount_point}/out/*; do
    "$0" search.py --resume "$d" > {tmp_path}/resume.out 2> {tmp_path}/resume.err
    echo $? > {tmp_path}/resume.rc
done
cp -a {mount_point}/out {tmp_path}/after
"""
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, sys.executable],
                          cwd=REPO, env={**os.environ, **QUIET_ENV}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_rc = int((tmp_path / "first.rc").read_text())
    stderr = (tmp_path / "first.err").read_text()
    lines = stderr.strip().splitlines()
    assert first_rc == 1, (first_rc, stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "No space left on device" in lines[0] and str(mount_point) in lines[0], lines[0]
    if "removed)" in lines[0]:  # ran out before the first candidates were committed: nothing left behind
        assert os.listdir(saved) == []
        return
    directory = only_dir(saved)
    assert "Resume with: python search.py --resume" in lines[0]
    assert leftovers(directory) == []
    assert int((tmp_path / "resume.rc").read_text()) == 0, (tmp_path / "resume.err").read_text()[-3000:]
    same_result(reference, only_dir(tmp_path / "after"))


def test_full_disk_while_writing_the_final_records_then_resume(finished, tmp_path):
    """A search killed during its final evaluation is resumed under a 16 KiB file size limit: the evaluation
    finishes, the state is committed as done, and the 35 KB utility_curve.png cannot be written. One line names the
    file and the resume command; no temporary file is left; a resume without the limit writes the records, equal
    to the uninterrupted search's."""
    proc = run_search(tmp_path, "-m", "1", "-p", "5", env={"BWR_CRASH_AT": "evaluation:23"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    directory = only_dir(tmp_path)
    assert json.load(open(os.path.join(directory, "state.json")))["stage"] == "final"
    limited = subprocess.run(with_file_size_limit(16, [sys.executable, "search.py", "--resume", directory]), cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, **QUIET_ENV}, timeout=900)
    lines = limited.stderr.strip().splitlines()
    assert limited.returncode == 1 and len(lines) == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert f"cannot write {os.path.join(directory, 'utility_curve.png')}: File too large" in lines[0]
    assert f"Resume with: python search.py --resume {directory}" in lines[0]
    assert leftovers(directory) == [] and not os.path.exists(os.path.join(directory, "utility_curve.png"))
    assert json.load(open(os.path.join(directory, "state.json")))["stage"] == "done"
    resumed = resume(directory)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert os.path.getsize(os.path.join(directory, "utility_curve.png")) > 16 * 1024
    for name in ("final_metrics.json", "utility_scratchpad.json"):
        assert json.load(open(os.path.join(directory, name))) == json.load(open(os.path.join(finished, name)))
