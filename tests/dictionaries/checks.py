"""What an attached dictionary must do, written once and run on local, remote and sharded models.

Every check compares two runs made where the model runs (so bitwise comparisons never cross a
process boundary): a run through the dictionary's points and the same computation written out by
hand in a probe at the base point.
"""

from __future__ import annotations

import cloche
import torch
from cloche.dictionaries import DictionaryConfig, SparseDictionary

EDITED = slice(0, 20)  # the features a test edit zeroes


def make_dictionary(d_in: int, architecture: str = "topk", seed: int = 0,
                    hook_name: str | None = None) -> SparseDictionary:
    torch.manual_seed(seed)
    config = DictionaryConfig(d_in=d_in, d_sae=4 * d_in, architecture=architecture,
                              k=8 if architecture == "topk" else None, hook_name=hook_name)
    sae = SparseDictionary(config)
    with torch.no_grad():  # weights at a scale where features fire
        sae.W_enc.mul_(10.0)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae


def keep(ctx, x):
    ctx.save(ctx.point, x)


def zero_some(ctx, x):
    x[..., EDITED] = 0  # an edit in place


def reads_are_bit_identical(model: cloche.Model, name: str, inputs) -> None:
    plain = model.run(inputs).logits
    probes = {f"dict:{name}:{part}": keep for part in ("features", "reconstruction", "error")}
    read = model.run(inputs, probes=probes, save="dict-reads").logits
    assert torch.equal(plain, read)
    saved = model.save_context("dict-reads")
    features = saved.fetch(f"dict:{name}:features")
    recon = saved.fetch(f"dict:{name}:reconstruction")
    error = saved.fetch(f"dict:{name}:error")
    assert features.shape[-1] == model.dictionaries()[name]["d_dict"]
    assert recon.shape == error.shape and recon.shape[:-1] == features.shape[:-1]
    saved.clear()


def edit_matches_manual(model: cloche.Model, name: str, sae: SparseDictionary, inputs) -> None:
    """Zeroing features = decode(edited features) + (x - decode(features)), then the model."""
    point = model.dictionaries()[name]["point"]

    def by_hand(ctx, x):
        features = sae.encode(x)
        error = x - sae.decode(features, x).to(x.dtype)
        edited = features.clone()
        edited[..., EDITED] = 0
        return sae.decode(edited, x).to(x.dtype) + error

    edited = model.run(inputs, probes={f"dict:{name}:features": zero_some}).logits
    manual = model.run(inputs, probes={point: by_hand}).logits
    assert torch.equal(edited, manual)
    assert not torch.equal(edited, model.run(inputs).logits)  # the edit did change the run


def splice_and_error_edits(model: cloche.Model, name: str, sae: SparseDictionary, inputs) -> None:
    """Zeroing the error splices the reconstruction in; a replaced reconstruction is used."""
    point = model.dictionaries()[name]["point"]
    spliced = model.run(inputs, probes={f"dict:{name}:error":
                                        lambda c, e: torch.zeros_like(e)}).logits
    manual = model.run(inputs, probes={point: lambda c, x: sae.decode(sae.encode(x), x)
                                       .to(x.dtype) + torch.zeros_like(x)}).logits
    assert torch.equal(spliced, manual)


def reducers_on_features(model: cloche.Model, name: str, texts: list[str]) -> None:
    """A TopK reducer per feature over a dataset agrees with the features themselves."""
    point = f"dict:{name}:features"

    def top(ctx, x):
        ctx.reduce("top", x, cloche.TopK(2))
        real = ctx.attention_mask.bool()[..., None]  # padding is no example
        ctx.save("f", x.masked_fill(~real, float("-inf")).amax(dim=1))

    out = model.run_dataset(texts, probes={point: top}, save="dict-top", batch_size=2,
                            progress=None)
    best = out["reducers"]["top"]["values"][0]
    per_example = model.save_context("dict-top").fetch("f", mode="cat")
    torch.testing.assert_close(best, per_example.amax(dim=0).double())
    model.save_context("dict-top").clear()
