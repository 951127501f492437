"""What a search writes beside its state, all derived from the state and the final evaluation's results: the
scratchpad, correctness_emergence.json, the final metrics (paired gains over the starting best, the top-k
ensembles, the published metric names), the published toolkit's result files, and the plots. Pure functions over
the state (search.py's dict) apart from the writers; search.py calls them at each commit and at the end."""
import argparse
import json
import math
import os

from data.schema import EVAL_TYPES
from fileio import atomic_write, atomic_write_text, read_json, read_json_object, write_json


# ----------------------------------------------------------------------------------------------------------------
# Records rewritten at every commit, and the end of a search

def scratchpad(state):
    """utility_scratchpad.json: derived from the state, so it is identical however often the search resumed.
    The published keys with the published shapes (best, worst: numbers; history: the global best after each
    iteration, the initial population's first; candidate_i: number; candidate_i_history: list), plus
    worst_history and iteration."""
    pad = {"best": state["best"]["utility"], "worst": state["worst"]["utility"],
           "history": state["history"]["best"], "worst_history": state["history"]["worst"],
           "iteration": state["iteration"]}
    for i, c in enumerate(state["candidates"]):
        pad[f"candidate_{i}"] = c["utility"]
        pad[f"candidate_{i}_history"] = c["history"]
    return pad


def correctness_emergence(state):
    """correctness_emergence.json in the published shape: {"<i>": [per-item dev scores of candidate i at iteration
    0, 1, ...]} (1/0 correctness for accuracy objectives). The state records a candidate's row only when its
    weights change (at iteration 0, when an update is accepted, when it restarts); other iterations repeat it."""
    n = len(state["candidates"])
    rows, current = {str(i): [] for i in range(n)}, [None] * n
    for k in range(state["iteration"] + 1):
        recorded = state["emergence"].get(str(k), {})
        for i in range(n):
            current[i] = recorded.get(f"candidate_{i}", current[i])
            rows[str(i)].append(current[i])
    return rows


def final_metrics(state, args, results):
    """(final_metrics.json's metrics, the published "final metrics for test" dict, its "final ensemble metrics for
    dev" dict) from the results of final_tasks."""
    s, n = state, len(state["candidates"])
    test, dev = results[:n], results[n:2 * n]
    best_dev, best_test = results[2 * n], results[2 * n + 1]
    metrics = {
        "starting_best_validation_utility": s["starting_best"]["utility"],
        "starting_best_single_test_accuracy": s["starting_best"]["test_utility"],
        "ending_best_validation_utility": s["best"]["utility"],
        "ending_best_single_test_accuracy": best_test["utility"],
        "ending_best_validation_utility_reevaluated": best_dev["utility"],
        "starting_best_expert": s["starting_best"]["expert"],
        "ending_best_candidate": f"candidate_{s['best']['candidate']}",
        "ending_best_origin": best_origin(s),
        "iterations": s["iteration"],
        "optimizer": args.optimizer,
        "dev_evaluations": s["evaluations"],
    }
    if args.early_reject is not None:  # dev items the iterations' proposals were scored on
        metrics["dev_items_evaluated"] = sum(p.get("dev_items", 0) for p in s["profile"])
        metrics["dev_items_full_evaluation"] = sum(p.get("dev_items_full", 0) for p in s["profile"])
    # the gain of the ending global best over the starting best, paired item by item
    start = s["starting_best"]
    for split, before, result in (("test", start.get("test_scores"), best_test),
                                  ("dev", start.get("dev_scores"), best_dev)):
        gain = paired_gain(before, (result.get("details") or {}).get("scores"),
                           start["test_utility" if split == "test" else "utility"], result["utility"])
        if gain is not None:
            metrics[f"{split}_gain_over_starting_best"] = gain["gain"]
            metrics[f"{split}_gain_paired_se"] = gain["se"]
            metrics[f"{split}_gain_items"] = gain["items"]
    metrics.update(ensembles([r.get("details") for r in test], [c["utility"] for c in s["candidates"]],
                             args.eval_type))
    for i, r in enumerate(test):
        metrics[f"candidate_{i}_test_utility"] = r["utility"]
    published, published_dev = published_metrics(s, args.eval_type, [r.get("details") for r in test],
                                                  [r.get("details") for r in dev], best_dev, best_test)
    metrics.update(published)
    metrics.update(published_dev)
    return metrics, published, published_dev


def log_final_metrics(log, metrics, published, published_dev):
    """The summary of the final metrics in log.txt, and the published lines for scripts written for its log.txt."""
    for key in ("starting_best_validation_utility", "starting_best_single_test_accuracy",
                "ending_best_validation_utility", "ending_best_single_test_accuracy"):
        log(f"{key}: {metrics[key]:.4f}")
    for split in ("test", "dev"):
        if f"{split}_gain_over_starting_best" in metrics:
            log(f"{split} gain of the ending best over the starting best: "
                f"{metrics[f'{split}_gain_over_starting_best']:+.4f} ± {metrics[f'{split}_gain_paired_se']:.4f} "
                f"(paired SE, {metrics[f'{split}_gain_items']} items)")
        else:
            log(f"{split} gain: no paired statistics (this objective's utility is not a mean of per-item scores)")
    log(f"dev evaluations: {metrics['dev_evaluations']} ({metrics['optimizer']})")
    for key, value in metrics.items():
        if (key.startswith("top") and "ensemble" in key) or key.startswith("ending_best_single_dev_") or \
                (key.startswith("ending_best_single_test_") and key != "ending_best_single_test_accuracy"):
            log(f"{key}: {value:.4f}")
    log("final metrics for test: " + str(published))
    log("final ensemble metrics for dev: " + str(published_dev))


def write_records(directory, state, args):
    """The files derived from a finished search's state: rewritten by a resume of a finished search, so a fault
    while they were written (a full disk) is repaired by --resume."""
    write_json(os.path.join(directory, "final_metrics.json"), state["final_metrics"])
    write_json(os.path.join(directory, "utility_scratchpad.json"), scratchpad(state))
    if args.correctness_emergence:
        atomic_write_text(os.path.join(directory, "correctness_emergence.json"),
                          json.dumps(correctness_emergence(state)))
    write_published_layout(directory, len(state["candidates"]), args.eval_type)
    plot(state, directory, args.to_visualize)


# ----------------------------------------------------------------------------------------------------------------
# The published toolkit's result files beside ours, so that scripts written for its search directories read ours

PUBLISHED_LINKS = {"best": "global_best", "worst": "global_worst"}  # its folder names -> ours (same meaning)


def published_result_files(details, eval_type, split):
    """{file name: values} the published evaluate.py writes for one evaluation, from our per-item details
    (golds_preds_<split>.json): on the test split golds.json and preds.json (the option letters; "Z" where no
    answer was read) for the objectives its overall_metrics votes on, scores.json (the per-item scores; 0/1 integers
    for exact match) for the others; on the dev split the same names with _dev."""
    suffix = "" if split == "test" else "_dev"
    if EVAL_TYPES[eval_type].published_vote:
        return {f"golds{suffix}.json": details["golds"],
                f"preds{suffix}.json": ["Z" if p is None else p for p in details["preds"]]}
    scores = details["scores"]
    if eval_type == "exact_match":
        scores = [int(v) for v in scores]
    return {f"scores{suffix}.json": scores}


def published_args_text(recorded, directory):
    """args.txt as the published search.py writes it, str() of its argparse Namespace; here of args.json's values
    (typed as parsed; every flag of ours) with name the search directory's, as the published code sets it."""
    values = {key: value for key, value in recorded.items() if key != "args_sha256"}
    values["name"] = os.path.basename(os.path.normpath(directory))
    return str(argparse.Namespace(**values))


def write_published_layout(directory, n_candidates, eval_type):
    """args.txt, best/ and worst/ (relative links to global_best/ and global_worst/, when that folder exists) and
    each evaluated folder's published result files, all derived from files already in the directory: rewriting
    them gives the same bytes (a resume of a finished search repairs them)."""
    atomic_write_text(os.path.join(directory, "args.txt"),
                      published_args_text(read_json(os.path.join(directory, "args.json")), directory))
    for folder in [f"candidate_{i}" for i in range(n_candidates)] + ["global_best"]:
        for split in ("test", "dev"):
            details, problem = read_json_object(os.path.join(directory, folder, f"golds_preds_{split}.json"))
            if problem is None:
                for name, values in published_result_files(details, eval_type, split).items():
                    atomic_write_text(os.path.join(directory, folder, name), json.dumps(values), durable=False)
    for link, target in PUBLISHED_LINKS.items():
        path = os.path.join(directory, link)
        if os.path.exists(path) and not os.path.islink(path):
            continue  # a folder of the user's: left alone
        if not os.path.isdir(os.path.join(directory, target)):
            if os.path.islink(path):
                os.remove(path)  # worst/ after --clean_up_on_end 1 removed global_worst/, as published
        elif not os.path.islink(path) or os.readlink(path) != target:
            tmp = os.path.join(directory, f".{link}.tmp{os.getpid()}")
            os.symlink(target, tmp)
            os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Ensembles, paired gains and plots

def compact_details(details):
    """Per-item results of a population, kept in the state: golds once, preds and scores per candidate."""
    if not details or any(not isinstance(d, dict) for d in details):
        return None
    return {"golds": details[0].get("golds"), "preds": [d.get("preds") for d in details],
            "scores": [d.get("scores") for d in details]}


def population_ensemble(compact, eval_type):
    """The published overall_metrics ensemble of a whole population ("top-k" there is every candidate): a majority
    vote of the predictions (ties: the prediction met first, in candidate order) for the eval types whose
    EVAL_TYPES row has published_vote (multiple_choice, AbstainQA and multitask; for multitask the published code
    writes 0); the mean per-item score for every other objective. None when per-item results are missing."""
    if not compact:
        return None
    if EVAL_TYPES[eval_type].published_vote:
        golds, preds = compact["golds"], compact["preds"]
        if not golds or any(p is None or len(p) != len(golds) for p in preds):
            return None
        correct = 0
        for j, gold in enumerate(golds):
            votes = {}
            for p in preds:
                votes[p[j]] = votes.get(p[j], 0) + 1
            correct += max(votes, key=votes.get) == gold
        return correct / len(golds)
    scores = compact["scores"]
    if any(sc is None or len(sc) != len(scores[0]) for sc in scores) or not scores[0]:
        return None
    per_item = [sum(float(sc[j]) for sc in scores) / len(scores) for j in range(len(scores[0]))]
    return sum(per_item) / len(per_item)


def published_metrics(state, eval_type, test_details, dev_details, best_dev, best_test):
    """The two dicts the published search.py logs at the end ("final metrics for test", "final ensemble metrics
    for dev"), with its key names. Values: the seed README's (the best initial expert and the global best); the
    starting test ensemble needs --starting_test_set_eval 1 (None otherwise); multitask adds each dataset's
    figure of the global best, on test and dev."""
    s = state
    starting = s.get("starting_details") or {}
    final_utilities = [c["utility"] for c in s["candidates"]]
    on_validation = next((i for i, u in enumerate(final_utilities) if u == s["best"]["utility"]), -1)
    test = {
        "starting_best_validation_utility": s["starting_best"]["utility"],
        "ending_best_validation_utility": s["best"]["utility"],
        "starting_best_single_test_accuracy": s["starting_best"]["test_utility"],
        "ending_best_single_test_accuracy": best_test["utility"],
        "starting_top-k_ensemble_test_accuracy": population_ensemble(starting.get("test"), eval_type),
        "ending_top-k_ensemble_test_accuracy": population_ensemble(compact_details(test_details), eval_type),
        "ending_best_candidate_on_validation": on_validation,
    }
    for split, result in (("test", best_test), ("dev", best_dev)):
        for name, part in ((result.get("details") or {}).get("parts") or {}).items():
            test[f"ending_best_single_{split}_{name}"] = part["accuracy"] if "accuracy" in part else part["utility"]
    dev = {
        "starting_top-k_ensemble_dev_accuracy": population_ensemble(starting.get("dev"), eval_type),
        "ending_top-k_ensemble_dev_accuracy": population_ensemble(compact_details(dev_details), eval_type),
    }
    return test, dev


def best_origin(state):
    """Where the global best came from: its candidate and iteration, and whether that candidate has moved since
    (its weights as they were are in global_best/)."""
    best = state["best"]
    text = f"candidate_{best['candidate']} at iteration {best['iteration']}"
    now = state["candidates"][best["candidate"]]
    if "version" in best and now["version"] != best["version"]:
        text += f" (candidate_{best['candidate']} has moved since: dev {now['utility']:.4f} now; global_best/ " \
                f"holds the weights found then)"
    return text


def paired_gain(before, after, utility_before=None, utility_after=None):
    """Mean per-item difference after - before and its paired standard error std(differences, ddof=1)/sqrt(n).

    None when there are no per-item scores, their counts differ, or (when the utilities are given) a utility is
    not the mean of its per-item scores (the harmonic mean of a multitask domain is not): the gain would then not
    be the utility's."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return None
    for scores, utility in ((before, utility_before), (after, utility_after)):
        if utility is not None and not math.isclose(sum(scores) / len(scores), utility, rel_tol=1e-9, abs_tol=1e-9):
            return None
    diffs = [float(b) - float(a) for a, b in zip(before, after)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"gain": mean, "se": math.sqrt(var / n), "items": n}


def ensembles(details, dev_utilities, eval_type):
    """Top-k ensembles of the final candidates (ranked by dev utility) on the test set: majority vote of
    predictions where items have a gold answer (EVAL_TYPES row with vote), mean of per-item scores otherwise."""
    out = {}
    order = sorted(range(len(dev_utilities)), key=lambda i: (-dev_utilities[i], i))
    if not details or any(not isinstance(d, dict) for d in details):
        return out
    for k in (3, 5, 10):
        if k > len(order):
            break
        members = [details[i] for i in order[:k]]
        golds = members[0].get("golds")
        preds = [m.get("preds") for m in members]
        # a None gold: this evaluation has none to vote towards (lm_eval tasks whose metric is not per-item accuracy)
        if golds and None not in golds and all(p is not None and len(p) == len(golds) for p in preds) and \
                EVAL_TYPES[eval_type].vote:
            correct = 0
            for item, gold in enumerate(golds):
                votes = {}
                for rank, p in enumerate(preds):
                    votes.setdefault(str(p[item]), [0, rank])[0] += 1
                # ties go to the higher-ranked candidate's prediction
                winner = max(votes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0]
                correct += int(winner.strip().lower() == str(gold).strip().lower())
            out[f"top{k}_ensemble_test_accuracy"] = correct / len(golds)
        else:
            scores = [m.get("scores") for m in members]
            if all(sc is not None for sc in scores) and scores[0]:
                per_item = [sum(float(sc[j]) for sc in scores) / k for j in range(len(scores[0]))]
                out[f"top{k}_ensemble_test_utility"] = sum(per_item) / len(per_item)
    return out


def plot(state, directory, to_visualize):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(state["candidates"]):
        ax.plot(range(len(c["history"])), c["history"], color="grey", alpha=0.35, linewidth=0.8,
                label="candidates" if i == 0 else None)
    iterations = range(len(state["history"]["best"]))  # entry 0 is the initial population
    ax.plot(iterations, state["history"]["best"], color="tab:green", linewidth=2, label="global best")
    ax.plot(iterations, state["history"]["worst"], color="tab:red", linewidth=2, label="worst")
    ax.set_xlabel("iteration")
    ax.set_ylabel("dev utility")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, os.path.join(directory, "utility_curve.png"))
    if to_visualize:
        fig, ax = plt.subplots(figsize=(5, 5))
        for i, c in enumerate(state["candidates"]):
            if c.get("trajectory"):
                xs, ys = zip(*c["trajectory"])
                ax.plot(xs, ys, marker=".", linewidth=0.8, label=f"candidate_{i}")
        ax.set_title("candidate trajectories (random 2-D projection of the weights)")
        fig.tight_layout()
        save_figure(fig, os.path.join(directory, "trajectory.png"))


def save_figure(fig, path):
    """Written as every file of a search directory is: a temporary file renamed into place."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), durable=False)
    finally:
        plt.close(fig)
