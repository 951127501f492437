"""Workers: where merges and evaluations run.

The search driver (search.py) never touches a model. It hands a list of tasks to a pool and gets one result per
task back, in order. A pool keeps one persistent worker per device; each worker holds the base model resident
(evaluate.get_host caches it) and its own in-memory copy of the population's adapters, so an iteration costs
merges in memory plus forward passes.

The interface another executor implements (see RayPool) is small:

    pool = LocalPool(devices, config)     # starts the workers
    results = pool.run(tasks)             # list[CandidateTask | EvaluateTask] -> list[dict], same order
    pool.close()

A task is a small frozen dataclass (below: Source, CandidateTask, EvaluateTask); it pickles unchanged across
process and machine boundaries. search.py builds candidate tasks in one place (Search.candidate_task), and
EvaluateTask(...) in initialise and finish.

A result is {"utility": float, "accepted": bool, "details": {...}, "timing": {...}} or {"error": str}.
"""

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import fileio
from fileio import atomic_write_text


class WorkerError(RuntimeError):
    """A worker died twice on the same task, or a task raised."""


# ----------------------------------------------------------------------------------------------------------------
# Tasks: what the driver sends to a worker.

class Source(NamedTuple):
    """One adapter (or full model) a candidate is merged from: path at version. Versions of a path only grow; a
    worker caches adapters by (path, version). read_from: the folder holding that version while path still holds
    the previous one (an update accepted in the current iteration stays in the staging folder until the commit)."""
    path: str
    version: int | None
    read_from: str | None = None


@dataclass(frozen=True)
class CandidateTask:
    """Build a candidate from sources with update (bwr.apply_update's {"kind": "combine"|"bounds"|...}), evaluate
    it on split, and write it to save_to only if it is accepted (bwr.accept: utility > accept_if_above, or any
    non-NaN utility when that is None). save_to is written without fsync: the driver syncs its staging folder
    before it commits. An accepted candidate stays in the worker's adapter cache as cache_as = (path, version), the
    member's next version. merge_method, when given, replaces the search's (the initial experts are taken as they
    are, with weighted_average)."""
    name: str
    sources: tuple[Source, ...]
    update: dict
    split: str = "dev"
    accept_if_above: float | None = None
    save_to: str | None = None
    cache_as: tuple[str, int] | None = None
    merge_method: str | None = None
    early_reject: "EarlyReject | None" = None


@dataclass(frozen=True)
class EarlyReject:
    """--early_reject for one greedy candidate task: score its items in order (bwr.rejection_order: item indices,
    with groups the sizes of its groups along it), chunk by chunk, and stop once bwr.cannot_win says it cannot be
    kept against member_scores (its member's per-item dev scores, in the split's order). alpha 0: exact; > 0:
    statistical at that level. integer_scores: the objective's scores are whole numbers (EvalType)."""
    alpha: float
    member_scores: tuple
    score_range: tuple
    order: tuple
    groups: tuple
    integer_scores: bool = False


@dataclass(frozen=True)
class EvaluateTask:
    """Evaluate a saved candidate (adapter or full-model folder at path, version as in Source) on split; write its
    per-item results as JSON to details_to when given."""
    path: str
    version: int | None
    split: str
    details_to: str | None = None


def describe_task(task):
    if isinstance(task, CandidateTask):
        return f"candidate {task.name}"
    return f"evaluation of {os.path.basename(task.path)} ({task.split})"


# ----------------------------------------------------------------------------------------------------------------
# What runs inside a worker process (or a Ray actor).

class TaskRunner:
    """Executes tasks on one device. Holds the base model (through evaluate's cache) and an adapter cache."""

    def __init__(self, device, config):
        import torch
        import evaluate
        self.device = device
        self.config = config
        if config.get("torch_threads"):
            torch.set_num_threads(config["torch_threads"])
        evaluate.configure(**config.get("evaluate_options", {}))
        self.adapters = {}  # path -> {version: (state dict, adapter config)}; read from disk once per version

    def preload(self):
        """The base model on this device and the libraries a candidate needs, ahead of the first task."""
        import evaluate
        import peft  # noqa: F401 - imported by the first adapter candidate otherwise
        evaluate.get_host(self.config["base_model"], self.device)

    def load(self, path, version, read_from=None):
        """Adapter at a given version. Versions only grow, so older cached versions of a path are dropped.
        read_from: where that version is on disk while path still holds the previous one (a candidate accepted in
        the current iteration stays in the staging folder until the commit); cached under path all the same."""
        import merge
        versions = self.adapters.setdefault(path, {})
        if version not in versions:
            versions[version] = merge.load_adapter(read_from or path)
        for old in [v for v in versions if v is not None and version is not None and v < version]:
            del versions[old]
        return versions[version]

    # Where adapters come from and where outputs go. A Ray actor overrides these three (RayPool): its adapters
    # come through the object store and its outputs go back to the driver, which owns the search directory.
    def is_adapter(self, path):
        return os.path.exists(os.path.join(path, "adapter_config.json"))

    def save_adapter(self, path, state, config):
        import merge
        # no fsync here: save_to is the search's staging folder, which the driver syncs in one go at its commit
        # (four fsyncs per accepted candidate cost about 14 ms on the development machine, next to a 100 ms
        # tiny-model evaluation)
        merge.save_adapter(path, state, config, durable=False)

    def write_text(self, path, text):
        atomic_write_text(path, text)

    def run(self, task):
        """Result of one task. Warnings our modules log while it runs (a batch halved after out-of-memory, items
        Perspective left unscored, unparseable judge replies) travel back in result["warnings"]: the driver writes
        them to log.txt, which a worker process never writes to."""
        with CollectedWarnings() as warned:
            result = self._run(task)
        if warned.messages:
            result["warnings"] = warned.messages
        return result

    def _run(self, task):
        if isinstance(task, CandidateTask):
            return self.candidate(task)
        if isinstance(task, EvaluateTask):
            return self.evaluate_saved(task)
        raise TypeError(f"unknown task {type(task).__name__}")

    def _evaluate(self, model, split, items=None):
        import evaluate
        cfg = self.config
        start = time.perf_counter()
        utility, details = evaluate.evaluate_split(model, cfg["eval_type"], cfg["dataset"], self.device,
                                                   cfg["base_model"], split, cfg.get("only_one_or_two"),
                                                   save=split == "test", items=items)
        return float(utility), details, time.perf_counter() - start

    def _evaluate_until_rejected(self, model, split, early):
        """--early_reject: (utility, details, seconds, {"dev_items": items scored, "rejected_early": bool}) of a
        candidate scored chunk by chunk in its rejection order. Rejected early: the partial mean and only the
        timing in details. Scored in full: the utility and details of one pass over the split, reassembled in the
        split's order (the items' scores are the same: they do not depend on which other items share a batch,
        tests/test_early_reject.py)."""
        import bwr
        n_items, order = len(early.member_scores), early.order
        chunks, seen, seconds, done = [], [], 0.0, 0
        low, high = early.score_range
        stop_args = (early.member_scores, high, low, early.alpha, early.groups, early.integer_scores)
        for end in bwr.early_reject_chunks(*stop_args):
            _, details, spent = self._evaluate(model, split, items=list(order[done:end]))
            chunks.append((order[done:end], details))
            seen += details["scores"]
            seconds, done = seconds + spent, end
            if end < n_items:
                crash_point("chunk", driver=True)
            if bwr.cannot_win(seen, *stop_args):
                partial = {"forward_seconds": sum(d["forward_seconds"] for _, d in chunks),
                           "swap_seconds": sum(d["swap_seconds"] for _, d in chunks)}
                return math.fsum(seen) / len(seen), partial, seconds, {"dev_items": done, "rejected_early": True}
        details = _reassemble(chunks, n_items)
        return details["utility"], details, seconds, {"dev_items": n_items, "rejected_early": False}

    def candidate(self, task):
        import bwr
        import merge
        timing = {}
        start = time.perf_counter()
        # a task may name its own method: the initial experts are taken as they are (weighted_average, weight 1)
        method = task.merge_method or self.config.get("merge_method", "weighted_average")
        params = None if task.merge_method else self.config.get("merge_params")
        if self.config.get("fast_merge", 1):
            sources, update = _used_sources(task.sources, task.update, method)
            loaded = [self.load(*source) for source in sources]
            states = [state for state, _ in loaded]
            names = [os.path.basename(source.path) for source in sources]
            try:
                state = bwr.apply_update(update, states, method, params, names)
            except merge.NonFiniteMergeError as e:
                # a non-finite merge is rejected, the candidate keeps its weights; other merge errors are fatal
                return {"utility": float("nan"), "accepted": False, "rejected": str(e), "timing": timing}
            model, adapter_config = state, loaded[0][1]
        else:
            # full models (--fast_merge 0): merged shard by shard on disk, evaluated from the folder
            update = task.update
            if update["kind"] != "combine":
                raise ValueError("--reset_mode bounds needs adapters (--fast_merge 1)")
            used = [(w, source.read_from or source.path) for w, source in zip(update["weights"], task.sources)
                    if w != 0.0]
            tmp = task.save_to + ".merging"
            merge.lora_merge([w for w, _ in used], [p for _, p in used], tmp, self.device, directly_load_safetensors=0,
                             merge_method=method, merge_params=params, seed=update.get("seed", 0))
            model, adapter_config = tmp, None
        timing["merge"] = time.perf_counter() - start

        scored = (model, adapter_config) if isinstance(model, dict) else model
        threshold, counts = task.accept_if_above, {}
        if task.early_reject is not None and threshold is not None:
            utility, details, seconds, counts = self._evaluate_until_rejected(scored, task.split, task.early_reject)
        else:
            utility, details, seconds = self._evaluate(scored, task.split)
        timing.update(_eval_timing(details, seconds))
        projection = project(model) if self.config.get("to_visualize") and isinstance(model, dict) else None
        accepted = not counts.get("rejected_early") and bwr.accept(math.nan if threshold is None else threshold,
                                                                   utility, greedy=threshold is not None)
        start = time.perf_counter()
        if accepted and task.save_to:
            if isinstance(model, dict):
                self.save_adapter(task.save_to, model, adapter_config)
                # the accepted candidate is the next version of that member: keep it, saving a re-read next time
                if task.cache_as:
                    path, version = task.cache_as
                    self.adapters.setdefault(path, {})[version] = (model, adapter_config)
            else:
                fileio.replace_dir(model, task.save_to)
        elif not isinstance(model, dict):
            shutil.rmtree(model, ignore_errors=True)
        timing["write"] = time.perf_counter() - start
        result = {"utility": utility, "accepted": accepted,
                  "details": None if counts.get("rejected_early") else details, "timing": timing, **counts}
        if projection is not None:
            result["projection"] = projection
        return result

    def evaluate_saved(self, task):
        path = task.path
        if self.is_adapter(path):
            model = self.load(path, task.version)
        else:
            model = path
        utility, details, seconds = self._evaluate(model, task.split)
        if task.details_to:
            self.write_text(task.details_to, json.dumps(details))
        return {"utility": utility, "accepted": True, "details": details, "timing": _eval_timing(details, seconds)}


class CollectedWarnings(logging.Handler):
    """Collects the WARNING records of the "bwr" loggers (evaluate.py's "bwr.evaluate") while it is installed.
    Records it handles do not also reach logging's last-resort handler (stderr)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("bwr").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("bwr").removeHandler(self)


def _used_sources(sources, update, method):
    """For a weighted average, members with coefficient 0 add exactly nothing (0 * x == 0 for finite x), so
    they are neither loaded nor summed. Other methods see every member (TIES elects signs over all of them).
    A "published" update (bwr.published_update) names the sources it reads: only those, its members renumbered."""
    if update["kind"] == "published":
        used = sorted(set(update["members"].values()))
        members = {role: used.index(j) for role, j in update["members"].items()}
        return [sources[j] for j in used], {**update, "members": members}
    if method != "weighted_average" or update["kind"] != "combine":
        return sources, update
    used = [j for j, w in enumerate(update["weights"]) if w != 0.0] or [0]
    return [sources[j] for j in used], {**update, "weights": [update["weights"][j] for j in used]}


_crash_counts = {}


def crash_point(name, driver=False):
    """Fault injection for the crash-safety tests: BWR_CRASH_AT=name:n SIGKILLs this process the n-th time it
    passes the named point, exactly like a power cut or the OOM killer would. driver: in a local worker, SIGKILL the
    driver (its parent) instead, in the middle of a task; the worker then dies with it (_die_with_the_driver)."""
    target = os.environ.get("BWR_CRASH_AT")
    if not target:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if target == f"{name}:{_crash_counts[name]}":
        os.kill(os.getppid() if driver else os.getpid(), signal.SIGKILL)
        time.sleep(60)  # a worker is killed meanwhile with its driver


def _reassemble(chunks, n_items):
    """One split's details from its chunks' ([indices], details): per-item lists put back in the split's order,
    counts and seconds summed, the utility the mean of the scores by score()'s own function (every objective that
    --early_reject accepts has the mean of its per-item scores as utility)."""
    import evaluate
    first = chunks[0][1]
    details = {}
    for key, value in first.items():
        if isinstance(value, list):
            merged = [None] * n_items
            for indices, chunk in chunks:
                for i, v in zip(indices, chunk[key]):
                    merged[i] = v
            details[key] = merged
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            details[key] = sum(chunk[key] for _, chunk in chunks)
        else:
            details[key] = value
    details["utility"] = evaluate._mean(details["scores"])
    return details


def project(state):
    """A fixed random 2-D projection of all of a candidate's weights, for any architecture: each tensor gets its own
    Gaussian directions seeded by its name, so every candidate is projected onto the same plane."""
    import zlib
    import torch
    point = torch.zeros(2, dtype=torch.float64)
    for name in sorted(state):
        flat = state[name].detach().to("cpu", torch.float64).reshape(-1)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        directions = torch.randn(2, flat.numel(), generator=generator, dtype=torch.float64)
        point += directions @ flat
    return [float(point[0]), float(point[1])]


def _eval_timing(details, seconds):
    forward = float(details.get("forward_seconds", 0.0)) if isinstance(details, dict) else 0.0
    swap = float(details.get("swap_seconds", 0.0)) if isinstance(details, dict) else 0.0
    return {"forward": forward, "swap": swap, "evaluate_other": max(seconds - forward - swap, 0.0)}


def _worker_main(device, config, conn):
    """Loop of a local worker process: receive a task, send back its result. Exceptions travel back as text."""
    import signal
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C reaches the whole process group; the driver decides when workers stop (it closes their pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_the_driver()
    # workers write nothing to the terminal: library warnings and loading progress bars say nothing a user of the
    # search can act on (the driver checked the inputs up front), and a failed search says why in one line on stderr
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars, twice per candidate (read when tqdm is imported)
    try:
        runner = TaskRunner(device, config)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which stops the search with it
        conn.send({"error": f"worker on {device} failed to start: {type(e).__name__}: {e}"})
        return
    conn.send({"ready": True})
    if config.get("preload"):
        # started while the driver still validates: load the base model now, so that the search's first task finds
        # it resident. A failure here is left to that task, which meets it again and reports it with its context
        try:
            runner.preload()
        except Exception:  # noqa: BLE001
            pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            _exit_at_once()
        try:
            result = runner.run(task)
        except KeyboardInterrupt:
            return
        except BaseException as e:  # noqa: BLE001
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        conn.send(result)


def _die_with_the_driver():
    """Linux: SIGKILL this worker the moment its driver dies. A driver killed with SIGKILL (or by the OOM killer)
    releases the search directory's lock at once; a worker left running would stage files into that directory after a
    --resume has taken it over. Started from the driver's main thread, so the signal follows the driver's life."""
    import ctypes
    import multiprocessing
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends when its pipe closes, after its current task
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the driver died before the signal was asked for
        os._exit(1)


def _exit_at_once():
    """A worker told to stop has nothing left to save: its results went back through the pipe and the files its
    tasks wrote are closed. Interpreter teardown with torch, transformers and peft loaded takes about a second, which
    the driver's close() would wait for at the end of every search, so the worker leaves without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------------
# The dispatch loop both executors share.

class Pool:
    """One task per worker at a time, results in task order; a worker that dies is restarted and its task retried
    once, a second death on the same task stops with WorkerError naming task, device and cause, and a task that
    raised stops with its error. An executor says only how a task reaches a worker and how a result comes back:

        _begin(tasks) -> tasks             the tasks as this executor sends them (Ray: absolute paths)
        _send(slot, task)                  hand a task to worker slot
        _finished(busy) -> [(slot, message or None, cause)]
                                           workers of busy ({slot: task index}) that are done; message None: the
                                           worker died (cause says how), else its result or {"error": ...}
        _restart(slot)                     replace a dead worker
    A subclass also sets devices (one per worker slot) and log (where a restart is reported).
    """

    def _begin(self, tasks):
        return tasks

    def run(self, tasks, on_result=None):
        """Runs tasks over all workers; returns their results in task order. on_result(index, result) is called as
        each one arrives."""
        tasks = self._begin(tasks)
        results = [None] * len(tasks)
        pending = list(range(len(tasks)))[::-1]
        attempts = [0] * len(tasks)
        busy = {}  # slot -> index of the task it runs
        while pending or busy:
            for slot in range(len(self.devices)):
                if slot not in busy and pending:
                    index = pending.pop()
                    attempts[index] += 1
                    self._send(slot, tasks[index])
                    busy[slot] = index
            for slot, message, cause in self._finished(busy):
                index = busy.pop(slot)
                task, device = tasks[index], self.devices[slot]
                if message is None:
                    if attempts[index] >= 2:
                        raise WorkerError(f"worker on device {device} died twice on {describe_task(task)} ({cause})")
                    self.log(f"worker on device {device} died on {describe_task(task)} ({cause}); "
                             f"restarting it and retrying once")
                    self._restart(slot)
                    pending.append(index)
                    continue
                if "error" in message:
                    raise WorkerError(f"{describe_task(task)} on device {device} failed: {message['error']}")
                results[index] = message
                if on_result is not None:
                    on_result(index, message)
        return results


# ----------------------------------------------------------------------------------------------------------------
# The local executor: one persistent process per device.

class LocalPool(Pool):
    """One persistent worker process per device (a GPU id, or "cpu" once per CPU worker)."""

    start_timeout = 600.0  # seconds to load a base model; a 7B model from a slow disk can take minutes
    poll_interval = 0.5

    def __init__(self, devices, config, log=print, wait=True):
        """wait=False returns as soon as the processes are spawned: the driver goes on validating while they import
        torch and (config["preload"]) load the base model; the first run() waits for them."""
        self.devices = list(devices)
        self.config = config
        self.log = log
        self.ctx = mp.get_context("spawn")  # fork would copy the driver's threads and CUDA state
        self.workers = [None] * len(self.devices)
        self.starting = True
        try:
            for slot in range(len(self.devices)):
                self._start(slot)
            if wait:
                self._begin([])
        except BaseException:
            self.close()
            raise

    def _begin(self, tasks):
        if self.starting:
            for slot in range(len(self.devices)):
                self._wait_ready(slot)
            self.starting = False
        return tasks

    def _start(self, slot):
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=_worker_main, args=(self.devices[slot], self.config, child), daemon=True)
        process.start()
        child.close()
        self.workers[slot] = (process, parent)

    def _wait_ready(self, slot):
        process, conn = self.workers[slot]
        message = self._receive(slot, self.start_timeout)
        if message is None:
            raise WorkerError(f"worker on device {self.devices[slot]} died while starting "
                              f"(exit code {process.exitcode})")
        if "error" in message:
            raise WorkerError(message["error"])

    def pids(self):
        return [process.pid for process, _ in self.workers]

    def _receive(self, slot, timeout=None):
        """Next message from a worker, or None if it died. Polls so that a dead worker is noticed in seconds."""
        process, conn = self.workers[slot]
        waited = 0.0
        while True:
            try:
                if conn.poll(self.poll_interval):
                    return conn.recv()
            except (EOFError, OSError):
                return None
            if not process.is_alive():
                try:  # it may have answered just before dying
                    if conn.poll(0):
                        return conn.recv()
                except (EOFError, OSError):
                    pass
                return None
            waited += self.poll_interval
            if timeout is not None and waited >= timeout:
                return None

    def _restart(self, slot):
        process, conn = self.workers[slot]
        if process.is_alive():
            process.kill()
        process.join(5)
        conn.close()
        self._start(slot)
        self._wait_ready(slot)

    def _send(self, slot, task):
        try:
            self.workers[slot][1].send(task)
        except (BrokenPipeError, OSError):
            pass  # noticed as a death by _finished

    def _finished(self, busy):
        done = []
        for slot in busy:
            process, conn = self.workers[slot]
            try:
                ready = conn.poll(0.05)
            except (EOFError, OSError):
                ready = False
            if not ready and process.is_alive():
                continue
            message = self._receive(slot, timeout=0) if ready or not process.is_alive() else None
            if message is None:
                # the closed pipe can be seen a moment before the killed process can be reaped: wait for its
                # exit code rather than report a live worker that "stopped answering"
                process.join(1)
            done.append((slot, message, None if message is not None else _exit_cause(process.exitcode)))
        return done

    def kill(self):
        """Stop every worker at once (the search did not start: nothing of theirs is worth waiting for)."""
        for entry in self.workers:
            if entry is not None:
                entry[0].kill()
        for entry in self.workers:
            if entry is not None:
                entry[0].join(5)
                entry[1].close()
        self.workers = [None] * len(self.devices)

    def close(self):
        for entry in self.workers:
            if entry is None:
                continue
            process, conn = entry
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for entry in self.workers:
            if entry is None:
                continue
            process, conn = entry
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self.workers = [None] * len(self.devices)


def _exit_cause(exitcode):
    import signal
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " - likely out of memory" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


# ----------------------------------------------------------------------------------------------------------------
# The Ray executor: one actor per device, anywhere on a Ray cluster.
#
# The search directory exists on the driver's machine only. So the driver reads every adapter a task needs and puts
# it into Ray's object store once per (path, version); actors receive references, merge and evaluate with the very
# same TaskRunner code as local workers, and hand the accepted candidate's tensors and the per-item details back
# instead of writing them; the driver writes them. Full models (--fast_merge 0) are merged and read through their
# paths, which therefore must exist on every node (a shared filesystem).

class _ShippedRunner(TaskRunner):
    """A TaskRunner whose adapters arrive as object references and whose outputs are collected, not written."""

    def __init__(self, device, config):
        super().__init__(device, config)
        self.shipped = {}   # path -> (object id, (state, config)): one version per path, like TaskRunner.load
        self.refs = {}      # (path, version) -> object reference, for the task being run
        self.outputs = {}

    def is_adapter(self, path):
        return any(p == path for p, _ in self.refs)

    def preload(self):
        """The base model on this device and the libraries a candidate needs, ahead of the first task."""
        import evaluate
        import peft  # noqa: F401 - imported by the first adapter candidate otherwise
        evaluate.get_host(self.config["base_model"], self.device)

    def load(self, path, version, read_from=None):
        import ray
        ref = self.refs.get((path, version))  # the driver read it (from read_from if need be) and shipped it
        if ref is None:
            raise RuntimeError(f"the driver did not ship adapter {path} (version {version})")
        # keyed by object id rather than version: the driver decides which object a (path, version) is
        cached = self.shipped.get(path)
        if cached is None or cached[0] != ref.hex():
            self.shipped[path] = (ref.hex(), ray.get(ref))
        return self.shipped[path][1]

    def save_adapter(self, path, state, config):
        # on the CPU and contiguous, exactly as merge.save_adapter writes it, so a GPU actor's tensors unpickle on a
        # driver without a GPU and the driver's file is byte-identical to a local worker's
        self.outputs["adapter"] = ({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, config)

    def write_text(self, path, text):
        self.outputs["text"] = text

    def run_shipped(self, task, shipped):
        self.refs = {(path, version): ref for path, version, ref in shipped}
        self.outputs = {}
        try:
            result = self.run(task)
        finally:
            self.refs = {}
            # TaskRunner keeps accepted candidates under task.cache_as; here the driver's references are the
            # cache, so that copy would only hold memory
            self.adapters.clear()
        return result, self.outputs


def _actor_gpu_index():
    """torch's index of the GPU Ray assigned to this actor. Ray normally sets CUDA_VISIBLE_DEVICES to that one GPU,
    so it is cuda:0; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES the actor sees all GPUs of its node and the
    assigned id has to be looked up among the visible ones."""
    import ray
    gpu = str(ray.get_gpu_ids()[0])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        return visible.index(gpu) if gpu in visible else 0
    return int(gpu)


class _RayWorker:
    """The actor: one TaskRunner (base model resident) per device. Errors travel back as text, as from a local
    worker, so both pools report them with the same messages."""

    def __init__(self, device, config):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.error = None
        try:
            self.device = "cpu" if device == "cpu" else _actor_gpu_index()
            self.runner = _ShippedRunner(self.device, config)
        except BaseException as e:  # noqa: BLE001 - reported by ready(), which the driver waits for
            self.error = f"worker on {device} failed to start: {type(e).__name__}: {e}"

    def ready(self):
        import socket
        import ray
        if self.error:
            return {"error": self.error}
        return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "device": self.device}

    def run(self, task, shipped):
        try:
            return self.runner.run_shipped(task, shipped)
        except BaseException as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, {}


class RayPool(Pool):
    """One Ray actor per device: -g 0,1,... asks for that many GPU actors (num_gpus=1 each; Ray picks the GPUs,
    on any node), -g cpu for --num_cpu_workers CPU actors (num_cpus=1 each). Same interface and messages as
    LocalPool; results are bit-identical to it because the merges and evaluations are TaskRunner's own."""

    start_timeout = LocalPool.start_timeout
    wait_interval = 0.5  # ray.wait slices, so that Ctrl-C and SIGTERM are handled promptly

    def __init__(self, devices, config, log=print, address=None):
        try:
            import ray
        except ImportError as e:
            raise WorkerError(f"--backend ray needs Ray: pip install 'ray[default]' ({e})") from None
        self.ray = ray
        self.devices = list(devices)
        self.config = config
        self.log = log
        self.actors = [None] * len(self.devices)
        self.in_flight = {}
        self.actor_class = None
        self.store = {}  # path -> {version: (object reference, read from disk?)}
        self.owns_ray = False
        try:
            self._connect(address)
            for slot in range(len(self.devices)):
                self.actors[slot] = self._spawn(slot)
            for slot in range(len(self.devices)):
                self._wait_ready(slot)
        except BaseException:
            self.close()
            raise

    # -- the cluster
    def _connect(self, address):
        import signal
        import threading
        ray = self.ray
        if ray.is_initialized():
            self.log("using the Ray instance this process already joined")
            self._check_resources(ray.cluster_resources())
            return
        starts_local = _resolves_to_new_instance(address)
        kwargs = {"include_dashboard": False, "logging_level": "WARNING"}
        if starts_local:
            # a local instance gets exactly one CPU per actor (or RAY_NUM_CPUS), not the whole machine
            cpus = os.environ.get("RAY_NUM_CPUS") or str(len(self.devices))
            if not cpus.isdigit():
                raise WorkerError(f"RAY_NUM_CPUS={cpus!r} must be a whole number of CPUs")
            kwargs["num_cpus"] = int(cpus)
        else:
            # other nodes need not have this checkout: the code travels with the job (.gitignore'd files stay)
            repo = os.path.dirname(os.path.abspath(__file__))
            kwargs["runtime_env"] = {"working_dir": repo, "excludes": [".git", ".venv", "search", "wandb"]}
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds here; the search reports one line
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = " (set RAY_AUTH_MODE=token and copy the cluster's ~/.ray/auth_token)" if "auth" in str(e).lower() \
                else ""
            raise WorkerError(f"cannot {'start' if starts_local else 'join'} Ray"
                              f"{'' if starts_local else ' at ' + str(address or 'RAY_ADDRESS')}: "
                              f"{type(e).__name__}: {text}{hint}") from None
        self.owns_ray = True
        if main_thread and previous is not None:
            # ray.init makes SIGTERM exit at once; the search turns it into a clean stop between commits
            signal.signal(signal.SIGTERM, previous)
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = "a new local Ray instance" if starts_local else f"the Ray cluster at {address or 'RAY_ADDRESS'}"
        self.log(f"using {where}: {len(nodes)} node(s), {resources.get('CPU', 0):g} CPU, "
                 f"{resources.get('GPU', 0):g} GPU, {resources.get('object_store_memory', 0) / 2 ** 30:.1f} GiB "
                 f"object store")
        self._check_resources(resources)

    def _check_resources(self, resources):
        gpu_actors = sum(1 for d in self.devices if d != "cpu")
        if gpu_actors > resources.get("GPU", 0):
            raise WorkerError(f"-g asks for {gpu_actors} GPU worker(s) but the Ray cluster has "
                              f"{resources.get('GPU', 0):g} GPU(s)")
        if len(self.devices) > resources.get("CPU", 0):
            raise WorkerError(f"{len(self.devices)} Ray worker(s) need one CPU each but the Ray cluster has "
                              f"{resources.get('CPU', 0):g} CPU(s) (RAY_NUM_CPUS sets a local instance's count)")

    def _spawn(self, slot):
        device = self.devices[slot]
        # the pool restarts dead actors itself, so that a task is retried once and exactly once
        options = {"num_cpus": 1, "max_restarts": 0, "max_task_retries": 0}
        if device != "cpu":
            options["num_gpus"] = 1
        if self.actor_class is None:
            self.actor_class = self.ray.remote(_RayWorker)
        return self.actor_class.options(**options).remote(device, self.config)

    def _wait_ready(self, slot):
        ray = self.ray
        ref = self.actors[slot].ready.remote()
        ready, _ = ray.wait([ref], timeout=self.start_timeout)
        if not ready:
            raise WorkerError(f"worker on device {self.devices[slot]} could not be placed or started within "
                              f"{self.start_timeout:.0f} s (are the cluster's CPUs/GPUs taken?)")
        try:
            message = ray.get(ref)
        except _death_errors(ray) as e:
            raise WorkerError(f"worker on device {self.devices[slot]} died while starting ({_ray_cause(e)})") from None
        if "error" in message:
            raise WorkerError(message["error"])
        gpus = f", GPU {','.join(message['gpus'])}" if message["gpus"] else ""
        self.log(f"Ray worker {slot} ({self.devices[slot]}) on {message['host']}, pid {message['pid']}{gpus}")

    def pids(self):
        return [self.ray.get(actor.ready.remote())["pid"] for actor in self.actors]

    def _restart(self, slot):
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        self.actors[slot] = self._spawn(slot)
        self._wait_ready(slot)

    # -- adapters through the object store
    def _ref(self, path, version, read_from=None):
        """Object reference of the adapter at path, read (from read_from if given, see TaskRunner.load) and put once
        per version; older versions are dropped."""
        import merge
        versions = self.store.setdefault(path, {})
        if version is None or version not in versions:
            ref = self.ray.put(merge.load_adapter(read_from or path))
            if version is None:
                return ref  # no version, no caching: the folder may change under the same name
            versions[version] = (ref, True)
        for old in [v for v in versions if v < version]:
            del versions[old]
        return versions[version][0]

    def _forget_vanished(self):
        """Adapters read from folders that no longer exist (the previous iteration's staging) are dropped."""
        for path in list(self.store):
            versions = self.store[path]
            for version in [v for v, (_, from_disk) in versions.items() if from_disk and not os.path.isdir(path)]:
                del versions[version]
            if not versions:
                del self.store[path]

    def _shipped(self, task):
        """[path, version, reference] of every adapter the task reads; full-model paths stay paths."""
        if isinstance(task, CandidateTask) and self.config.get("fast_merge", 1):
            method = task.merge_method or self.config.get("merge_method", "weighted_average")
            sources, _ = _used_sources(task.sources, task.update, method)
            return [[source.path, source.version, self._ref(*source)] for source in sources]
        if isinstance(task, EvaluateTask) and os.path.exists(os.path.join(task.path, "adapter_config.json")):
            return [[task.path, task.version, self._ref(task.path, task.version)]]
        return []

    def _deliver(self, task, result, outputs):
        """Write what a local worker would have written, on the driver's filesystem."""
        import merge
        start = time.perf_counter()
        if "adapter" in outputs and task.save_to:
            state, adapter_config = outputs["adapter"]
            merge.save_adapter(task.save_to, state, adapter_config, durable=False)  # synced at the commit
            if task.cache_as:
                path, version = task.cache_as
                # the accepted candidate is that member's next version; put from the driver, so that it outlives
                # the node that computed it
                self.store.setdefault(path, {})[version] = (self.ray.put((state, adapter_config)), False)
        if "text" in outputs and task.details_to:
            atomic_write_text(task.details_to, outputs["text"])
        timing = result.setdefault("timing", {})
        timing["write"] = timing.get("write", 0.0) + time.perf_counter() - start

    # -- the dispatch loop's side (Pool.run)
    def _begin(self, tasks):
        self._forget_vanished()
        self.in_flight = {}  # slot -> (result reference, outputs reference, task)
        return [_absolute_paths(task) for task in tasks]

    def _send(self, slot, task):
        self.in_flight[slot] = (*self.actors[slot].run.options(num_returns=2).remote(task, self._shipped(task)), task)

    def _finished(self, busy):
        """Waits up to wait_interval (so that Ctrl-C and SIGTERM are handled promptly) for one actor's result."""
        ray = self.ray
        slot_of = {self.in_flight[slot][0]: slot for slot in busy}
        done, _ = ray.wait(list(slot_of), num_returns=1, timeout=self.wait_interval)
        finished = []
        for ref in done:
            slot = slot_of[ref]
            _, outputs_ref, task = self.in_flight.pop(slot)
            try:
                message = ray.get(ref)
                outputs = ray.get(outputs_ref) if "error" not in message else {}
            except _death_errors(ray) as e:
                finished.append((slot, None, _ray_cause(e)))
                continue
            except ray.exceptions.RayError as e:
                finished.append((slot, {"error": _ray_cause(e)}, None))
                continue
            if "error" not in message:
                self._deliver(task, message, outputs)
            finished.append((slot, message, None))
        return finished

    def close(self):
        ray = getattr(self, "ray", None)
        if ray is None:
            return
        for actor in self.actors:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead, or the cluster is gone
                    pass
        self.actors = [None] * len(self.devices)
        self.store = {}
        if self.owns_ray and ray.is_initialized():
            # stops the local instance this pool started; on a cluster it only disconnects this driver
            ray.shutdown()
        self.owns_ray = False


def _absolute_paths(task):
    """The task with its paths made absolute: they name the adapters in the object store, and full-model paths
    are opened by actors whose working directory is not the driver's (Ray unpacks the code elsewhere)."""
    def absolute(path):
        return path and os.path.abspath(path)
    if isinstance(task, EvaluateTask):
        return replace(task, path=absolute(task.path), details_to=absolute(task.details_to))
    return replace(task, sources=tuple(Source(absolute(s.path), s.version, absolute(s.read_from)) for s in task.sources),
                   save_to=absolute(task.save_to),
                   cache_as=task.cache_as and (absolute(task.cache_as[0]), task.cache_as[1]))


def _resolves_to_new_instance(address):
    """Whether ray.init(address) would start a new local instance rather than join a running one: "local", or no
    address while neither RAY_ADDRESS nor a `ray start` cluster on this machine is found (Ray's own rule)."""
    if address == "local":
        return True
    if address is not None:
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address
        return canonicalize_bootstrap_address(None) is None
    except ImportError:  # the private helper moved: decide on what Ray documents
        return not os.environ.get("RAY_ADDRESS")


def _death_errors(ray):
    """Exceptions meaning the actor's process (or its node) is gone, rather than the task failing."""
    errors = [ray.exceptions.RayActorError]
    for name in ("OutOfMemoryError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError"):
        if hasattr(ray.exceptions, name):
            errors.append(getattr(ray.exceptions, name))
    return tuple(errors)


def _ray_cause(error):
    """One line for a Ray exception, e.g. "ActorDiedError: ... Worker exit detail: ...", without Ray's hints."""
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, BaseException):
        cause = None
    text = str(cause if cause is not None else error)
    detail = ""
    marker = "Worker exit detail:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split(". ")[0].strip().rstrip(".")
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    name = type(cause if cause is not None else error).__name__
    return f"{name}: {detail or first}"
