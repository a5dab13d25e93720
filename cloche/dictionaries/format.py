"""The SAELens dictionary format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

This is the format people share sparse autoencoders in (SAELens, Gemma Scope-style releases,
Neuronpedia), so cloche reads and writes it rather than inventing its own. Two layouts of
``cfg.json`` exist: the flat one (``hook_name``, ``prepend_bos``, ``context_size`` … at the top
level) and the newer one that moves what describes the *use* of the dictionary into a
``metadata`` (or ``meta``) block. Both are read; cloche writes both at once (the flat fields and
the block), so old and new readers find what they look for.

Weights: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in)
and, for JumpReLU, ``threshold`` (d_sae) (``log_threshold`` is accepted too). A TopK
dictionary's ``k`` is a config field (older files keep it in ``activation_fn_kwargs``); with
``rescale_acts_by_decoder_norm`` (SAELens 6's TopK training default) its pre-activations are
multiplied by the decoder rows' norms before the top k are picked, and divided by them again
before decoding.

Transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` …) read one point
(``hook_name``) and write another (``hook_name_out``, ``d_out``): ``W_dec`` is (d_sae, d_out),
``b_dec`` (d_out), the input is not shifted by ``b_dec``, and a skip transcoder
(``skip_transcoder``, ``jumprelu_skip_transcoder``) adds ``W_skip`` (d_out, d_in) times its
input.

Checked against SAELens 6.54 itself by ``tests/dictionaries/test_saelens.py`` (when it is
installed): what cloche writes loads there with the same features and outputs, and what SAELens
writes loads here the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cloche.errors import UsageError

__all__ = ["ARCHITECTURES", "CFG_FILE", "NORMALIZATIONS", "TRANSCODERS", "WEIGHTS_FILE",
           "DictionaryConfig", "load_folder", "save_folder", "weights_from"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk", "transcoder", "skip_transcoder",
                 "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder",
               "jumprelu_skip_transcoder")
SKIP_TRANSCODERS = ("skip_transcoder", "jumprelu_skip_transcoder")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True, kw_only=True)
class DictionaryConfig:
    """What a dictionary is and how it was meant to be used (one ``cfg.json``).

    ``hook_name`` is the point it was trained on, as written by its author (a TransformerLens
    name such as ``blocks.3.hook_resid_post`` or a cloche name); ``prepend_bos`` and
    ``context_size`` are the conventions of the activations it was trained on: cloche compares
    them with the model's when the dictionary is attached. ``extra`` keeps every other field of
    the file, so a load and a save lose nothing.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int | None = None
    #: TopK only: pre-activations times the decoder rows' norms (SAELens' field of that name)
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    #: the constant ``expected_average_only_in`` multiplies inputs by (None: not stored)
    norm_scaling_factor: float | None = None
    hook_name: str | None = None
    hook_layer: int | None = None
    model_name: str | None = None
    prepend_bos: bool | None = None
    context_size: int | None = None
    dtype: str = "float32"
    #: a transcoder's output: its width (None: d_in) and the point it writes
    d_out: int | None = None
    hook_name_out: str | None = None
    hook_layer_out: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"dictionary {name} must be a positive int, not {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise UsageError(f"dictionary architecture must be one of {ARCHITECTURES}, not"
                             f" {self.architecture!r}")
        if self.architecture == "topk":
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.d_sae:
                raise UsageError(f"a TopK dictionary needs k in [1, d_sae={self.d_sae}], not"
                                 f" {k!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise UsageError(f"normalize_activations must be one of {NORMALIZATIONS}, not"
                             f" {self.normalize_activations!r}")
        if self.d_out is not None and (isinstance(self.d_out, bool)
                                       or not isinstance(self.d_out, int) or self.d_out < 1):
            raise UsageError(f"dictionary d_out must be None or a positive int, not"
                             f" {self.d_out!r}")
        if self.dtype not in _DTYPES:
            raise UsageError(f"dictionary dtype must be one of {sorted(_DTYPES)}, not"
                             f" {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def transcoder(self) -> bool:
        """Whether it writes another point than it reads."""
        return self.architecture in TRANSCODERS

    @property
    def width_out(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def activation(self) -> str:
        """The encoder's nonlinearity: ``relu``, ``jumprelu`` or ``topk``."""
        if self.architecture.startswith("jumprelu"):
            return "jumprelu"
        return "topk" if self.architecture == "topk" else "relu"

    @property
    def skip(self) -> bool:
        """Whether its output adds ``W_skip`` times its input (a skip transcoder)."""
        return self.architecture in SKIP_TRANSCODERS

    # ----------------------------------------------------------------- cfg.json
    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> DictionaryConfig:
        """Read either layout of ``cfg.json`` (flat, or with a ``metadata``/``meta`` block)."""
        if not isinstance(cfg, Mapping):
            raise UsageError(f"cfg.json must hold an object, not {type(cfg).__name__}")
        flat = dict(cfg)
        meta = flat.pop("metadata", None) or flat.pop("meta", None) or {}
        if not isinstance(meta, Mapping):
            raise UsageError(f"cfg.json's metadata must be an object, not {meta!r}")

        def pick(name: str, default: Any = None) -> Any:
            if meta.get(name) is not None:
                return meta[name]
            return flat.get(name, default)

        missing = [n for n in ("d_in", "d_sae") if n not in flat]
        if missing:
            raise UsageError(f"cfg.json lacks {', '.join(missing)}")
        architecture = str(flat.get("architecture", "standard"))
        if flat.get("reshape_activations") not in (None, "none"):
            raise UsageError(f"cfg.json's reshape_activations={flat['reshape_activations']!r}"
                             " (a dictionary over the attention heads concatenated) is not"
                             " supported: cloche reads dictionaries of one point's last axis")
        kwargs = flat.get("activation_fn_kwargs") or {}
        if architecture == "standard" and flat.get("activation_fn_str") == "topk":
            architecture = "topk"  # older files: a standard SAE with a topk activation
        k = flat.get("k", kwargs.get("k") if isinstance(kwargs, Mapping) else None)
        read = ("hook_name", "hook_layer", "model_name", "prepend_bos", "context_size",
                "hook_name_out", "hook_layer_out")
        known = {"d_in", "d_sae", "d_out", "architecture", "k", "apply_b_dec_to_input",
                 "normalize_activations", "norm_scaling_factor", "dtype", "device",
                 "activation_fn_str", "activation_fn_kwargs", "rescale_acts_by_decoder_norm",
                 *read}
        extra = {key: value for key, value in flat.items() if key not in known}
        meta_extra = {key: value for key, value in meta.items() if key not in read}
        if meta_extra:  # kept in the block it came in, so a save puts it back there
            extra["metadata"] = meta_extra
        return cls(
            d_in=flat["d_in"], d_sae=flat["d_sae"], architecture=architecture,
            k=k if architecture == "topk" else None,
            rescale_acts_by_decoder_norm=(architecture == "topk" and bool(
                flat.get("rescale_acts_by_decoder_norm", False))),
            apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", True)),
            normalize_activations=str(flat.get("normalize_activations") or "none"),
            norm_scaling_factor=flat.get("norm_scaling_factor"),
            hook_name=pick("hook_name"), hook_layer=pick("hook_layer"),
            model_name=pick("model_name"), prepend_bos=pick("prepend_bos"),
            context_size=pick("context_size"), dtype=str(flat.get("dtype") or "float32"),
            d_out=flat.get("d_out") if architecture in TRANSCODERS else None,
            hook_name_out=pick("hook_name_out"), hook_layer_out=pick("hook_layer_out"),
            extra=extra)

    def to_cfg(self) -> dict[str, Any]:
        """``cfg.json`` with the flat fields and the ``metadata`` block both written."""
        extra = dict(self.extra)
        flat = {"model_name": self.model_name, "hook_name": self.hook_name,
                "hook_layer": self.hook_layer, "prepend_bos": self.prepend_bos,
                "context_size": self.context_size}
        metadata = {**(extra.pop("metadata", None) or {}), **flat}
        cfg: dict[str, Any] = {
            **extra,
            "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
            "dtype": self.dtype, "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "activation_fn_str": "topk" if self.architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.k is not None else {},
            **flat, "metadata": metadata,
        }
        if self.k is not None:
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        if self.transcoder:
            out = {"hook_name_out": self.hook_name_out, "hook_layer_out": self.hook_layer_out}
            cfg.update(d_out=self.width_out, apply_b_dec_to_input=False, **out)
            metadata.update(out)
        if self.norm_scaling_factor is not None:
            cfg["norm_scaling_factor"] = self.norm_scaling_factor
        return cfg

    def replace(self, **changes: Any) -> DictionaryConfig:
        return dataclasses.replace(self, **changes)


def weights_from(tensors: Mapping[str, Any], config: DictionaryConfig) -> dict[str, torch.Tensor]:
    """The weight tensors of ``config``'s dictionary, checked and in its dtype."""
    if not isinstance(tensors, Mapping):
        raise UsageError(f"dictionary weights are a dict of tensors, not {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name in _REQUIRED:
        if name not in tensors:
            raise UsageError(f"dictionary weights lack {name!r} (they hold {sorted(tensors)})")
    names = list(_REQUIRED)
    if config.skip:
        if "W_skip" not in tensors:
            raise UsageError("a skip transcoder needs 'W_skip'")
        names.append("W_skip")
    if config.activation == "jumprelu":
        if "threshold" not in tensors and "log_threshold" not in tensors:
            raise UsageError("a JumpReLU dictionary needs 'threshold' (or 'log_threshold')")
        names.append("threshold" if "threshold" in tensors else "log_threshold")
    d_out = config.width_out
    shapes = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
              "W_dec": (config.d_sae, d_out), "b_dec": (d_out,),
              "threshold": (config.d_sae,), "log_threshold": (config.d_sae,),
              "W_skip": (d_out, config.d_in)}
    for name in names:
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"dictionary weight {name!r} must be a tensor, not"
                             f" {type(value).__name__}")
        if tuple(value.shape) != shapes[name]:
            raise UsageError(f"dictionary weight {name!r} has shape {tuple(value.shape)};"
                             f" d_in={config.d_in}, d_sae={config.d_sae}, d_out={d_out} need"
                             f" {shapes[name]}")
        out[name] = value.detach().to(dtype=config.torch_dtype, device="cpu")
    if "log_threshold" in out:
        out["threshold"] = out.pop("log_threshold").exp()
    return out


def load_folder(path: str | os.PathLike[str]) -> tuple[DictionaryConfig, dict[str, torch.Tensor]]:
    """Read a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(path)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise UsageError(f"{folder} is not a SAELens dictionary folder: it needs {CFG_FILE} and"
                         f" {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {cfg_path}: {exc}") from exc
    config = DictionaryConfig.from_cfg(cfg)
    return config, weights_from(load_file(str(weights_path)), config)


def save_folder(path: str | os.PathLike[str], config: DictionaryConfig,
                weights: Mapping[str, torch.Tensor]) -> Path:
    """Write a SAELens folder that SAELens (and cloche) load back."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to("cpu", config.torch_dtype).contiguous()
               for name, value in weights_from(weights, config).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(config.to_cfg(), indent=2))
    return folder
