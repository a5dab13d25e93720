"""Activation statistics and dimensionality reduction, computed where the activations are.

``mean`` / ``covariance`` run the Mean / Covariance reducers inside ``run_dataset``; ``pca``
diagonalises the exact covariance over every token of the dataset (not a sample), so only a
d×d matrix crosses the network. ``sample`` draws a fixed-size uniform sample of token
activations on the server (keys that depend only on example id and position, kept in
``ctx.state``: the same sample whatever the batching), which is what ``umap`` embeds.
``project`` sends the PCA basis to the server and brings back only the projections.

Points with per-head shapes (``attn.z``: batch, seq, head, d_head) are flattened to
(batch, seq, head * d_head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import reports, scratch, to_numpy

__all__ = ["PCA", "Sample", "covariance", "mean", "pca", "pca_from_covariance", "project", "sample",
           "umap", "variance"]


def _stat_probe(reducer_kind: str) -> Any:
    def stat_probe(ctx: Any, x: torch.Tensor) -> None:
        from cloche import Covariance, Mean, Variance

        reducer = Mean() if reducer_kind == "mean" else (
            Variance() if reducer_kind == "variance" else Covariance())
        ctx.reduce("stat", x.flatten(2), reducer)

    return stat_probe


def _statistic(model: Any, point: str, dataset: Any, kind: str, batch_size: int,
               limit: int | None, progress: Any) -> dict[str, np.ndarray]:
    point = model.resolve(point)
    with scratch(model, kind) as name:
        out = model.run_dataset(dataset, probes={point: _stat_probe(kind)}, save=name,
                                batch_size=batch_size, limit=limit, progress=progress)
    if "stat" not in out["reducers"]:
        raise UsageError(f"the dataset produced no activations at {point!r}")
    return {k: to_numpy(v) for k, v in out["reducers"]["stat"].items()}


@reports
def mean(model: Any, point: str, dataset: Any, *, batch_size: int = 8, limit: int | None = None,
         progress: Any = True) -> np.ndarray:
    """Mean activation (d,) of ``point`` over every real token of ``dataset`` (float64)."""
    return _statistic(model, point, dataset, "mean", batch_size, limit, progress)["mean"]


@reports
def variance(model: Any, point: str, dataset: Any, *, batch_size: int = 8,
             limit: int | None = None, progress: Any = True) -> dict[str, np.ndarray]:
    """``count``, ``mean``, ``var``, ``std`` of every unit over ``dataset``."""
    return _statistic(model, point, dataset, "variance", batch_size, limit, progress)


@reports
def covariance(model: Any, point: str, dataset: Any, *, batch_size: int = 8,
               limit: int | None = None, progress: Any = True) -> dict[str, np.ndarray]:
    """``count``, ``mean`` (d,), ``cov`` / ``cov_sample`` / ``corr`` (d, d), float64, exact."""
    return _statistic(model, point, dataset, "covariance", batch_size, limit, progress)


@dataclass(frozen=True)
class PCA:
    """Principal components of a point's activations.

    ``components`` (n, d) unit rows, ``explained_variance`` (n,) (sample variance, n - 1, as
    scikit-learn), ``explained_variance_ratio`` (n,), ``mean`` (d,), ``count`` tokens. The sign
    of each component is fixed so that its largest-magnitude entry is positive.
    """

    point: str
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray
    count: int

    def transform(self, x: Any) -> np.ndarray:
        """Project activations (..., d) onto the components: (..., n)."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def pca_from_covariance(cov: np.ndarray, mean_: np.ndarray, count: int, n_components: int,
                        point: str = "") -> PCA:
    """PCA from a (sample) covariance matrix: eigenvectors, largest eigenvalues first."""
    d = cov.shape[0]
    if not 1 <= n_components <= d:
        raise UsageError(f"n_components ({n_components}) must be between 1 and d ({d})")
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:n_components]
    comps = vectors[:, order].T.copy()
    flip = np.sign(comps[np.arange(n_components), np.abs(comps).argmax(1)])
    comps *= np.where(flip == 0, 1.0, flip)[:, None]
    total = float(np.trace(cov))
    ev = np.clip(values[order], 0.0, None)
    return PCA(point, comps, ev, ev / total if total > 0 else np.zeros_like(ev), mean_, count)


@reports
def pca(model: Any, point: str, dataset: Any, n_components: int = 10, *, batch_size: int = 8,
        limit: int | None = None, progress: Any = True) -> PCA:
    """PCA of ``point`` over every real token of ``dataset``, from the exact server-side
    covariance (the Covariance reducer): no activations leave the server."""
    stats = covariance(model, point, dataset, batch_size=batch_size, limit=limit,
                       progress=progress)
    count = int(stats["count"])
    if count < 2:
        raise UsageError(f"PCA needs at least two tokens, the dataset gave {count}")
    return pca_from_covariance(stats["cov_sample"], stats["mean"], count, n_components,
                               model.resolve(point))


@reports
def project(model: Any, result: PCA, inputs: Any, *, progress: Any = True) -> dict[str, Any]:
    """Project ``inputs`` (text, texts or token ids) onto ``result``'s components on the
    server: ``{"values": (batch, seq, n), "tokens": token ids (batch, seq), "mask": ...}``."""
    comps = torch.as_tensor(result.components, dtype=torch.float64)
    centre = torch.as_tensor(result.mean, dtype=torch.float64)

    def project_probe(ctx: Any, x: torch.Tensor) -> None:
        flat = x.flatten(2).double()
        ctx.save("proj", ((flat - centre.to(flat.device)) @ comps.to(flat.device).T).float())

    with scratch(model, "project") as name:
        out = model.run(inputs, probes={result.point: project_probe}, save=name,
                        return_logits=False)
        values = model.save_context(name).fetch("proj")[0]
    return {"values": values.numpy(), "tokens": out.tokens.numpy(),
            "mask": out.attention_mask.numpy()}


@dataclass(frozen=True)
class Sample:
    """A uniform sample of token activations: ``activations`` (n, d) with their origin."""

    point: str
    activations: np.ndarray
    example_ids: np.ndarray
    positions: np.ndarray


def _sample_probe(n: int, seed: int) -> Any:
    def sample_probe(ctx: Any, x: torch.Tensor) -> None:
        from cloche.experiments._common import sample_keys

        flat = x.flatten(2)
        b, s, d = flat.shape
        keys = sample_keys(ctx.example_ids, s, seed)
        mask = ctx.attention_mask
        if mask is not None:
            keys = torch.where(mask.to(keys.device).bool(), keys, torch.full_like(keys, -1))
        ids = ctx.example_ids.to(torch.int64)[:, None].expand(b, s).reshape(-1)
        pos = torch.arange(s, device=flat.device).expand(b, s).reshape(-1)
        st = ctx.state
        all_keys = torch.cat([st["keys"], keys.reshape(-1).cpu()]) if "keys" in st else \
            keys.reshape(-1).cpu()
        rows = flat.reshape(-1, d).detach().float().cpu()
        all_rows = torch.cat([st["rows"], rows]) if "rows" in st else rows
        all_ids = torch.cat([st["ids"], ids.cpu()]) if "ids" in st else ids.cpu()
        all_pos = torch.cat([st["pos"], pos.cpu()]) if "pos" in st else pos.cpu()
        keep = all_keys >= 0
        order = torch.argsort(all_keys[keep], descending=True, stable=True)[:n]
        st["keys"] = all_keys[keep][order]
        st["rows"] = all_rows[keep][order]
        st["ids"] = all_ids[keep][order]
        st["pos"] = all_pos[keep][order]

    return sample_probe


@reports
def sample(model: Any, point: str, dataset: Any, n: int = 2000, *, seed: int = 0,
           batch_size: int = 8, limit: int | None = None, progress: Any = True) -> Sample:
    """``n`` token activations of ``point`` drawn uniformly from ``dataset`` on the server."""
    point = model.resolve(point)
    with scratch(model, "sample") as name:
        out = model.run_dataset(dataset, probes={point: _sample_probe(int(n), int(seed))},
                                save=name, batch_size=batch_size, limit=limit, progress=progress)
    st = out["state"]
    if "rows" not in st:
        raise UsageError(f"the dataset produced no activations at {point!r}")
    order = np.lexsort((to_numpy(st["pos"]), to_numpy(st["ids"])))
    return Sample(point, to_numpy(st["rows"])[order], to_numpy(st["ids"])[order],
                  to_numpy(st["pos"])[order])


@reports
def umap(model: Any, point: str, dataset: Any, n: int = 2000, *, n_components: int = 2,
         seed: int = 0, batch_size: int = 8, limit: int | None = None, progress: Any = True,
         **umap_kwargs: Any) -> tuple[np.ndarray, Sample]:
    """UMAP embedding (n, n_components) of a server-side :func:`sample`; needs umap-learn
    (``pip install 'cloche[experiments]'``). Returns (embedding, the sample)."""
    import warnings

    try:
        with warnings.catch_warnings():
            # umap-learn warns at import that the optional TensorFlow (ParametricUMAP) is absent
            warnings.filterwarnings("ignore", category=ImportWarning, module="umap")
            import umap as umap_learn
    except ImportError as exc:
        raise UsageError("umap needs umap-learn: pip install 'cloche[experiments]'") from exc
    drawn = sample(model, point, dataset, n, seed=seed, batch_size=batch_size, limit=limit,
                   progress=progress)
    options = {"n_components": n_components, "random_state": seed, "n_jobs": 1,
               "n_neighbors": min(15, max(2, len(drawn.activations) - 1))}
    options.update(umap_kwargs)
    embedding = umap_learn.UMAP(**options).fit_transform(drawn.activations)
    return np.asarray(embedding), drawn
