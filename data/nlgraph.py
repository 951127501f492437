"""NLGraph-style graph reasoning items (exact match), generated and checked by real graph algorithms.

Two tasks, in equal numbers and shuffled together:

    connectivity    an undirected graph as adjacency lines; "is there a path between node a and node b?"
                    answer "Yes" / "No", balanced, found by breadth-first search
    shortest_path   a weighted undirected graph; "how long is the shortest path from a to b?"
                    answer the length as a string (a and b are always connected), found by Dijkstra

    python data/nlgraph.py [--out data/eval/nlgraph.json] [--dev 200] [--test 1000] [--seed 0]
                           [--min_nodes 5] [--max_nodes 20] [--edge_prob 0.3] [--max_weight 10]

The same arguments always write the same bytes. No question appears twice across dev and test.
"""

import argparse
import heapq
import json
import os
import random
import sys
from collections import deque
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("connectivity", "shortest_path")
DEFAULTS = {"dev": 200, "test": 1000, "seed": 0, "min_nodes": 5, "max_nodes": 20, "edge_prob": 0.3,
            "max_weight": 10}
DEFAULT_OUT = Path(__file__).resolve().parent / "eval" / "nlgraph.json"

CONNECTIVITY_INTRO = ("An undirected graph is described below, one line per node with its neighbours. "
                      "Decide whether two of its nodes are joined by a path.")
CONNECTIVITY_ASK = "Q: Is there a path between node {a} and node {b}?\nAnswer with Yes or No only:"
SHORTEST_INTRO = ("An undirected graph with weighted edges is described below, one line per node with its "
                  "neighbours and the weight of each edge.")
SHORTEST_ASK = ("Q: What is the length of the shortest path between node {a} and node {b}?\n"
                "Answer with the length of the shortest path only:")


# ---------------------------------------------------------------- graphs and algorithms

def random_graph(rng, n, p, max_weight=None, groups=1):
    """Edges {(u, v): weight} over nodes 0..n-1, u < v. With groups > 1 the nodes are split into that many
    groups and edges only join nodes of one group, so the graph has at least `groups` components."""
    nodes = list(range(n))
    rng.shuffle(nodes)
    group_of = {node: i % groups for i, node in enumerate(nodes)}
    edges = {}
    for u in range(n):
        for v in range(u + 1, n):
            if group_of[u] == group_of[v] and rng.random() < p:
                edges[(u, v)] = rng.randint(1, max_weight) if max_weight else 1
    return edges


def adjacency(n, edges):
    adj = {u: {} for u in range(n)}
    for (u, v), w in edges.items():
        adj[u][v] = w
        adj[v][u] = w
    return adj


def bfs_reachable(adj, source):
    seen = {source}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                queue.append(v)
    return seen


def dijkstra(adj, source):
    """Shortest distances from source to every reachable node."""
    dist = {source: 0}
    heap = [(0, source)]
    while heap:
        d, u = heapq.heappop(heap)
        if d > dist[u]:
            continue
        for v, w in adj[u].items():
            if d + w < dist.get(v, float("inf")):
                dist[v] = d + w
                heapq.heappush(heap, (d + w, v))
    return dist


# ---------------------------------------------------------------- wording

def describe(adj, weighted):
    lines = []
    for u in sorted(adj):
        if not adj[u]:
            lines.append(f"Node {u} is not connected to any node.")
        elif weighted:
            lines.append(f"Node {u} is connected to " +
                         ", ".join(f"node {v} with weight {w}" for v, w in sorted(adj[u].items())) + ".")
        else:
            lines.append(f"Node {u} is connected to " + ", ".join(str(v) for v in sorted(adj[u])) + ".")
    return "\n".join(lines)


def connectivity_item(rng, answer_yes, min_nodes, max_nodes, p):
    """A connectivity question whose BFS answer is the requested one (graphs are redrawn until it fits)."""
    while True:
        n = rng.randint(min_nodes, max_nodes)
        # "No" needs a disconnected graph; splitting the nodes into groups gives one without making every
        # "No" question a lone isolated node
        groups = 1 if answer_yes else rng.randint(2, 3)
        adj = adjacency(n, random_graph(rng, n, p, groups=groups))
        a = rng.randrange(n)
        reach = bfs_reachable(adj, a)
        pool = [b for b in range(n) if b != a and (b in reach) == answer_yes]
        if answer_yes:
            # a listed neighbour makes the question a lookup; prefer pairs that need a real path
            far = [b for b in pool if b not in adj[a]]
            pool = far or pool
        if not pool:
            continue
        b = rng.choice(pool)
        answer = "Yes" if b in bfs_reachable(adj, a) else "No"
        question = "\n".join([CONNECTIVITY_INTRO, describe(adj, weighted=False),
                              CONNECTIVITY_ASK.format(a=a, b=b)])
        return {"question": question, "answer": answer, "domain": "connectivity"}


def shortest_path_item(rng, min_nodes, max_nodes, p, max_weight):
    while True:
        n = rng.randint(min_nodes, max_nodes)
        adj = adjacency(n, random_graph(rng, n, p, max_weight=max_weight))
        a = rng.randrange(n)
        dist = dijkstra(adj, a)
        pool = [b for b in dist if b != a and b not in adj[a]] or [b for b in dist if b != a]
        if not pool:
            continue
        b = rng.choice(sorted(pool))
        question = "\n".join([SHORTEST_INTRO, describe(adj, weighted=True), SHORTEST_ASK.format(a=a, b=b)])
        return {"question": question, "answer": str(dist[b]), "domain": "shortest_path"}


# ---------------------------------------------------------------- dataset

def make_dataset(dev=200, test=1000, seed=0, min_nodes=5, max_nodes=20, edge_prob=0.3, max_weight=10):
    """{"dataset": "nlgraph", "dev": [...], "test": [...]}: half connectivity (Yes/No balanced), half
    shortest_path, shuffled; ids unique over both splits; no question repeated."""
    if not 2 <= min_nodes <= max_nodes:
        raise ValueError(f"need 2 <= min_nodes <= max_nodes, got {min_nodes}..{max_nodes}")
    if not 0 < edge_prob <= 1:
        raise ValueError(f"edge_prob must be in (0, 1], got {edge_prob}")
    if max_weight < 1:
        raise ValueError(f"max_weight must be at least 1, got {max_weight}")
    if dev < 1 or test < 1:
        raise ValueError(f"dev and test must be at least 1, got {dev} and {test}")
    rng = random.Random(seed)
    seen = set()
    data = {"dataset": "nlgraph"}
    next_id = 0
    for split, size in (("dev", dev), ("test", test)):
        n_conn = (size + 1) // 2
        # alternate Yes/No so each split is balanced whatever its size
        plan = [("connectivity", i % 2 == 0) for i in range(n_conn)] + [("shortest_path", None)] * (size - n_conn)
        items = []
        for task, yes in plan:
            for _ in range(1000):
                if task == "connectivity":
                    item = connectivity_item(rng, yes, min_nodes, max_nodes, edge_prob)
                else:
                    item = shortest_path_item(rng, min_nodes, max_nodes, edge_prob, max_weight)
                if item["question"] not in seen:
                    break
            else:
                raise ValueError(f"could not draw {size} distinct {task} questions with {min_nodes}..{max_nodes} "
                                 f"nodes; widen the node range")
            seen.add(item["question"])
            items.append(item)
        rng.shuffle(items)
        for item in items:
            item["id"] = next_id
            next_id += 1
        data[split] = [{"question": it["question"], "answer": it["answer"], "id": it["id"],
                        "domain": it["domain"]} for it in items]
    return data


def to_text(data):
    """The file layout every generated set uses, so identical data gives identical bytes."""
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def write_json(data, out):
    """Atomic write (temp file + rename): a reader never sees half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_text(data))
    os.replace(tmp, out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate NLGraph-style connectivity and shortest-path items.")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output JSON file (default: data/eval/nlgraph.json)")
    ap.add_argument("--dev", type=int, default=DEFAULTS["dev"], help="dev items (default 200)")
    ap.add_argument("--test", type=int, default=DEFAULTS["test"], help="test items (default 1000)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--min_nodes", type=int, default=DEFAULTS["min_nodes"])
    ap.add_argument("--max_nodes", type=int, default=DEFAULTS["max_nodes"])
    ap.add_argument("--edge_prob", type=float, default=DEFAULTS["edge_prob"], help="edge probability per node pair")
    ap.add_argument("--max_weight", type=int, default=DEFAULTS["max_weight"], help="shortest_path weights 1..this")
    args = ap.parse_args(argv)
    try:
        data = make_dataset(args.dev, args.test, args.seed, args.min_nodes, args.max_nodes, args.edge_prob,
                            args.max_weight)
    except ValueError as e:
        ap.error(str(e))
    from data.schema import validate
    out = Path(args.out)
    validate(data, "exact_match", out)
    write_json(data, out)
    print(f"{out}: {len(data['dev'])} dev / {len(data['test'])} test items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
