"""Shared fixtures: the default tiny population and the tiny_demo objective, built for real on first use."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_cli(args, timeout=900, env=None, cwd=REPO):
    """Run a repository script as a real subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([PYTHON, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def only_dir(root):
    """The one search directory a test's search made under root."""
    dirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    assert len(dirs) == 1, dirs
    return Path(root) / dirs[0]


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def tiny_population():
    """The shipped initial_experts/tiny (seed 0): base_model/, experts/<10>/, reward_model/.

    Verified by the real CLI against initial_experts/tiny.sha256 (a second); a changed population fails here.
    """
    proc = run_cli(["initial_experts/expert_init.py", "--tiny"])
    if proc.returncode != 0:
        pytest.fail(f"tiny population check failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return REPO / "initial_experts" / "tiny"


@pytest.fixture(scope="session")
def tiny_demo_path():
    """data/eval/tiny_demo.json for the default seed, (re)written only if missing or different."""
    from data.tiny_demo import make_dataset

    path = REPO / "data" / "eval" / "tiny_demo.json"
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = None
    if current != make_dataset(0):
        proc = run_cli(["data/tiny_demo.py", "--seed", "0", "--out", path], timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"tiny_demo.py failed: {proc.stderr}")
    return path


@pytest.fixture(scope="session")
def tiny(tiny_population):
    """Paths of the default tiny population: .base, .experts, .reward."""
    return SimpleNamespace(base=tiny_population / "base_model", experts=tiny_population / "experts",
                           reward=tiny_population / "reward_model")


@pytest.fixture(scope="session")
def data(tiny_demo_path):
    """data/eval with every generated set (data/build.py leaves unchanged files alone; its tiny_demo_quick is what
    the tests' searches use) plus tiny_demo."""
    proc = run_cli(["data/build.py"], timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"data/build.py failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return Path(tiny_demo_path).parent


@pytest.fixture(scope="module")
def three_experts(tiny, tmp_path_factory):
    """Three of the tiny experts, one per operation (a small population keeps each search short)."""
    folder = tmp_path_factory.mktemp("experts")
    for name in ("max_a", "fst_b", "snd_c"):
        os.symlink(tiny.experts / name, folder / name)
    return folder
