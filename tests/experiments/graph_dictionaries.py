"""Dictionaries for the attribution-graph tests, built from the model's own activations.

A random dictionary leaves most of an activation in its error term, so its graphs are mostly
error nodes. These are ``topk`` dictionaries whose decoder rows are the principal directions of
the point's activations on a few texts, and their negatives (encoder = decoder transposed,
``b_dec`` = the mean): the top 16 of 256 features reconstruct most of an activation, and the
graph has feature-to-feature edges worth pruning to. Also random transcoders, which read an
MLP's input and write its output as circuit-tracer's do.
"""

from __future__ import annotations

import torch
from cloche.dictionaries import DictionaryConfig, SparseDictionary

TEXTS = ["The little girl went to the park with her mother.",
         "Tom had a big red ball. He liked to play with it.",
         "One day, a cat found a box in the garden.",
         "She was happy because the sun was warm."]


def _keep(ctx, x):
    ctx.save("x", x)


def pca_dictionary(model, point: str, k: int = 16) -> SparseDictionary:
    run = model.run(TEXTS, probes={point: _keep}, save="graph-pca")
    saved = model.save_context("graph-pca")
    try:
        x = saved.fetch("x")[0]
    finally:
        saved.clear()
    acts = x[run.attention_mask.bool()].double()
    mean = acts.mean(0)
    _, _, vt = torch.linalg.svd(acts - mean, full_matrices=True)
    w_dec = torch.cat([vt, -vt]).float()
    d = int(model.d_model)
    config = DictionaryConfig(d_in=d, d_sae=2 * d, architecture="topk", k=k, hook_name=point)
    return SparseDictionary(config, {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(2 * d),
                                     "W_dec": w_dec, "b_dec": mean.float()})


def random_transcoder(d: int, layer: int, seed: int, d_sae: int = 64) -> SparseDictionary:
    torch.manual_seed(seed)
    config = DictionaryConfig(d_in=d, d_sae=d_sae, architecture="transcoder", d_out=d,
                              hook_name=f"layers.{layer}.ln2",
                              hook_name_out=f"layers.{layer}.mlp.out")
    transcoder = SparseDictionary(config)
    with torch.no_grad():  # a scale at which a fair share of the features fire
        transcoder.W_enc.mul_(5.0)
        transcoder.b_enc.fill_(-0.5)
    return transcoder
