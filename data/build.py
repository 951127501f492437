"""Build every generated evaluation set into data/eval/ (what `make data` runs), or install the published ones.

    python data/build.py [--out DIR] [--seed 0]
    python data/build.py --published [--from DIR] [--out DIR]     # the published toolkit's 35 files (data/published.py)

Writes nlgraph.json (data/nlgraph.py, 200 dev / 1000 test), the tiny demo sets tiny_mc, tiny_mc_icl,
tiny_em, tiny_rm, tiny_human (data/tiny_data.py) and tiny_demo_quick.json: the first 100 dev and 240 test
questions of the demo objective tiny_demo, the same objective with a tenth of the forward work (quick runs, the
test suite). Each file is validated before it is written, and a file
whose bytes would not change is left alone, so running it twice does nothing the second time. The demo
objective tiny_demo has its own script (data/tiny_demo.py); benchmarks come from data/prepare_data.py.
An nlgraph.json that holds the published file (installed with --published) is kept: the generated one is written
only where no published one is.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import nlgraph, published, tiny_data, tiny_demo  # noqa: E402
from data.schema import DataError, validate  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "eval"
QUICK_DEV, QUICK_TEST = 100, 240  # tiny_demo_quick's share of tiny_demo's dev and test splits


def tiny_demo_quick(seed=0):
    """The first QUICK_DEV dev and QUICK_TEST test items of tiny_demo (same generator, same seed)."""
    full = tiny_demo.make_dataset(seed)
    return {"dataset": "tiny_demo_quick", "dev": full["dev"][:QUICK_DEV], "test": full["test"][:QUICK_TEST]}


def generated_sets(seed=0):
    """[(name, eval type it is validated for, data)] for every generated file."""
    sets = [("nlgraph", "exact_match", nlgraph.make_dataset(seed=seed))]
    sets += [(name, tiny_data.EVAL_TYPE[name], data) for name, data in tiny_data.make_all(seed).items()]
    sets += [("tiny_demo_quick", "exact_match", tiny_demo_quick(seed))]
    return sets


def build(out_dir=DEFAULT_OUT, seed=0):
    """Write the generated sets into out_dir; returns {name: "written" | "unchanged"}."""
    out_dir = Path(out_dir)
    status = {}
    for name, eval_type, data in generated_sets(seed):
        path = out_dir / f"{name}.json"
        validate(data, eval_type, path)
        if published.is_published_file(path):
            status[name] = "kept (the published file: data/build.py --published installed it)"
            continue
        status[name] = write_if_changed(data, path)
    return status


def write_if_changed(data, path):
    """Skip the write when the file already holds these bytes, so timestamps (and make) stay quiet."""
    if path.exists() and path.read_text(encoding="utf-8") == nlgraph.to_text(data):
        return "unchanged"
    nlgraph.write_json(data, path)
    return "written"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the generated evaluation sets (nlgraph + tiny demo sets), or "
                                             "install the published ones (--published).")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: data/eval)")
    ap.add_argument("--seed", type=int, default=0,
                    help="generator seed (default 0: the files recorded in initial_experts/tiny.sha256)")
    ap.add_argument("--published", action="store_true",
                    help=f"install the published toolkit's 35 evaluation files instead ({published.PUBLISHED_REPO} at "
                         f"{published.PUBLISHED_COMMIT[:7]}), each checked against data/published.sha256")
    ap.add_argument("--from", dest="source", metavar="DIR",
                    help="--published: install from a local copy of the published data/eval/ instead of GitHub")
    args = ap.parse_args(argv)
    if args.source is not None and not args.published:
        ap.error("--from goes with --published")
    if args.published and args.seed != 0:
        ap.error("--seed is for the generated sets; the published files are fixed")
    try:
        status = (published.install_published(args.out, args.source) if args.published
                  else build(args.out, args.seed))
    except published.PublishedDataError as e:
        print(f"data/build.py: {e}", file=sys.stderr)
        return e.exit_status
    except (DataError, ValueError, OSError) as e:
        print(f"data/build.py: {e}", file=sys.stderr)
        return 1
    for name, what in status.items():
        print(f"{Path(args.out) / (name + '.json')}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
