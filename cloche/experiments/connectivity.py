"""Connectivity from the weights alone, computed where the weights live.

Every function ships one small self-contained function with ``model.call``; the weights never
cross the network, only the answer (a matrix of the size asked for, top-k lists, scores).

- :func:`virtual_weights` — neuron-to-neuron weights through the residual stream,
  ``W_out[src] @ W_in[dst]`` (d_mlp_src × d_mlp_dst).
- :func:`top_connections` — a neuron's k strongest up- or downstream neurons in other layers.
- :func:`ov_circuit` / :func:`qk_circuit` — a head's token-to-token circuits as low-rank
  factors ``left @ right`` (d_vocab × d_head and d_head × d_vocab), never the d_vocab² matrix.
- :func:`logit_effect` — the direct effect of a neuron or direction on the logits through the
  unembedding, as top tokens.
- :func:`composition_scores` — Q-, K- and V-composition between every pair of heads in
  different layers (Elhage et al., 2021), from d_head × d_head Gram matrices.
- :func:`connectivity_summary` — a layer-by-layer graph of how strongly each component's
  output space feeds the next components' input spaces.

Each takes ``progress=`` like every call that can take seconds (``cloche.Progress``): on a
large model a bar shows the elapsed time once a call takes a second; ``False`` silences it.

Weight layouts are TransformerLens's (see ``cloche.model.weights``); grouped-query heads use
their key/value head. ``fold_ln=True`` scales reading weights by the preceding norm's weight
(the norm's centring and division are not folded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cloche.errors import UsageError
from cloche.experiments._common import reports

__all__ = ["Factored", "composition_scores", "connectivity_summary", "logit_effect",
           "ov_circuit", "qk_circuit", "top_connections", "virtual_weights"]


@reports
def virtual_weights(model: Any, src_layer: int, dst_layer: int, *, into: str = "W_in",
                    fold_ln: bool = False, progress: Any = True) -> np.ndarray:
    """(d_mlp, d_mlp) weights from layer ``src_layer``'s neurons (rows) into ``dst_layer``'s
    (columns): ``W_out[src] @ W_in[dst]`` (``into="W_gate"`` for the gate of gated MLPs)."""
    if into not in ("W_in", "W_gate"):
        raise UsageError(f"into must be 'W_in' or 'W_gate', not {into!r}")
    if not 0 <= src_layer < dst_layer < int(model.n_layers):
        raise UsageError(f"need 0 <= src_layer ({src_layer}) < dst_layer ({dst_layer}) < "
                         f"n_layers ({model.n_layers})")
    return model.call(_virtual_weights, src_layer, dst_layer, into, fold_ln)


def _virtual_weights(m: Any, src: int, dst: int, into: str, fold_ln: bool) -> Any:
    """Runs on the server."""
    import torch

    w_out = m.param(f"layers.{src}.mlp.W_out").double()
    w_in = m.param(f"layers.{dst}.mlp.{into}").double()
    if fold_ln:
        w_in = m.param(f"layers.{dst}.ln2.w").double()[:, None] * w_in
    with torch.no_grad():
        return (w_out @ w_in).float().numpy()


@reports
def top_connections(model: Any, layer: int, neuron: int, k: int = 10, *,
                    direction: str = "downstream", into: str = "W_in", fold_ln: bool = False,
                    progress: Any = True) -> list[tuple[int, int, float]]:
    """The ``k`` largest-magnitude virtual weights between ``layer``'s ``neuron`` and the
    neurons of every later (``downstream``) or earlier (``upstream``) layer, as
    (layer, neuron, weight), strongest first."""
    if direction not in ("downstream", "upstream"):
        raise UsageError(f"direction must be 'downstream' or 'upstream', not {direction!r}")
    return model.call(_top_connections, layer, neuron, k, direction, into, fold_ln)


def _top_connections(m: Any, layer: int, neuron: int, k: int, direction: str, into: str,
                     fold_ln: bool) -> list[tuple[int, int, float]]:
    """Runs on the server."""
    import torch

    found: list[tuple[int, int, float]] = []
    others = range(layer + 1, m.n_layers) if direction == "downstream" else range(layer)
    for other in others:
        if direction == "downstream":
            w_in = m.param(f"layers.{other}.mlp.{into}").double()
            if fold_ln:
                w_in = m.param(f"layers.{other}.ln2.w").double()[:, None] * w_in
            row = m.param(f"layers.{layer}.mlp.W_out")[neuron].double() @ w_in
        else:
            w_in = m.param(f"layers.{layer}.mlp.{into}")[:, neuron].double()
            if fold_ln:
                w_in = m.param(f"layers.{layer}.ln2.w").double() * w_in
            row = m.param(f"layers.{other}.mlp.W_out").double() @ w_in
        top = torch.topk(row.abs(), min(k, row.numel()))
        found += [(other, int(i), float(row[i])) for i in top.indices]
    found.sort(key=lambda t: -abs(t[2]))
    return found[:k]


@dataclass(frozen=True)
class Factored:
    """A low-rank matrix ``left @ right`` kept as its factors (e.g. d_vocab × d_vocab)."""

    left: np.ndarray
    right: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def row(self, i: int) -> np.ndarray:
        return self.left[i] @ self.right

    def column(self, j: int) -> np.ndarray:
        return self.left @ self.right[:, j]

    def dense(self) -> np.ndarray:
        """The full matrix — only for small shapes."""
        return self.left @ self.right

    def eigenvalues(self) -> np.ndarray:
        """The non-zero eigenvalues, from the small ``right @ left`` (same non-zero spectrum)."""
        return np.linalg.eigvals(self.right @ self.left)

    def top_in_row(self, i: int, k: int = 10) -> list[tuple[int, float]]:
        r = self.row(i)
        idx = np.argsort(-r, kind="stable")[:k]
        return [(int(j), float(r[j])) for j in idx]


@reports
def ov_circuit(model: Any, layer: int, head: int, *, fold_ln: bool = False,
               progress: Any = True) -> Factored:
    """Head's full OV circuit ``W_E @ W_V @ W_O @ W_U`` (source token -> logits) as factors
    ``(W_E W_V)`` (d_vocab, d_head) and ``(W_O W_U)`` (d_head, d_vocab)."""
    left, right = model.call(_circuit, "ov", layer, head, fold_ln)
    return Factored(left, right)


@reports
def qk_circuit(model: Any, layer: int, head: int, *, fold_ln: bool = False,
               progress: Any = True) -> Factored:
    """Head's full QK circuit ``W_E W_Q (W_E W_K)^T`` (query token × key token) as factors."""
    left, right = model.call(_circuit, "qk", layer, head, fold_ln)
    return Factored(left, right)


def _unembed(m: Any) -> Any:
    """``unembed.W_U`` (d_model, d_vocab); for tied embeddings a model may only hold ``W_E``."""
    from cloche.errors import UnknownProbePoint

    try:
        return m.param("unembed.W_U").double()
    except UnknownProbePoint:
        if not getattr(m.config, "tie_word_embeddings", False):
            raise
        return m.param("embed.W_E").double().T


def _circuit(m: Any, which: str, layer: int, head: int, fold_ln: bool) -> tuple[Any, Any]:
    """Runs on the server."""
    import torch

    n_heads = int(m.n_heads)
    if not 0 <= head < n_heads:
        raise UsageError(f"head {head} is out of range ({n_heads} heads)")
    w_e = m.param("embed.W_E").double()
    ln = m.param(f"layers.{layer}.ln1.w").double()[:, None] if fold_ln else 1.0

    def per_head(name: str) -> Any:
        w = m.param(f"layers.{layer}.attn.{name}")
        return w[head * w.shape[0] // n_heads].double()

    with torch.no_grad():
        if which == "ov":
            w_u = _unembed(m)
            if fold_ln:
                w_u = m.param("ln_final.w").double()[:, None] * w_u
            left = w_e @ (ln * per_head("W_V"))
            right = per_head("W_O") @ w_u
        else:
            left = w_e @ (ln * per_head("W_Q"))
            right = (w_e @ (ln * per_head("W_K"))).T
    return left.float().numpy(), right.float().numpy()


@reports
def logit_effect(model: Any, unit: Any, k: int = 10, *, fold_ln: bool = False,
                 progress: Any = True) -> dict[str, list[tuple[str, float]]]:
    """Direct effect on the logits of a neuron — ``("layers.1.mlp.post", 7)`` — or of a
    residual direction (a (d_model,) vector): its output direction times ``W_U``. Returns the
    ``k`` most promoted and most suppressed tokens as ``{"top": [...], "bottom": [...]}``."""
    if isinstance(unit, tuple) and len(unit) == 2 and isinstance(unit[0], str):
        point = model.resolve(unit[0])
        parts = point.split(".")
        if len(parts) != 4 or parts[2:] != ["mlp", "post"]:
            raise UsageError(f"logit_effect takes ('layers.L.mlp.post', neuron), not {unit!r}")
        return model.call(_logit_effect, int(parts[1]), int(unit[1]), None, k, fold_ln)
    from cloche.experiments._common import as_tensor

    return model.call(_logit_effect, None, None, as_tensor(unit).double(), k, fold_ln)


def _logit_effect(m: Any, layer: Any, neuron: Any, direction: Any, k: int, fold_ln: bool
                  ) -> dict[str, list[tuple[str, float]]]:
    """Runs on the server."""
    from cloche.experiments._common import str_tokens

    if direction is None:
        direction = m.param(f"layers.{layer}.mlp.W_out")[neuron].double()
    w_u = _unembed(m)
    if fold_ln:
        w_u = m.param("ln_final.w").double()[:, None] * w_u
    effect = direction.to(w_u) @ w_u
    up = effect.topk(k)
    down = (-effect).topk(k)
    return {"top": list(zip(str_tokens(m, up.indices.tolist()), up.values.tolist(),
                            strict=True)),
            "bottom": list(zip(str_tokens(m, down.indices.tolist()), (-down.values).tolist(),
                               strict=True))}


@reports
def composition_scores(model: Any, *, fold_ln: bool = False, progress: Any = True
                       ) -> dict[str, np.ndarray]:
    """Q-, K- and V-composition scores between every pair of heads.

    Returns ``{"Q": s, "K": s, "V": s}``, each (n_layers, n_heads, n_layers, n_heads):
    ``s[l1, h1, l2, h2]`` is how much head (l2, h2) reads, through its query / key / value,
    what head (l1, h1) writes — ``||OV1 @ W|| / (||OV1|| ||W||)`` with ``W`` the later head's
    QK, QKᵀ or OV matrix (Frobenius norms); NaN unless l1 < l2.
    """
    out = model.call(_composition, fold_ln)
    return {k: np.asarray(v) for k, v in out.items()}


def _composition(m: Any, fold_ln: bool) -> dict[str, Any]:
    """Runs on the server: norms of products of rank-d_head matrices through their factors.

    For ``A = X P`` and ``B = Q Y`` (X, Y: d_model × d_head), ``||X (P Q) Yᵀ||²`` is
    ``tr(Mᵀ Gx M Gy)`` with ``M = P Q`` and the Gram matrices ``Gx = XᵀX``, ``Gy = YᵀY``.
    """
    import torch

    n_layers, n_heads = int(m.n_layers), int(m.n_heads)

    def heads(layer: int, name: str) -> Any:
        w = m.param(f"layers.{layer}.attn.{name}").double()
        return w.repeat_interleave(n_heads // w.shape[0], dim=0)

    with torch.no_grad():
        wq, wk, wv, wo = [], [], [], []
        for layer in range(n_layers):
            ln = m.param(f"layers.{layer}.ln1.w").double()[None, :, None] if fold_ln else 1.0
            wq.append(ln * heads(layer, "W_Q"))
            wk.append(ln * heads(layer, "W_K"))
            wv.append(ln * heads(layer, "W_V"))
            wo.append(heads(layer, "W_O"))  # (h, d_head, d_model)
        q, k, v, o = (torch.stack(t) for t in (wq, wk, wv, wo))  # (L, H, d, dh) / (L, H, dh, d)
        gv, gq, gk = (a.transpose(-1, -2) @ a for a in (v, q, k))  # (L, H, dh, dh)
        go = o @ o.transpose(-1, -2)  # O Oᵀ
        ov_norm = (gv * go).sum((-1, -2)).clamp_min(0).sqrt()  # ||V O||
        qk_norm = (gq * gk).sum((-1, -2)).clamp_min(0).sqrt()  # ||Q Kᵀ||
        # writer OV1 = V1 O1; readers QK2 = Q2 K2ᵀ (Q), QK2ᵀ = K2 Q2ᵀ (K), OV2 = V2 O2 (V):
        # OV1 @ reader = V1 (O1 R2) Y2ᵀ with (R2, Y2ᵀ) = (Q2, K2ᵀ), (K2, Q2ᵀ), (V2, O2).
        scores = {}
        for label, read, gram_y, norm2 in (("Q", q, gk, qk_norm), ("K", k, gq, qk_norm),
                                           ("V", v, go, ov_norm)):
            s = torch.full((n_layers, n_heads, n_layers, n_heads), float("nan"),
                           dtype=torch.float64)
            for l1 in range(n_layers):
                for l2 in range(l1 + 1, n_layers):
                    mid = torch.einsum("aij,bjk->abik", o[l1], read[l2])  # M = O1 R2
                    # ||V1 M Y2ᵀ||² = tr(Mᵀ Gv1 M Gy2)
                    sq = torch.einsum("abji,ajk,abkl,bli->ab", mid, gv[l1], mid, gram_y[l2])
                    s[l1, :, l2, :] = sq.clamp_min(0).sqrt() / (
                        ov_norm[l1][:, None] * norm2[l2][None, :])
            scores[label] = s.numpy()
    return scores


@reports
def connectivity_summary(model: Any, *, fold_ln: bool = False, progress: Any = True
                         ) -> dict[str, Any]:
    """A graph of the whole model: nodes ``embed``, ``L{i}.attn``, ``L{i}.mlp``, ``unembed``;
    an edge from every writer to every later reader with weight
    ``||W_write @ W_read|| / (||W_write|| ||W_read||)`` (Frobenius), where a writer's matrix
    maps its units into the residual stream (W_E, W_O of all heads, W_out) and a reader's maps
    the residual stream to its inputs (W_Q|W_K|W_V of all heads, W_in(|W_gate), W_U).

    Returns ``{"nodes": [names], "edges": [(src, dst, weight)], "layers": {name: depth}}``,
    ready to draw with :func:`cloche.experiments.plots.connectivity_graph`.
    """
    return model.call(_summary, fold_ln)


def _summary(m: Any, fold_ln: bool) -> dict[str, Any]:
    """Runs on the server."""
    import torch

    n_layers = int(m.n_layers)
    names = set(m.param_names())

    def flat_heads_in(layer: int) -> Any:
        parts = []
        for name in ("W_Q", "W_K", "W_V"):
            w = m.param(f"layers.{layer}.attn.{name}").double()  # (h, d, dh)
            parts.append(w.permute(1, 0, 2).reshape(w.shape[1], -1))
        w = torch.cat(parts, 1)
        return m.param(f"layers.{layer}.ln1.w").double()[:, None] * w if fold_ln else w

    def mlp_in(layer: int) -> Any:
        w = m.param(f"layers.{layer}.mlp.W_in").double()
        if f"layers.{layer}.mlp.W_gate" in names:
            w = torch.cat([w, m.param(f"layers.{layer}.mlp.W_gate").double()], 1)
        return m.param(f"layers.{layer}.ln2.w").double()[:, None] * w if fold_ln else w

    writers: list[tuple[str, float, Any]] = [("embed", -1.0, m.param("embed.W_E").double())]
    readers: list[tuple[str, float, Any]] = []
    for layer in range(n_layers):
        wo = m.param(f"layers.{layer}.attn.W_O").double()
        readers.append((f"L{layer}.attn", layer, flat_heads_in(layer)))
        writers.append((f"L{layer}.attn", layer, wo.reshape(-1, wo.shape[-1])))
        readers.append((f"L{layer}.mlp", layer + 0.5, mlp_in(layer)))
        w_out = m.param(f"layers.{layer}.mlp.W_out").double()
        writers.append((f"L{layer}.mlp", layer + 0.5, w_out))
    readers.append(("unembed", float(n_layers), _unembed(m)))
    edges = []
    with torch.no_grad():
        for wname, wdepth, w in writers:
            for rname, rdepth, r in readers:
                if rdepth <= wdepth:
                    continue
                score = float(torch.linalg.matrix_norm(w @ r) / (w.norm() * r.norm()))
                edges.append((wname, rname, score))
    depth = {name: d for name, d, _ in writers + readers}
    nodes = sorted(depth, key=lambda n: (depth[n], n))
    return {"nodes": nodes, "edges": edges, "layers": depth}
