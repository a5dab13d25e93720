"""``cloche demo``: the tutorial's steps, run as a client against a real server.

It starts ``cloche serve`` on the default model in a subprocess (or uses ``--connect ADDR``),
connects with the token, and then, with progress bars:

1. scores every head for previous-token, duplicate-token and induction behaviour;
2. zero-ablates the best induction head (and, for contrast, another head of the same layer)
   and reports the loss change on repeated random sequences;
3. picks a neuron with a sharp activation distribution and prints its top dataset examples
   with the peak token marked;
4. writes plots (head scores, the induction head's attention, the neuron's histogram and top
   context, a PCA of the residual stream, the connectivity graph) to the folder it names.

The CLI calls :func:`main`; it returns the process exit code.
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cloche import errors

__all__ = ["build_parser", "main", "run_demo"]

SKIP_FIRST = 4  # positions left out when choosing a neuron and its examples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloche demo",
        description="Find the default model's induction head, ablate it and read a neuron's "
                    "top examples — through a real cloche server.")
    parser.add_argument("--connect", metavar="ADDR", default=None,
                        help="use the server at host:port instead of starting one")
    parser.add_argument("--token", default=None,
                        help="the server's token for --connect (default: $CLOCHE_TOKEN)")
    parser.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                        help="model directory or hub name (org/name, via the Hugging Face cache)"
                             " for the server it starts (default: the shipped default model)")
    parser.add_argument("--dataset", default="default:heldout",
                        help="dataset for examples and statistics (default: default:heldout)")
    parser.add_argument("--limit", type=int, default=96,
                        help="examples of the dataset to use (default: 96)")
    parser.add_argument("--out", metavar="DIR", default="cloche-demo",
                        help="folder for the plots (default: ./cloche-demo)")
    parser.add_argument("--no-plots", action="store_true", help="print results only")
    parser.add_argument("--ui", action="store_true",
                        help="at the end, serve the web UI on 127.0.0.1 and print the links to"
                             " the neuron and the head it found (until Ctrl-C)")
    return parser


@contextmanager
def started_server(model_dir: str | None, token: str, timeout: float = 180.0) -> Iterator[str]:
    """``cloche serve --port 0`` in a subprocess; yields its address, stops it on exit."""
    cmd = [sys.executable, "-m", "cloche", "serve", "--port", "0", "--log-level", "WARNING"]
    if model_dir:
        cmd += ["--model", model_dir]
    # ``-m cloche`` puts the current folder first on sys.path: a clone named ``cloche`` there
    # would shadow the installed package (as a namespace package with no ``load``). The folder
    # that holds this very package goes first on PYTHONPATH, so the server imports this cloche.
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "CLOCHE_TOKEN": token,
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    stderr_lines: list[str] = []

    def pump(stream: Any, sink: Any, end: Any = None) -> None:
        for line in stream:
            sink(line)
        if end is not None:
            end()

    readers = [threading.Thread(target=pump, args=(proc.stdout, lines.put,
                                                   lambda: lines.put(None)), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, stderr_lines.append), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + timeout
        address = None
        while address is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                proc.terminate()
                proc.wait(timeout=20)
                readers[1].join(timeout=5)
                raise errors.ConnectionError("the server did not start: "
                                             + "".join(stderr_lines)[-2000:].strip())
            if line.startswith("listening on "):
                address = line.split("listening on ", 1)[1].strip()
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in readers:
            reader.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def say(text: str = "") -> None:
    print(text, flush=True)


def clone_warning(folder: Path) -> str | None:
    """What to tell a user whose current folder holds a folder named ``cloche`` that is not the
    package running now (a clone, say): ``import cloche`` and ``python -m cloche`` run from
    here would find that folder first. ``None`` when there is none."""
    candidate = folder / "cloche"
    installed = Path(__file__).resolve().parents[1]
    if not candidate.is_dir() or candidate.resolve() == installed:
        return None
    return (f"note: {candidate} is a folder named cloche (a clone?). From this folder,"
            " `import cloche` and `python -m cloche` would import it instead of the installed"
            f" package ({installed}); this demo's server uses the installed one. Run notebooks"
            " from another folder, or install the clone with `pip install -e ./cloche`.")


def _table(scores: np.ndarray) -> str:
    head = "        " + " ".join(f"  h{h:<4}" for h in range(scores.shape[1]))
    rows = [f"  L{i:<4} " + " ".join(f"{v:7.3f}" for v in row) for i, row in enumerate(scores)]
    return "\n".join([head, *rows])


def _pick_neuron(model: Any, point: str, dataset: Any, limit: int) -> tuple[int, dict]:
    """The neuron whose maximum stands furthest above its spread (a sparse, peaky unit)."""
    from cloche import MinMax, Variance

    def probe(ctx: Any, x: Any) -> None:
        # past the first few positions, where units fire on the lack of context
        rows = x[:, SKIP_FIRST:][ctx.attention_mask[:, SKIP_FIRST:].bool()]
        ctx.reduce("var", rows, Variance())
        ctx.reduce("range", rows, MinMax())

    name = f"exp/demo/{secrets.token_hex(6)}"
    try:
        out = model.run_dataset(dataset, probes={point: probe}, save=name, limit=limit,
                                progress=True)
    finally:
        model.save_context(name).clear()
    std = np.asarray(out["reducers"]["var"]["std"], dtype=float)
    top = np.asarray(out["reducers"]["range"]["max"], dtype=float)
    mean = np.asarray(out["reducers"]["var"]["mean"], dtype=float)
    score = (top - mean) / np.maximum(std, 1e-6)
    unit = _readable_neuron(model, point, np.nan_to_num(score, nan=-np.inf))
    return unit, {"max": float(top[unit]), "mean": float(mean[unit]), "std": float(std[unit])}


def _readable(token: str) -> bool:
    """A token a reader can make sense of: printable, with at least two letters or digits."""
    text = token.strip()
    return ("\ufffd" not in text and text.isprintable()
            and sum(c.isalnum() for c in text) >= 2)


def _readable_neuron(model: Any, point: str, score: np.ndarray, candidates: int = 20) -> int:
    """Of the ``candidates`` peakiest neurons, the first whose most promoted tokens read as
    words (the tour prints them), else the peakiest."""
    from cloche import experiments as ex

    order = [int(i) for i in np.argsort(-score, kind="stable")[:candidates]]
    for unit in order:
        promoted = [t for t, _ in ex.logit_effect(model, (point, unit), k=5)["top"]]
        if sum(_readable(t) for t in promoted) >= 4:
            return unit
    return order[0]


def run_demo(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The tutorial's steps on ``model`` (local or remote); returns what it found."""
    from tqdm.auto import tqdm

    from cloche import experiments as ex

    found: dict[str, Any] = {}
    info = model.info()
    say(f"model: {info['name']} ({info['family']}, {info['n_layers']} layers × "
        f"{info['n_heads']} heads, d_model {info['d_model']}, vocab {info['d_vocab']})")

    say("\n[1/4] head scores on random token sequences repeated twice")
    scores: dict[str, np.ndarray] = {}
    for kind in tqdm(ex.heads.HEAD_SCORE_KINDS, desc="head scores", leave=False):
        scores[kind] = ex.head_scores(model, kind)
    for kind, table in scores.items():
        say(f"  {kind}:\n{_table(table)}")
    layer, head, score = ex.top_heads(scores["induction"], 1)[0]
    row = scores["induction"][layer]
    heads = [h for h in range(model.n_heads) if row[h] >= max(0.3, score / 2)] or [head]
    found["induction_head"] = (layer, head, score)
    found["induction_heads"] = [(layer, h, float(row[h])) for h in heads]
    say(f"  -> induction head: layers.{layer}.attn.head.{head} (score {score:.3f})")
    if len(heads) > 1:
        say(f"     (and {len(heads) - 1} more in layer {layer}: heads {heads})")

    say("\n[2/4] zero-ablating the induction head(s) on repeated random sequences")
    tokens = ex.repeated_tokens(model, batch=16, half=32, seed=1)
    hit = ex.ablate(model, [f"layers.{layer}.attn.head.{h}" for h in heads], tokens)
    found["ablation"] = {"heads": heads, "clean": hit.loss_clean, "ablated": hit.loss_ablated,
                         "relative": hit.relative}
    say(f"  loss {hit.loss_clean:.3f} -> {hit.loss_ablated:.3f} ({hit.relative:+.0%}) "
        f"without head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))}")
    others = [h for h in range(model.n_heads) if h not in heads]
    if others:
        other = int(np.random.default_rng(0).choice(others))
        miss = ex.ablate(model, f"layers.{layer}.attn.head.{other}", tokens)
        found["ablation"].update(other_head=other, other=miss.loss_ablated,
                                 other_relative=miss.relative)
        say(f"  loss {miss.loss_clean:.3f} -> {miss.loss_ablated:.3f} ({miss.relative:+.0%}) "
            f"without head {other} (for contrast)")

    point = f"layers.{model.n_layers - 1}.mlp.post"
    say(f"\n[3/4] a neuron of {point} and its top examples in {args.dataset}")
    unit, summary = _pick_neuron(model, point, args.dataset, args.limit)
    found["neuron"] = (point, unit, summary)
    say(f"  neuron {unit}: max {summary['max']:.3f}, mean {summary['mean']:.3f}, "
        f"std {summary['std']:.3f}")
    examples = ex.top_examples(model, point, unit, args.dataset, k=8, limit=args.limit,
                               progress=True, skip_first=SKIP_FIRST)
    found["examples"] = examples
    for e in examples:
        say(f"  {e.activation:+7.3f}  #{e.example_id:<4} {e.context!r}")
    effect = ex.logit_effect(model, (point, unit), k=5)
    say("  promotes: " + ", ".join(repr(t) for t, _ in effect["top"]))

    if not args.no_plots:
        say(f"\n[4/4] plots -> {Path(args.out).resolve()}")
        found["plots"] = write_plots(model, args, scores, (layer, head), point, unit, examples)
        for path in found["plots"]:
            say(f"  {path}")
    return found


def write_plots(model: Any, args: argparse.Namespace, scores: dict[str, np.ndarray],
                induction: tuple[int, int], point: str, unit: int, examples: list) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cloche import experiments as ex
    from cloche.experiments import plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(ax: Any, name: str) -> None:
        path = out / name
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=110)
        plt.close(ax.figure)
        written.append(path)

    for kind, table in scores.items():
        save(plots.head_scores(table, title=f"{kind} scores"), f"head_scores_{kind}.png")
    layer, head = induction
    seq = ex.repeated_tokens(model, batch=1, half=12, seed=2)[0]
    att = ex.attention_patterns(model, seq, layer, heads=head)
    save(plots.attention_pattern(att["pattern"][0], att["tokens"],
                                 title=f"layers.{layer}.attn.head.{head} on a repeated sequence"),
         "induction_attention.png")
    stats = ex.units.stats(model, point, unit, args.dataset, limit=args.limit, progress=True)
    save(plots.activation_histogram(stats, title=f"{point}[{unit}]"), "neuron_histogram.png")
    if examples:
        best = examples[0]
        view = ex.units.activations(model, point, unit, best.token_ids)
        save(plots.token_heatmap(view.tokens[0], view.values[0, :, 0],
                                 title=f"{point}[{unit}] on its top context"),
             "neuron_top_context.png")
    resid = f"layers.{model.n_layers - 1}.resid_post"
    result = ex.pca(model, resid, args.dataset, n_components=2, limit=args.limit, progress=True)
    drawn = ex.sample(model, resid, args.dataset, n=1500, limit=args.limit, progress=True)
    save(plots.pca_scatter(result.transform(drawn.activations), colors=drawn.positions,
                           title=f"PCA of {resid} (colour: position)"), "resid_pca.png")
    save(plots.connectivity_graph(ex.connectivity_summary(model)), "connectivity.png")
    return written


#: ``ui(model, found)``: serves the web UI for what the tour found (the CLI passes it, since
#: the experiments layer cannot import the UI, which is built on it)
UIHook = Callable[[Any, dict[str, Any]], None]


def main(argv: Sequence[str] | None = None, ui: UIHook | None = None) -> int:
    """Entry point of ``cloche demo``; returns the exit code."""
    from cloche import connect

    args = build_parser().parse_args(argv)
    warning = clone_warning(Path.cwd())
    if warning:
        say(warning)
    if args.ui and ui is None:
        say("cloche demo: --ui needs the cloche command line (python -m cloche demo --ui)")
        return 2

    def tour(model: Any) -> None:
        found = run_demo(model, args)
        if args.ui and ui is not None:
            ui(model, found)

    try:
        if args.connect:
            token = args.token or os.environ.get("CLOCHE_TOKEN")
            if not token:
                say("cloche demo: --connect needs --token or $CLOCHE_TOKEN")
                return 2
            with connect(args.connect, token=token, timeout=120) as model:
                tour(model)
            return 0
        token = secrets.token_urlsafe(24)
        say("starting a cloche server on "
            + (args.model or "the default model") + " (a few seconds)...")
        with started_server(args.model, token) as address:
            say(f"server at {address}; connecting as a client")
            with connect(address, token=token, timeout=120) as model:
                tour(model)
        return 0
    except errors.ClocheError as exc:
        say(f"cloche demo: error: {exc}")
        return 2
    except RuntimeError as exc:
        say(f"cloche demo: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
