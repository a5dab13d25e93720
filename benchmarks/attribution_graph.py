"""Attribution graphs on the default model: time against plain backward passes, exactness.

    python benchmarks/attribution_graph.py [--dictionary NAME=SAELENS_FOLDER ...]
        [--prompt TEXT] [--batch-size 64] [--rounds 5] [--threads 1] [--verify 20]

Without ``--dictionary`` two dictionaries are built from the model's own activations (the
principal directions of ``layers.{0,1}.resid_post`` on four texts and their negatives, TopK
k=16 of 256 — the tests' ``graph_dictionaries``); with it, SAELens folders are attached at their
``hook_name`` (e.g. ones written by ``benchmarks/train_dictionary.py``).

Timing: ``attribution_graph`` (the complete graph: a recording pass, one forward+backward pass
per ``batch_size`` targets, a pass with every input at zero) against the baseline of one plain
Hugging Face forward+backward pass over ``batch_size`` copies of the prompt, in interleaved
rounds (``benchmarks/_common.py``). Exactness: the largest completeness residual (a target
minus its row's sum and its bias, relative to the row's size), and the ``--verify`` largest
edges of the graph pruned at keep=0.8, each checked by ``verify_edge`` (an intervention on the
frozen model); sizes and kept fractions for several ``keep``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import Case, fix_threads, load_average, measure

import cloche
from cloche.dictionaries import DictionaryConfig, SparseDictionary
from cloche.experiments import attribution_graph

TEXTS = ["The little girl went to the park with her mother.",
         "Tom had a big red ball. He liked to play with it.",
         "One day, a cat found a box in the garden.",
         "She was happy because the sun was warm."]


def pca_dictionary(model: cloche.Model, point: str, k: int = 16) -> SparseDictionary:
    def keep(ctx, x):
        ctx.save("x", x)

    run = model.run(TEXTS, probes={point: keep}, save="bench-pca")
    x = model.save_context("bench-pca").fetch("x")[0]
    model.save_context("bench-pca").clear()
    acts = x[run.attention_mask.bool()].double()
    mean = acts.mean(0)
    vt = torch.linalg.svd(acts - mean, full_matrices=True)[2]
    w_dec = torch.cat([vt, -vt]).float()
    d = int(model.d_model)
    config = DictionaryConfig(d_in=d, d_sae=2 * d, architecture="topk", k=k, hook_name=point)
    return SparseDictionary(config, {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(2 * d),
                                     "W_dec": w_dec, "b_dec": mean.float()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Once upon a time, there was a little girl who")
    parser.add_argument("--dictionary", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verify", type=int, default=20)
    args = parser.parse_args()
    threads = fix_threads(args.threads)
    model = cloche.load()
    if args.dictionary:
        for item in args.dictionary:
            name, _, folder = item.partition("=")
            model.attach_dictionary(name, folder)
    else:
        for i in range(int(model.n_layers)):
            model.attach_dictionary(f"pca{i}", pca_dictionary(model, f"layers.{i}.resid_post"))

    started = time.perf_counter()
    graph = attribution_graph(model, args.prompt, batch_size=args.batch_size, progress=False)
    first = time.perf_counter() - started
    ids = model.tokenize(args.prompt)
    token = int(graph.target["token_id"])
    hf = model.hf_model
    batch = ids[None].expand(args.batch_size, -1).clone()

    def plain() -> None:
        hf.zero_grad(set_to_none=True)
        hf(batch).logits[:, -1, token].sum().backward()

    cases = [Case("plain HF forward+backward (batch of copies)", plain),
             Case("attribution_graph (complete graph)", lambda: attribution_graph(
                 model, args.prompt, batch_size=args.batch_size, progress=False))]
    base, full = measure(cases, rounds=args.rounds, warmup=1)
    passes = int(graph.info["backward_passes"])

    worst = 0.0
    for node_id, residual in graph.completeness().items():
        i = graph.index(node_id)
        node = graph.nodes[i]
        scale = float(np.abs(graph.adjacency[i]).sum()) + abs(node.bias or 0) + abs(node.value)
        worst = max(worst, abs(residual) / scale)
    pruned = graph.prune(0.8)
    checks = [graph.verify_edge(model, s, t) for s, t, _ in pruned.edges()[:args.verify]]
    sizes = []
    for keep in (0.5, 0.8, 0.9, 0.95):
        p = graph.prune(keep)
        sizes.append({"keep": keep, "nodes": len(p), "features": len(p.features()),
                      "edges": p.n_edges, "node_fraction": round(p.pruning["node_fraction"], 4),
                      "edge_fraction": round(p.pruning["edge_fraction"], 4),
                      "retained_fraction": round(p.pruning["retained_fraction"], 4)})
    report = {
        "model": model.name, "prompt": args.prompt, "tokens": len(graph.tokens),
        "dictionaries": {n: d["point"] for n, d in graph.dictionaries.items()},
        "target": graph.target, "threads": threads, "load_average": load_average(),
        "graph": {"nodes": len(graph), "features": len(graph.features()),
                  "edges": graph.n_edges, "backward_passes": passes,
                  "first_call_s": round(first, 3)},
        "time_s": {"graph_median": round(full.median(), 4),
                   "plain_forward_backward_median": round(base.median(), 4),
                   "ratio": round(full.median() / base.median(), 2),
                   "ratio_per_pass": round(full.median() / (passes + 2) / base.median(), 2)},
        "completeness_worst_relative": worst,
        "frozen_logit_minus_logit": graph.logit.value - graph.target["logit"],
        "verified_edges": len(checks),
        "verify_worst_relative_error": max((c.error for c in checks), default=None),
        "verify_median_relative_error": float(np.median([c.error for c in checks]))
        if checks else None,
        "pruning": sizes,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
