"""Sparse dictionaries as modules: encode activations into features, decode them back.

One class covers the three architectures SAELens ships (the encoder's nonlinearity is the only
difference): ``standard`` (ReLU), ``jumprelu`` (ReLU gated by a learned per-feature threshold:
a feature is on only where its pre-activation exceeds the threshold) and ``topk`` (the k largest
pre-activations of each token, through a ReLU; the rest zero).

The input normalisations are undone on the way out, and ``decode(f, x)`` takes the input ``x``
again for the ones that depend on it (``constant_norm_rescale`` scales each token to norm
sqrt(d_in), ``layer_norm`` standardises it): the module keeps no state between calls, so one
dictionary may serve many forward passes at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cloche.dictionaries.format import DictionaryConfig, load_folder, save_folder, weights_from
from cloche.errors import UsageError

__all__ = ["SparseDictionary", "build_dictionary"]

_LN_EPS = 1e-5


class SparseDictionary(nn.Module):
    """A sparse autoencoder (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` [, ``threshold``])."""

    def __init__(self, config: DictionaryConfig,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        dtype = config.torch_dtype
        if weights is None:
            weights = _initial_weights(config)
        tensors = weights_from(weights, config)
        self.W_enc = nn.Parameter(tensors["W_enc"].to(dtype))
        self.b_enc = nn.Parameter(tensors["b_enc"].to(dtype))
        self.W_dec = nn.Parameter(tensors["W_dec"].to(dtype))
        self.b_dec = nn.Parameter(tensors["b_dec"].to(dtype))
        if config.activation == "jumprelu":
            self.threshold = nn.Parameter(tensors["threshold"].to(dtype))
        if config.skip:
            self.W_skip = nn.Parameter(tensors["W_skip"].to(dtype))

    # ----------------------------------------------------------------- description
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_dict(self) -> int:
        return self.config.d_sae

    @property
    def d_out(self) -> int:
        """The width it writes: d_in, except for a transcoder."""
        return self.config.width_out

    @property
    def hook_name_out(self) -> str | None:
        """The point a transcoder writes (None for a sparse autoencoder)."""
        return self.config.hook_name_out if self.config.transcoder else None

    @property
    def hook_name(self) -> str | None:
        return self.config.hook_name

    def summary(self) -> dict[str, Any]:
        """What the dictionary is and the conventions it was trained with."""
        c = self.config
        return {"architecture": c.architecture, "k": c.k,
                "rescale_acts_by_decoder_norm": c.rescale_acts_by_decoder_norm,
                "hook_name": c.hook_name,
                "hook_name_out": self.hook_name_out, "d_out": self.d_out,
                "normalize_activations": c.normalize_activations,
                "norm_scaling_factor": c.norm_scaling_factor,
                "apply_b_dec_to_input": c.apply_b_dec_to_input, "prepend_bos": c.prepend_bos,
                "context_size": c.context_size, "model_name": c.model_name, "dtype": c.dtype}

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights by their SAELens names (detached, on the CPU)."""
        return {name: p.detach().cpu() for name, p in self.named_parameters()}

    # ----------------------------------------------------------------- normalisation
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        how = self.config.normalize_activations
        if how == "constant_norm_rescale":
            return x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if how == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + _LN_EPS)
        if how == "expected_average_only_in" and self.config.norm_scaling_factor is not None:
            return x * self.config.norm_scaling_factor
        return x

    def _denormalize(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        how = self.config.normalize_activations
        if how in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise UsageError(f"decoding a dictionary with normalize_activations={how!r}"
                                 " needs the input it encoded: decode(features, x)")
            x = x.to(y.dtype)
            if how == "constant_norm_rescale":
                return y / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
            mean = x.mean(dim=-1, keepdim=True)
            return y * (x - mean).std(dim=-1, keepdim=True) + mean
        if how == "expected_average_only_in" and self.config.norm_scaling_factor is not None:
            return y / self.config.norm_scaling_factor
        return y

    # ----------------------------------------------------------------- the codec
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations (what the nonlinearity sees)."""
        sae_in = self._normalize(x.to(self.W_enc.dtype))
        if self.config.apply_b_dec_to_input and not self.config.transcoder:
            sae_in = sae_in - self.b_dec
        pre = sae_in @ self.W_enc + self.b_enc
        if self.config.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's nonlinearity, applied to pre-activations."""
        activation = self.config.activation
        if activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if activation == "topk":
            assert self.config.k is not None  # DictionaryConfig checks it
            top = pre.topk(self.config.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_dict)`` of activations ``x`` ``(..., d_in)``."""
        return self.activate(self.pre_activation(x))

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction ``(..., d_out)`` of ``features``; ``x`` (the encoded input) is
        needed only by the per-token input normalisations and a skip transcoder."""
        features = features.to(self.W_dec.dtype)
        if self.config.rescale_acts_by_decoder_norm:
            features = features * (1 / self.W_dec.norm(dim=-1))
        y = features @ self.W_dec + self.b_dec
        if self.config.skip:
            if x is None:
                raise UsageError("decoding a skip transcoder needs its input: decode(features,"
                                 " x)")
            y = y + x.to(y.dtype) @ self.W_skip.T
        if self.config.transcoder:  # SAELens does not rescale a transcoder's output
            return y
        return self._denormalize(y, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    # ----------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseDictionary:
        """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
        config, weights = load_folder(path)
        return cls(config, weights)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this dictionary as a SAELens folder."""
        save_folder(path, self.config, self.weights())

    def extra_repr(self) -> str:
        k = f", k={self.config.k}" if self.config.k is not None else ""
        return (f"{self.config.architecture}, d_in={self.d_in}, d_dict={self.d_dict}{k},"
                f" hook_name={self.hook_name!r}")


def _initial_weights(config: DictionaryConfig) -> dict[str, torch.Tensor]:
    """Decoder rows of norm 0.1 in random directions, the encoder their transpose (a common
    start for training, following the April 2024 Anthropic update), biases zero."""
    w_dec = torch.randn(config.d_sae, config.width_out)
    w_dec = 0.1 * w_dec / w_dec.norm(dim=-1, keepdim=True)
    w_enc = (w_dec.T.clone() if config.width_out == config.d_in
             else 0.1 * torch.randn(config.d_in, config.d_sae) / config.d_in ** 0.5)
    weights = {"W_enc": w_enc, "b_enc": torch.zeros(config.d_sae), "W_dec": w_dec,
               "b_dec": torch.zeros(config.width_out)}
    if config.activation == "jumprelu":
        weights["threshold"] = torch.zeros(config.d_sae)
    if config.skip:
        weights["W_skip"] = torch.zeros(config.width_out, config.d_in)
    return weights


def build_dictionary(config: dict[str, Any] | None, weights: Mapping[str, torch.Tensor] | None,
                     path: str | None) -> SparseDictionary:
    """What an executor calls to make the module of an attached dictionary, where its point
    lives: from a config dict (``cfg.json``'s content) and weights, or from a folder there."""
    if path is not None:
        module = SparseDictionary.load(path)
    elif config is None or weights is None:
        raise UsageError("a dictionary needs a folder, or a config and weights")
    else:
        module = SparseDictionary(DictionaryConfig.from_cfg(config), weights)
    module.requires_grad_(False)
    return module
