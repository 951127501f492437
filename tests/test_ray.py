"""The Ray backend (--backend ray): a real local Ray instance with real actors, compared bit for bit with the local
backend on the tiny population. Each search starts its own Ray instance (--ray_address local), limited to 2 CPUs."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from test_search import only_dir, run_search

SEARCH = ("-m", "2", "-p", "5", "--num_cpu_workers", "2")
RAY = ("--backend", "ray", "--ray_address", "local")
RAY_ENV = {"RAY_NUM_CPUS": "2"}
ACTOR = "ray::_RayWorker"


def outputs(directory):
    """What must not depend on the backend: the scratchpad, the final metrics and the best adapter's bytes."""
    with open(os.path.join(directory, "utility_scratchpad.json")) as f:
        pad = json.load(f)
    with open(os.path.join(directory, "final_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(directory, "global_best", "adapter_model.safetensors"), "rb") as f:
        best = f.read()
    return pad, metrics, best


def log_of(directory):
    with open(os.path.join(directory, "log.txt")) as f:
        return f.read()


@pytest.fixture(scope="module")
def local_outputs(tiny, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    run_search(root, *SEARCH)
    return outputs(only_dir(root))


def test_ray_backend_matches_local_backend(local_outputs, tmp_path):
    run_search(tmp_path, *SEARCH, *RAY, env=RAY_ENV)
    directory = only_dir(tmp_path)
    pad, metrics, best = outputs(directory)
    assert pad == local_outputs[0]
    assert metrics == local_outputs[1]
    assert best == local_outputs[2]
    log = log_of(directory)
    assert "using a new local Ray instance: 1 node(s), 2 CPU" in log
    assert log.count("Ray worker ") == 2
    # every adapter was written by the driver: no worker-side temp folders, no half-written candidates
    assert [name for name in os.listdir(directory) if name.startswith(".")] == [".lock"]


def _actor_processes(root_pid):
    found = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if ACTOR in " ".join(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _wait_for(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"search ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_ray_backend_survives_a_killed_actor(local_outputs, tmp_path):
    args = [sys.executable, "search.py", "-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
            "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model",
            "--output_root", str(tmp_path), "--seed", "7", *SEARCH, *RAY]
    env = {**os.environ, "WANDB_MODE": "disabled", **RAY_ENV}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def started():
            dirs = os.listdir(tmp_path)
            if len(dirs) != 1 or not os.path.exists(os.path.join(tmp_path, dirs[0], "log.txt")):
                return None
            return "starting best" in log_of(os.path.join(tmp_path, dirs[0]))
        _wait_for(started, proc, 300, "the first iteration")
        # the first iteration is running: SIGKILL one actor, as the OOM killer or a lost node would
        victims = _wait_for(lambda: _actor_processes(proc.pid), proc, 30, "the actor processes")
        victim = victims[0]
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    directory = only_dir(tmp_path)
    log = log_of(directory)
    assert "worker on device cpu died on " in log and "restarting it and retrying once" in log, log
    assert log.count("Ray worker ") == 3  # two at the start, one replacement
    assert outputs(directory) == local_outputs
    # the Ray instance the search started (raylet, GCS, actors) ends with it
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_search_runs_without_ray_installed(tiny, data, tmp_path):
    """Ray is imported only by RayPool: with it unimportable, the local backend works and RayPool says why it
    cannot start. A sitecustomize makes `import ray` fail in the driver and in every worker process."""
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    check = subprocess.run([sys.executable, "-c", """
import search, workers
try:
    workers.RayPool(["cpu"], {})
except workers.WorkerError as e:
    print(e)
import ray
"""], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert "--backend ray needs Ray: pip install 'ray[default]'" in check.stdout, check.stderr
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr
    # initialisation and final evaluation only: every kind of task, on local workers
    run_search(tmp_path / "local", "-m", "0", "--num_cpu_workers", "2", env=env)
    assert os.path.exists(os.path.join(only_dir(tmp_path / "local"), "final_metrics.json"))


@pytest.mark.parametrize("flags", [("--optimizer", "pso"), ("--rule", "published_code", "-p", "4"),
                                   ("--early_reject", "0.01")],
                         ids=["pso", "published_rule", "early_reject"])
def test_ray_backend_matches_local_backend_for_pso(flags, tiny, data, tmp_path):
    """A non-BWR optimizer (candidates merged from the initial experts) on Ray: the same bytes as locally; and
    BWR's published-code rule, whose sources include global_best/ and global_worst/ (-p 4: iteration 2 restarts)."""
    args = (*SEARCH, *flags)
    run_search(tmp_path / "local", *args)
    run_search(tmp_path / "ray", *args, *RAY, env=RAY_ENV)
    assert outputs(only_dir(tmp_path / "ray")) == outputs(only_dir(tmp_path / "local"))


def test_ray_driver_killed_then_resumed_ends_like_local(local_outputs, tmp_path):
    """SIGKILL of the driver mid-commit: its directory lock goes with it, and --resume (on Ray again: --backend is
    recorded) proceeds at once and ends with the local backend's bytes."""
    proc = run_search(tmp_path, *SEARCH, *RAY, env={**RAY_ENV, "BWR_CRASH_AT": "before_commit:3"}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    directory = only_dir(tmp_path)
    resumed = subprocess.run([sys.executable, "search.py", "--resume", str(directory)], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "WANDB_MODE": "disabled", **RAY_ENV}, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(directory) == local_outputs
    log = log_of(directory)
    assert "took over" in log and "killed or crashed" in log
    assert log.count("using a new local Ray instance") == 2
