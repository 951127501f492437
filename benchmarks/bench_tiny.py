"""What does the reproducible tiny population cost?

  1. `expert_init.py --tiny` on the shipped population: hash-verify against initial_experts/tiny.sha256;
  2. the --quick build (1/20 of the steps) with the pinned kernels (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE,
     one thread: what every build runs) against the same recipe on this machine's own kernels (not reachable through
     the CLI, which always pins; run here through the recipe function only to price the pin);
  3. the published-experts download without a network: how fast it gives up.
Figures are printed; nothing is asserted. Each build runs alone (--repeats times, the median is printed), so on a
shared machine the figures move with the load.

    python benchmarks/bench_tiny.py [--repeats 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "initial_experts/expert_init.py"
sys.path.insert(0, str(REPO / "initial_experts"))
from expert_init import PINNED_KERNELS  # noqa: E402

UNPINNED_BUILD = ("import sys; sys.path.insert(0, 'initial_experts'); sys.path.insert(0, '.'); import expert_init; "
                  "from pathlib import Path; Path(sys.argv[1]).mkdir(); expert_init._build_into(Path(sys.argv[1]), 0, True, False)")


def timed(cmd, env=None):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if k not in PINNED_KERNELS}
    base_env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    verify = [timed([sys.executable, SCRIPT, "--tiny"], base_env) for _ in range(args.repeats)]
    print(f"verify the shipped population (--tiny): {statistics.median(verify):.2f} s")

    pinned, native = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            pinned.append(timed([sys.executable, SCRIPT, "--tiny", "--quick", "--out", f"{tmp}/p{i}"], base_env))
            # the same recipe on this machine's own kernels (one thread, as the build sets)
            native.append(timed([sys.executable, "-c", UNPINNED_BUILD, f"{tmp}/n{i}"], base_env))
    p, n = statistics.median(pinned), statistics.median(native)
    print(f"--quick build, pinned kernels: {p:.1f} s; this machine's own kernels: {n:.1f} s "
          f"(pinned/own {p / n:.2f}x); a full build has 20x the steps")

    with tempfile.TemporaryDirectory() as tmp:
        offline = dict(base_env, HF_ENDPOINT="http://127.0.0.1:9")
        offline.pop("HF_HUB_OFFLINE")
        start = time.perf_counter()
        subprocess.run([sys.executable, SCRIPT, "--out", tmp], cwd=REPO, env=offline, capture_output=True)
        print(f"published download with no network gives up after {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
