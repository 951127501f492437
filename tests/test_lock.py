"""One search directory, one process: a running search holds its directory's lock; a second search.py on it is
refused in one line and changes nothing; a killed holder's lock dies with it; --lock_wait waits for the holder."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import search
from conftest import REPO
from test_faults import QUIET_ENV, tree_digest
from test_reliability import SEARCH_ARGS, reference, same_result  # noqa: F401 - reference is a fixture
from test_search import only_dir, run_search

SEARCH = [sys.executable, "search.py", "-n", "t", "-e", "exact_match", "-d", "tiny_demo_quick", "-g", "cpu",
          "-i", "initial_experts/tiny/experts", "-b", "initial_experts/tiny/base_model", "--seed", "7", *SEARCH_ARGS]


def resume(directory, *extra):
    return subprocess.run([sys.executable, "search.py", "--resume", str(directory), *extra], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **QUIET_ENV}, timeout=600)


def one_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def wait_for_state(root, holder, timeout=300):
    """The holder's directory once its initial population is committed (state.json written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and holder.poll() is None:
        dirs = os.listdir(root) if os.path.isdir(root) else []
        if dirs and os.path.exists(os.path.join(root, dirs[0], "state.json")):
            return root / dirs[0]
        time.sleep(0.02)
    raise AssertionError(f"no state.json under {root} (holder exit status {holder.poll()})")


def test_a_held_directory_refuses_others_and_its_holder_ends_as_if_alone(reference, tmp_path):
    """The holder is paused (SIGSTOP) once its first state is on disk, so every other process meets it mid-search."""
    runs = tmp_path / "runs"
    holder = subprocess.Popen([*SEARCH, "--output_root", str(runs)], cwd=REPO, env={**os.environ, **QUIET_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    waiter = None
    try:
        directory = wait_for_state(runs, holder)
        os.kill(holder.pid, signal.SIGSTOP)
        before = tree_digest(directory)
        assert ".lock_holder.json" in before

        refused = resume(directory)
        assert refused.returncode == 2
        line = one_line(refused)
        assert f"{directory} is in use by search.py pid {holder.pid} on " in line and "--lock_wait" in line, line
        assert tree_digest(directory) == before

        started = time.monotonic()
        refused = resume(directory, "--lock_wait", "1")
        assert refused.returncode == 2 and time.monotonic() - started >= 1
        assert "(still, after waiting 1 s)" in one_line(refused)
        assert tree_digest(directory) == before

        # a new search with the same name and root gets a folder of its own
        run_search(runs, "-m", "1", "-p", "5")
        assert len(os.listdir(runs)) == 2
        assert tree_digest(directory) == before

        # waits for the holder to end, then proceeds (the search is done: it only confirms it)
        waiter = subprocess.Popen([sys.executable, "search.py", "--resume", str(directory), "--lock_wait", "600"],
                                  cwd=REPO, env={**os.environ, **QUIET_ENV}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert waiter.poll() is None
        os.kill(holder.pid, signal.SIGCONT)
        _, err = holder.communicate(timeout=600)
        assert holder.returncode == 0, err[-3000:]
        out, err = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, err[-3000:]
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.communicate()
    same_result(reference, directory)
    log = (directory / "log.txt").read_text()
    assert log.count("resuming search") == 1 and "took over" not in log
    assert not (directory / ".lock_holder.json").exists()  # released cleanly


def test_a_killed_holder_releases_its_directory_at_once(reference, tmp_path):
    proc = run_search(tmp_path, *SEARCH_ARGS, env={"BWR_CRASH_AT": "move:3"}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    directory = only_dir(tmp_path)
    dead = json.loads((directory / ".lock_holder.json").read_text())  # died holding it
    before = tree_digest(directory)
    refused = resume(directory, "--seed", "8")  # refused after taking the lock: gives the directory back as it was
    assert refused.returncode == 2 and "--resume cannot change --seed" in one_line(refused)
    assert tree_digest(directory) == before
    resumed = resume(directory)  # no --lock_wait: the lock went with the killed process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_result(reference, directory)
    log = (directory / "log.txt").read_text()
    assert f"took over {directory} from search.py pid {dead['pid']} on {dead['host']}" in log, log
    assert "killed or crashed" in log


def test_searches_started_together_never_share_a_folder(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: search.new_search_dir(str(tmp_path), "same"), range(8)))
    assert len(set(made)) == 8 and all(os.path.isdir(path) for path in made)
