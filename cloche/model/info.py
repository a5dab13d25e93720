"""What a model is, as one plain record: sizes, family, device, probe point names.

Every executor describes its model with :func:`describe`; the facade validates requests against
the record (names, ranks, causal or not) without asking the model again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cloche.model.families import Adapter
from cloche.model.points import missing_points
from cloche.model.weights import head_shape

__all__ = ["ModelInfo", "describe", "no_head_message"]


def no_head_message(name: str, what: str) -> str:
    """Why ``what`` (logits, backward, generate, ...) is not available on a headless model."""
    return (f"{name} was saved without a language-model head (e.g. BertModel, LlamaModel), so"
            f" it has no logits, no unembed weight and no next-token loss: {what} needs one."
            " Read hidden states at probe points instead (the last block's resid_post, or"
            " final_norm), or load a checkpoint saved with its head")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A model's description; ``point_names`` holds every probe point's canonical name.

    ``rank`` is the rank this description was made on: 0 for a whole model, ``k`` for the shard
    that a function shipped with ``call(fn, rank=k)`` receives. ``max_positions`` is the longest
    sequence a model with learned position embeddings can take (0: no such hard limit).
    ``lm_head`` is False for a base model saved without its head: it has no logits, no
    ``unembed.W_U`` weight, no next-token loss and cannot generate.
    """

    name: str
    family: str | None
    model_type: str | None
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_mlp: int
    d_head: int
    d_vocab: int
    causal: bool
    device: str
    world_size: int = 1
    layers_per_rank: tuple[int, ...] = ()
    rank: int = 0
    point_names: tuple[str, ...] = ()
    max_positions: int = 0
    #: attention and MLP run in parallel off the same residual (no resid_mid)
    parallel: bool = False
    #: canonical points this model lacks, each ``"<point or layers.*.suffix>: <why>"``
    missing: tuple[str, ...] = ()
    #: what a user must know to read this family's points (the adapter's notes)
    notes: tuple[str, ...] = ()
    lm_head: bool = True

    @property
    def lacks(self) -> tuple[str, ...]:
        """What this model does not have, in words a user can act on (empty for most)."""
        if self.lm_head:
            return ()
        return ("logits", "unembed.W_U", "next-token loss", "generate")

    def summary(self) -> dict[str, Any]:
        """The plain dict ``model.info()`` returns (everything but the point names)."""
        return {
            "name": self.name, "family": self.family, "model_type": self.model_type,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model, "d_mlp": self.d_mlp, "d_head": self.d_head,
            "d_vocab": self.d_vocab, "causal": self.causal, "device": self.device,
            "world_size": self.world_size, "layers_per_rank": list(self.layers_per_rank),
            "rank": self.rank, "parallel": self.parallel, "missing": list(self.missing),
            "notes": list(self.notes), "lm_head": self.lm_head, "lacks": list(self.lacks),
        }


def _int(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def describe(config: Any, adapter: Adapter | None, *, name: str, device: Any,
             point_names: Iterable[str], world_size: int = 1,
             layers_per_rank: Iterable[int] = (), rank: int = 0,
             lm_head: bool = True) -> ModelInfo:
    """The :class:`ModelInfo` of a model with Hugging Face ``config`` and ``adapter``."""
    d_model = _int(config, "hidden_size")
    n_heads = _int(config, "num_attention_heads")
    causal = adapter.causal if adapter is not None else bool(getattr(config, "is_decoder", True))
    point_names = tuple(point_names)
    model_type = getattr(config, "model_type", None)
    heads = head_shape(config) if n_heads and d_model else None
    return ModelInfo(
        name=name, family=adapter.family if adapter else None,
        model_type=model_type,
        n_layers=_int(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=heads.n_kv_heads if heads else n_heads, d_model=d_model,
        d_mlp=_int(config, "intermediate_size", "n_inner", default=4 * d_model),
        d_head=heads.d_head if heads else 0, d_vocab=_int(config, "vocab_size"),
        causal=causal, device=str(device), world_size=world_size,
        layers_per_rank=tuple(layers_per_rank), rank=rank, point_names=point_names,
        parallel=adapter.is_parallel(config) if adapter is not None else False,
        missing=missing_points(adapter, config, point_names, model_type),
        notes=adapter.notes if adapter is not None else (),
        max_positions=(_int(config, "max_position_embeddings", "n_positions")
                       if adapter is not None and "pos_embed.W_pos" in adapter.global_weights
                       else 0),
        lm_head=lm_head,
    )
