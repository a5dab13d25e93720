"""Automatic structure discovery for a decoder that has no adapter.

A model of a family cloche has no table for still gets every canonical point its structure lets
cloche *prove*. Discovery finds candidates from the model itself — the block list (a ModuleList
with one block per layer), the input and output embeddings, each block's attention and MLP
modules (by class name) and norms — and then runs one small forward to check each candidate
against what transformers reports:

- ``resid_pre`` / ``resid_post``: block inputs and outputs equal ``output_hidden_states``;
- ``final_norm``: the norm whose output is the last hidden state;
- ``attn.out`` / ``mlp.out`` / ``resid_mid``: ``resid_post = resid_pre + attn.out + mlp.out``
  (parallel blocks) or ``resid_mid = resid_pre + attn.out`` and ``resid_post = resid_mid +
  mlp.out`` (sequential ones), in every block;
- ``ln1`` / ``ln2``: a norm whose output is what attention / the MLP reads;
- ``mlp.post`` / ``mlp.pre``: the MLP's last Linear makes its output from ``mlp.post``; with two
  Linears, ``mlp.post = act(mlp.pre)`` for the config's activation;
- ``attn.q/k/v/pattern/z``: the attention modules call transformers' AttentionInterface (cloche's
  eager implementation then runs for every layer and gives the model's own output).

Whatever cannot be proven is left out, and the reason is recorded in the adapter (``lacks``),
so that ``model.info()['missing']`` and the error for a missing point say why.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cloche.model.attention import attention_taps
from cloche.model.families import Adapter, Site, WeightRule

__all__ = ["discover", "discover_from_config"]

ATOL = 1e-4
_NORM = re.compile(r"(^|[._])(ln|norm|layernorm|layer_norm)([._\d]|$)|norm", re.IGNORECASE)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal up to rounding (a sum taken in another order); half precision rounds coarsely."""
    if a is None or b is None or a.shape != b.shape:
        return False
    if a.dtype == b.dtype == torch.float32:
        return bool(torch.allclose(a, b, atol=ATOL, rtol=ATOL))
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    scale = float(b.float().abs().max()) or 1.0
    return bool(torch.allclose(a.float(), b.float(), atol=8 * eps * scale, rtol=8 * eps))


def _path_of(modules: dict[str, nn.Module], module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((p for p, m in modules.items() if m is module), None)


def _outermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


class _Recorder:
    """Forward hooks that keep the first input and output tensor of chosen modules."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor | None] = {}
        self.outputs: dict[str, torch.Tensor | None] = {}
        #: modules whose output is a tuple (a block that returns (hidden, attention weights))
        self.tuples: set[str] = set()
        self.handles: list[Any] = []

    def watch(self, path: str, module: nn.Module) -> None:
        def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _input_tensor(args, kwargs)
            self.inputs[path] = None if x is None else x.detach().clone()

        def post(m: nn.Module, args: tuple, output: Any) -> None:
            y = _first_tensor(output)
            self.outputs[path] = None if y is None else y.detach().clone()
            if isinstance(output, tuple):
                self.tuples.add(path)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _activation(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    from transformers.activations import ACT2FN

    for name in ("hidden_act", "activation_function", "hidden_activation"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value in ACT2FN:
            act: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[value]
            return act
    return None


def discover(hf_model: nn.Module) -> Adapter | None:
    """An adapter holding every point of ``hf_model`` that checks out, or None if not even
    its blocks can be found and verified."""
    config: Any = hf_model.config
    model_type = str(getattr(config, "model_type", "unknown"))
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    modules = dict(hf_model.named_modules())
    lists = [p for p, m in modules.items() if isinstance(m, nn.ModuleList) and n > 0
             and len(m) == n and len({type(b) for b in m}) == 1]
    getter_in = getattr(hf_model, "get_input_embeddings", None)
    getter_out = getattr(hf_model, "get_output_embeddings", None)
    embed = _path_of(modules, getter_in() if callable(getter_in) else None)
    unembed = _path_of(modules, getter_out() if callable(getter_out) else None)
    if not lists or embed is None:
        return None
    layers = lists[0]
    lacks: dict[str, str] = {}
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    ids = (torch.arange(7) * 5 + 3).remainder(max(vocab, 1))[None, :]
    device = next(hf_model.parameters()).device
    ids = ids.to(device)

    # candidates: modules down to three levels inside every block, and norms outside them
    blocks = [f"{layers}.{i}" for i in range(n)]
    rel = [p[len(blocks[0]) + 1:] for p in modules if p.startswith(blocks[0] + ".")]
    rel = [r for r in rel if r.count(".") <= 2]
    finals = [p for p, m in modules.items()
              if _NORM.search(p.rsplit(".", 1)[-1]) and not p.startswith(layers + ".")
              and not any(True for _ in m.children()) and p != embed]
    recorder = _Recorder()
    try:
        for b in blocks:
            recorder.watch(b, modules[b])
            for r in rel:
                recorder.watch(f"{b}.{r}", modules[f"{b}.{r}"])
        for p in finals:
            recorder.watch(p, modules[p])
        with torch.no_grad():
            out = hf_model(input_ids=ids, output_hidden_states=True)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError):
        return None  # not a decoder that runs on token ids alone (an encoder-decoder, ...)
    finally:
        recorder.remove()
    hidden = getattr(out, "hidden_states", None)
    if hidden is None or len(hidden) != n + 1:
        return None
    ins, outs = recorder.inputs, recorder.outputs
    if not all(_close(ins.get(b), hidden[i]) for i, b in enumerate(blocks)):
        return None  # the blocks are not what output_hidden_states reports
    sites: dict[str, Site] = {"resid_pre": Site("", "input")}
    if all(_close(outs.get(b), hidden[i + 1]) for i, b in enumerate(blocks[:-1])):
        sites["resid_post"] = Site("", "output")
    else:
        lacks["resid_post"] = "block outputs do not match output_hidden_states"
    last = outs.get(blocks[-1])
    final_norm = next((p for p in finals if _close(ins.get(p), last)
                       and _close(outs.get(p), hidden[n])), None)

    def at(i: int, r: str, which: str = "out") -> torch.Tensor | None:
        return (outs if which == "out" else ins).get(f"{blocks[i]}.{r}")

    def every(check: Callable[[int], bool]) -> bool:
        return all(check(i) for i in range(n))

    def hidden_shaped(r: str) -> bool:
        def check(i: int) -> bool:
            x = at(i, r)
            return x is not None and x.shape == hidden[i].shape
        return every(check)

    names = {r: type(modules[f"{blocks[0]}.{r}"]).__name__ for r in rel}
    attn_c = _outermost([r for r in rel if "attention" in names[r].lower()
                         or r.rsplit(".", 1)[-1] in ("attn", "self_attn", "attention")])
    mlp_c = _outermost([r for r in rel if re.search(r"mlp|feedforward|ffn", names[r], re.I)
                        or r.rsplit(".", 1)[-1] in ("mlp", "feed_forward", "ffn", "ff")])
    attn = next((r for r in attn_c if hidden_shaped(r)), None)
    mlp = next((r for r in mlp_c if hidden_shaped(r)), None)
    parallel = False
    if attn is None or mlp is None:
        why = (f"no {'attention' if attn is None else 'MLP'} module was found in the blocks"
               " (looked for class names with Attention / MLP)")
        for s in ("attn.out", "resid_mid", "mlp.out"):
            lacks[s] = why
    else:
        parallel = _residual_sites(sites, lacks, n, hidden, [outs[b] for b in blocks], at,
                                   every, attn, mlp, rel)
        norms = [r for r in rel if _NORM.search(r.rsplit(".", 1)[-1])]

        def feeds(norm: str, reader: str) -> bool:
            return every(lambda i: _close(at(i, norm), at(i, reader, "in")))

        ln1 = next((r for r in norms if feeds(r, attn)), None)
        ln2 = next((r for r in norms if r != ln1 and feeds(r, mlp)), None)
        if ln1 is not None:
            sites["ln1"] = Site(ln1, "output")
        else:
            lacks["ln1"] = "no norm's output is what attention reads"
        if ln2 is not None:
            sites["ln2"] = Site(ln2, "output")
        elif parallel and ln1 is not None and every(
                lambda i: _close(at(i, ln1), at(i, mlp, "in"))):
            lacks["ln2"] = "attention and MLP read the same normalised input: use ln1"
        else:
            lacks["ln2"] = "no norm's output is what the MLP reads"
        linears = [r for r in rel if r.startswith(mlp + ".")
                   and isinstance(modules[f"{blocks[0]}.{r}"], nn.Linear)]
        if linears and every(lambda i: _close(at(i, linears[-1]), at(i, mlp))):
            sites["mlp.post"] = Site(linears[-1], "input")
            act = _activation(config)

            def activated(i: int) -> bool:
                first = at(i, linears[0])
                return (act is not None and first is not None
                        and _close(act(first), at(i, linears[-1], "in")))

            if len(linears) == 2 and every(activated):
                sites["mlp.pre"] = Site(linears[0], "output")
            else:
                lacks["mlp.pre"] = ("the MLP is not one Linear, the config's activation, one"
                                    " Linear (gated or otherwise unproven)")
                if len(linears) == 3:
                    lacks["mlp.pre_linear"] = "a gated MLP's halves are not proven by discovery"
        else:
            for s in ("mlp.pre", "mlp.post"):
                lacks[s] = "the MLP's output is not its last Linear's output"
    attention = attn if attn is not None and _taps_cover(hf_model, modules, blocks, attn,
                                                          out.logits) else None
    if attention is None:
        lacks.update(dict.fromkeys(
            ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z"),
            "the attention modules do not call transformers' AttentionInterface (or cloche's"
            " eager attention did not reproduce their output), so cloche cannot tap them"))
    global_weights = {"embed.W_E": WeightRule(f"{embed}.weight", "identity")}
    if unembed is not None:
        global_weights["unembed.W_U"] = WeightRule(f"{unembed}.weight", "linear_in_out")
    return Adapter(
        family=model_type,
        model_types=(model_type,),
        layers=layers,
        embed=embed,
        final_norm=final_norm,
        unembed=unembed or "",
        # the model's output is its logits only if it has a head (else no logits point)
        logits="" if unembed is not None and getattr(out, "logits", None) is not None
        else "(no head)",
        attention=attention,
        parallel=parallel,
        block_sites=sites,
        block_weights={},
        global_weights=global_weights,
        discovered=True,
        block_returns_tuple=blocks[0] in recorder.tuples,
        lacks=lacks,
        notes=((f"no cloche adapter for {model_type!r}: this structure was discovered and checked"
               " against output_hidden_states at load; per-head weights are not offered"),),
    )


def _residual_sites(sites: dict[str, Site], lacks: dict[str, str], n: int,
                    hidden: tuple[torch.Tensor, ...], post: list[torch.Tensor | None],
                    at: Callable[..., torch.Tensor | None], every: Callable[..., bool],
                    attn: str, mlp: str, rel: list[str]) -> bool:
    """attn.out, mlp.out and resid_mid if the block's sums prove them; True if parallel.

    Both kinds of block satisfy resid_post = resid_pre + attn.out + mlp.out, so a sequential
    block is recognised first, by a module that reads resid_pre + attn.out (its resid_mid).
    """

    def plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None or a.shape != b.shape:
            return None
        return (a.float() + b.float()).to(a.dtype)

    # sequential: some module reads resid_pre + attn.out, and the block adds mlp.out to it
    candidates = [r for r in rel if _NORM.search(r.rsplit(".", 1)[-1])] + [mlp]
    # (and is not simply resid_pre: attention must have changed something for this to prove it)
    mid = next((r for r in candidates if every(
        lambda i, r=r: _close(at(i, r, "in"), plus(hidden[i], at(i, attn))))
        and not every(lambda i, r=r: _close(at(i, r, "in"), hidden[i]))), None)
    if mid is not None and every(lambda i: _close(post[i], plus(at(i, mid, "in"),
                                                                at(i, mlp)))):
        sites["attn.out"] = Site(attn, "output")
        sites["resid_mid"] = Site(mid, "input_inplace")
        sites["mlp.out"] = Site(mlp, "output")
        return False
    # parallel: nothing reads resid_pre + attn.out, yet the block adds both outputs to resid_pre
    if every(lambda i: _close(post[i], plus(plus(hidden[i], at(i, attn)), at(i, mlp)))):
        sites["attn.out"] = Site(attn, "output")
        sites["mlp.out"] = Site(mlp, "output")
        lacks["resid_mid"] = ("attention and MLP run in parallel (both read resid_pre): no"
                              " residual stream exists between them; resid_pre + attn.out is"
                              " the nearest quantity")
        return True
    why = ("the attention and MLP outputs do not add up to the block output (a norm after them,"
           " or another structure cloche cannot prove)")
    for point in ("attn.out", "resid_mid", "mlp.out"):
        lacks[point] = why
    return False


def _taps_cover(hf_model: nn.Module, modules: dict[str, nn.Module], blocks: list[str],
                attn: str, logits: torch.Tensor | None) -> bool:
    """Whether every block's attention goes through cloche's probed attention, unchanged."""
    if logits is None:
        return False
    layer_of = {id(modules[f"{b}.{attn}"]): i for i, b in enumerate(blocks)}
    seen: set[int] = set()

    def apply(layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        seen.add(layer)
        return x

    vocab = logits.shape[-1]
    ids = (torch.arange(7) * 5 + 3).remainder(vocab)[None, :].to(logits.device)
    try:
        with torch.no_grad(), attention_taps(hf_model, layer_of, apply, lambda layer: True):
            tapped = hf_model(input_ids=ids)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError):
        return False  # cloche's eager attention does not fit this module: not tappable
    return seen == set(range(len(blocks))) and _close(getattr(tapped, "logits", None), logits)


#: blocks in the small copy that :func:`discover_from_config` checks
_COPY_LAYERS = 2


def discover_from_config(config: Any) -> Adapter | None:
    """:func:`discover` on a small copy of the architecture: ``config`` with two blocks and
    random weights, on the CPU in float32.

    For a model that is never whole in one process (a sharded one): what discovery proves is
    the structure (which module is the block list, which norm feeds attention, that the blocks
    add up), and that is the same in the copy, whose module paths are the model's own. Every
    block has the same class (discovery requires it), so two blocks stand for all of them.
    """
    import copy

    from cloche.model.loader import model_from_config

    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    if n <= 0:
        return None
    small = copy.deepcopy(config)
    k = min(n, _COPY_LAYERS)
    for name, value in list(vars(small).items()):  # per-layer settings (layer_types, ...)
        if isinstance(value, list) and len(value) == n and name != "architectures":
            setattr(small, name, value[:k])
    small.num_hidden_layers = k
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_from_config(small, torch.float32).eval()
    adapter = discover(model)
    if adapter is None:
        return None
    model_type = adapter.family
    return dataclasses.replace(adapter, notes=(
        (f"no cloche adapter for {model_type!r}: this structure was discovered on a two-block"
         " copy of the architecture with random weights (the model is never whole in one"
         " process) and checked there against output_hidden_states; per-head weights are not"
         " offered"),))
