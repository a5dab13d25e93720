"""The ``cloche`` command line: ``cloche serve``, ``check``, ``status``, ``plan``, ``ui`` and
``demo``.

Each subcommand is a small trio: ``add_<name>_parser`` declares its flags, a function turns the
parsed flags into configuration objects, ``run_<name>`` does the work. This is the only place
that reads ``sys.argv`` or the environment (``CLOCHE_TOKEN``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cloche.errors import ClocheError, UsageError

__all__ = ["build_parser", "main", "parse_duration", "parse_size", "serve_config"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` -> bytes (k/M/G/T are powers of 1024)."""
    from cloche.server import principals

    try:
        return principals.parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_size_or_none(text: str) -> int | None:
    """A size, or ``"none"`` for no cap."""
    return None if text.strip().lower() in ("none", "never", "off") else parse_size(text)


def default_saved_cap() -> int | None:
    """Half of the machine's physical memory: saved data never takes the whole machine down
    by default (None where the platform cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return None


def parse_duration(text: str) -> float | None:
    """``"90"`` (seconds), ``"30m"``, ``"2h"``, ``"1d"``; ``"never"`` or ``"0"`` -> None."""
    if text.strip().lower() in ("never", "none", "0"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 3600, 30m, 2h, never)")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[(match.group(2) or "s").lower()]
    return float(match.group(1)) * scale


# --------------------------------------------------------------------------------- serve


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="serve a model to cloche clients",
        description=(
            "Load a model and serve it to `cloche.connect(...)` clients. Clients must know the "
            "token: it is read from --token-file, else from $CLOCHE_TOKEN, else generated and "
            "printed. The server listens on loopback unless --host says otherwise; anyone with "
            "the token can run code on this machine, so use TLS and a strong token off loopback."
        ),
    )
    parser.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                        help="Hugging Face model to load: a directory saved with save_pretrained,"
                             " or a hub name such as org/name, resolved through the Hugging Face"
                             " cache (downloaded if missing; HF_HUB_OFFLINE=1 uses the cache"
                             " alone) (default: the model shipped with cloche)")
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="branch, tag or commit of a hub --model (default: main)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, loopback only; "
                             "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7450,
                        help="TCP port (default: 7450; 0 picks a free port, printed at start)")
    parser.add_argument("--token-file", metavar="FILE", default=None,
                        help="file holding the token, readable only by you (chmod 600) and at"
                             " least 16 characters long; or one 'name token"
                             " [max-saved-bytes=SIZE] [share=N]' line per principal of a team,"
                             " each seeing only its own sessions (default: $CLOCHE_TOKEN, else a"
                             " random token is generated and printed)")
    parser.add_argument("--tls-cert", metavar="PEM", default=None,
                        help="serve TLS with this certificate (chain) file; clients pass "
                             "tls=True or tls='ca.pem'")
    parser.add_argument("--tls-key", metavar="PEM", default=None,
                        help="private key for --tls-cert (if not inside the certificate file)")
    parser.add_argument("--insecure-no-tls", action="store_true",
                        help="serve off loopback without TLS (refused otherwise): only the"
                             " handshake is protected, so anyone on the network path can read"
                             " the traffic and inject code that runs as this user")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="never send replies to clients on this machine through shared"
                             " memory (memfd), only over the socket (default: offered to"
                             " clients that can prove they run on this host as this user)")
    parser.add_argument("--max-saved-bytes", type=parse_size_or_none, default=default_saved_cap(),
                        metavar="SIZE",
                        help="cap on memory held by save contexts of all sessions (on each rank"
                             " when sharded), e.g. 8GiB, or 'none'; a run that would exceed it"
                             " fails with ResourceLimit and is rolled back (default: half of"
                             " this machine's memory)")
    parser.add_argument("--session-idle-expiry", type=parse_duration, default=24 * 3600.0,
                        metavar="DURATION",
                        help="drop a session and its save contexts after it has had no "
                             "connection for this long: 3600, 30m, 2h, never (default: 24h)")
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="keep sessions and every committed save context in DIR, written "
                             "before each run returns (crash-consistent); a restarted server "
                             "finds them there and clients reconnect to their sessions "
                             "(default: in memory only; a restart loses them)")
    parser.add_argument("--request-timeout", type=parse_duration, default=None,
                        metavar="DURATION",
                        help="stop any request that runs longer than this (30s, 10m, 1h), even "
                             "inside a probe or shipped function stuck in a loop; the client gets "
                             "Cancelled and the run is rolled back (default: no limit)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to load the model on (default: cpu)")
    parser.add_argument("--dtype", default=None,
                        help="load the weights in this dtype: float32, bfloat16, float16, or auto"
                             " (as saved in config.json) (default: float32)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (torch.set_num_threads) for the server and, "
                             "with --world-size, each rank (default: torch's own choice)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="server log verbosity on stderr (default: INFO)")
    parser.add_argument("--ui", action="store_true",
                        help="also serve the web UI for this model on 127.0.0.1 (its URL, with"
                             " a per-launch secret, is printed)")
    sharding = parser.add_argument_group(
        "sharding", "serve one model over several processes (layer pipeline, torch.distributed; "
        "see docs/distributed.md for torchrun across machines)")
    sharding.add_argument("--world-size", type=int, default=1, metavar="N",
                      help="number of ranks to start on this machine; each loads only its own "
                           "layers (default: 1, no sharding)")
    sharding.add_argument("--layers-per-rank", default=None, metavar="A,B,...",
                      help="override the balanced split, e.g. 3,5 (must sum to the layer count)")
    sharding.add_argument("--micro-batches", type=int, default=1, metavar="M",
                      help="split each batch into M micro-batches so ranks overlap (default: 1)")
    sharding.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                      help="tensor backend (default: nccl on GPUs, gloo on CPU)")
    sharding.add_argument("--worker-timeout", type=parse_duration, default=60.0, metavar="DURATION",
                      help="a rank silent for this long is declared lost: clients get WorkerLost "
                           "and the server exits with code 3 (default: 60s)")
    sharding.add_argument("--torchrun", action="store_true",
                      help="run as one rank under torchrun (rank, world size and rendezvous from "
                           "its environment); rank 0 serves, the others obey it")
    sharding.add_argument("--store-port-offset", type=int, default=1, metavar="K",
                      help="with --torchrun: cloche's control store listens on MASTER_PORT + K "
                           "(default: 1)")
    parser.set_defaults(func=run_serve)
    return parser


def resolve_token(token_file: str | None, environ: Mapping[str, str]
                  ) -> tuple[str | None, tuple[Any, ...], bool]:
    """(token, principals, generated): the token file's principals (or its one token), else
    $CLOCHE_TOKEN, else a fresh random token.

    Like ssh with a private key, a token file that other users can read or write is refused.
    A file with one word holds the server's token; a file with ``name token [options]`` lines
    names several principals (``cloche.server.principals``).
    """
    if token_file is not None:
        from cloche.server.principals import OWNER, parse_principals

        try:
            with open(token_file, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {token_file!r}: {exc}") from exc
        if os.name == "posix" and mode & 0o077:
            raise UsageError(
                f"--token-file {token_file!r} is accessible by other users (mode"
                f" {stat.S_IMODE(mode):03o}): anyone who reads the token can run code as this"
                f" user. Restrict it to yourself: chmod 600 {token_file}")
        principals = parse_principals(text, f"--token-file {token_file!r}")
        if len(principals) == 1 and principals[0].name == OWNER:
            return principals[0].token, (), False
        return None, tuple(principals), False
    token = environ.get("CLOCHE_TOKEN", "").strip()
    if token:
        return token, (), False
    return secrets.token_urlsafe(24), (), True


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Any, bool]:
    """The :class:`ServerConfig` for parsed ``serve`` flags, and whether the token is new."""
    from cloche.server.config import ServerConfig

    token, principals, generated = resolve_token(args.token_file, environ)
    config = ServerConfig(
        token=token, principals=principals, host=args.host, port=args.port, tls_cert=args.tls_cert,
        tls_key=args.tls_key, session_idle_expiry=args.session_idle_expiry,
        request_timeout=args.request_timeout, state_dir=args.state_dir,
        insecure_no_tls=args.insecure_no_tls, max_saved_bytes=args.max_saved_bytes,
        shared_memory=not args.no_shared_memory,
    )
    return config, generated


def warn_if_insecure(config: Any) -> None:
    """The loud warning for ``--insecure-no-tls`` off loopback (stderr, before serving)."""
    from cloche.server.config import is_loopback

    if config.tls_cert is None and not is_loopback(config.host):
        print(f"cloche: WARNING: serving on {config.host or 'every interface'} without TLS"
              " (--insecure-no-tls). Only the handshake is protected: anyone on the network"
              " path can read every request and result, and inject requests that run code as"
              " this user. Use --tls-cert/--tls-key unless every machine on the path is"
              " trusted.", file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace) -> Any:
    import cloche

    if args.state_dir is not None:  # tokenized datasets are cached with the server's state
        cloche.data.set_cache_dir(os.path.join(args.state_dir, "datasets"))
    return cloche.load(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                       state_dir=args.state_dir)  # the server applies --max-saved-bytes


def _layers_per_rank(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"--layers-per-rank must be comma-separated ints, not {text!r}") from exc


def serve_until_stopped(model: Any, config: Any, generated: bool, ui: bool = False) -> None:
    """Serve ``model`` (local or sharded) until SIGINT/SIGTERM, then shut down cleanly; with
    ``ui`` also the web UI on loopback (its URL printed after the listening line)."""
    from cloche.server.app import Server

    server = Server(model, config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    host, port = server.start()
    print(f"cloche: serving {model.name} ({model.n_layers} layers) on {model.device}", flush=True)
    if generated:
        print(f"cloche: token {config.token}", flush=True)
    print(f"listening on {host}:{port}", flush=True)
    web = None
    if ui:
        from cloche.ui import start_ui

        web = start_ui(model)
        print(f"cloche: web UI at {web.url()}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if web is not None:
            web.stop()
        server.shutdown()
        print("cloche: server stopped", flush=True)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    config, generated = serve_config(args, os.environ)
    warn_if_insecure(config)
    if args.world_size < 1:
        raise UsageError(f"--world-size ({args.world_size}) must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads ({args.threads}) must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.torchrun:
        if generated:
            raise UsageError("under --torchrun every node needs the same token (the ranks"
                             " authenticate each other with it): set CLOCHE_TOKEN or pass"
                             " --token-file on every node")
        from cloche.default_model import weights_dir
        from cloche.sharding.worker import config_from_env, model_directory, run_rank

        dist_config = config_from_env(
            dict(os.environ), model_dir=(model_directory(args.model, args.revision)
                                         if args.model else str(weights_dir())),
            layers_per_rank=args.layers_per_rank, backend=args.backend,
            device=None if args.device == "cpu" else args.device, dtype=args.dtype,
            timeout_s=args.worker_timeout or 60.0, micro_batches=args.micro_batches,
            threads=args.threads, store_port_offset=args.store_port_offset,
            token=config.group_secret, state_dir=args.state_dir)
        return run_rank(dist_config,
                        lambda model: serve_until_stopped(model, config, generated, args.ui))
    if args.world_size == 1:
        serve_until_stopped(load_model(args), config, generated, args.ui)
        return 0
    from cloche.default_model import weights_dir
    from cloche.sharding.launch import serve_distributed

    return serve_distributed(
        args.model or weights_dir(), args.world_size,
        lambda model: serve_until_stopped(model, config, generated, args.ui),
        revision=args.revision,
        layers_per_rank=_layers_per_rank(args.layers_per_rank), backend=args.backend,
        device=None if args.device == "cpu" else args.device, dtype=args.dtype,
        timeout_s=args.worker_timeout or 60.0, micro_batches=args.micro_batches,
        threads=args.threads, state_dir=args.state_dir)


# --------------------------------------------------------------------------------- check


def add_check_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "check",
        help="check a model: probe points, ablations, gradients, aliases and sharding against"
             " plain transformers",
        description=(
            "Run cloche's parity battery on a checkpoint and print one row per check: every"
            " canonical probe point against transformers' own reference (output_hidden_states,"
            " output_attentions with eager attention, logits), a run without probes bit-equal to"
            " plain transformers, a neuron and a head ablation against the equivalent weight"
            " edits, gradient probes against autograd (causal models), TransformerLens aliases,"
            " and with --world-size N the model sharded over N ranks against one process. Each"
            " row gives the points covered, the largest difference, the tolerance and PASS,"
            " FAIL or SKIP with the reason. Exits 0 only if nothing fails (1 otherwise)."),
    )
    parser.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                        help="the checkpoint: a directory saved with save_pretrained or a hub"
                             " name (org/name) (default: the model shipped with cloche)")
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="branch, tag or commit of a hub --model (default: main)")
    parser.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="also shard the model over N ranks of this machine and compare"
                             " every point with the single process (default: 1, not checked)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 or auto; tolerances follow the dtype"
                             " (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--text", default=None,
                        help="check on this text (needs the model's tokenizer) instead of seeded"
                             " token ids")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the token ids (2 sequences of 12 tokens, within the"
                             " vocabulary and the positions) (default: 0)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the results to FILE as JSON")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads here and on each rank (default: torch's)")
    parser.set_defaults(func=run_check)
    return parser


def run_check(args: argparse.Namespace) -> int:
    from cloche.check import check

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads ({args.threads}) must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    report = check(args.model, revision=args.revision,
                   world_size=args.world_size, dtype=args.dtype, device=args.device,
                   text=args.text, seed=args.seed, threads=args.threads,
                   progress=lambda step: print(f"cloche check: {step}", file=sys.stderr,
                                               flush=True))
    d = report.details
    print(f"cloche check: {report.model} ({d['family']}, {d['n_layers']} layers, {d['dtype']},"
          f" {d['device']}) on {d['inputs']}")
    print(report.table(), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json() + "\n")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------- plan


def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "plan", help="how a model splits over N ranks and what each rank needs in memory",
        description=(
            "Build the model on the meta device from its config (no weights are read or"
            " downloaded), split its layers exactly as `cloche serve --world-size N` does and"
            " print per rank: the layers it owns, its parameters, its weight bytes in --dtype,"
            " an estimate of activation and KV-cache memory for --batch x --seq tokens, and"
            " whether it fits --device-memory; plus the smallest world size that fits."))
    parser.add_argument("--model", metavar="DIR|org/name|config.json", required=True,
                        help="a model directory, a config.json file, or a hub name (only its"
                             " config.json is fetched)")
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="branch, tag or commit of a hub --model (default: main)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="number of ranks (default: the smallest world size that fits)")
    parser.add_argument("--layers-per-rank", default=None, metavar="A,B,...",
                        help="an explicit split, as `cloche serve --layers-per-rank`")
    parser.add_argument("--dtype", default=None,
                        help="dtype of the weights: float32, bfloat16, float16 or auto (as in"
                             " config.json) (default: float32, as cloche serve)")
    parser.add_argument("--device-memory", type=parse_size, default="80GiB", metavar="SIZE",
                        help="memory of one device, e.g. 80GiB, 24GiB (default: 80GiB)")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="sequences per batch for the activation estimate (default: 1)")
    parser.add_argument("--seq", type=int, default=2048, metavar="T",
                        help="tokens per sequence for the activation estimate (default: 2048)")
    parser.add_argument("--json", action="store_true",
                        help='print only {"world_size", "total_parameters", "ranks": [{"rank",'
                             ' "layers": [first, last], "parameters", "weight_bytes",'
                             ' "activation_bytes", "fits"}]}')
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    import json

    from cloche.sharding.capacity import plan_capacity

    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world-size ({args.world_size}) must be at least 1")
    report = plan_capacity(args.model, args.world_size, revision=args.revision, dtype=args.dtype,
                           device_memory=args.device_memory, batch=args.batch, seq=args.seq,
                           layers_per_rank=_layers_per_rank(args.layers_per_rank))
    print(json.dumps(report.as_json()) if args.json else report.table())
    return 0


# --------------------------------------------------------------------------------- status


def add_status_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "status", help="what a running server is doing: queue, running request, sessions, memory",
        description=("Connect to a cloche server and print what it is doing: the request running"
                     " now and for how long, the queue (your principal's requests named, other"
                     " principals' counted), sessions, connections and memory."))
    parser.add_argument("address", nargs="?", default=None,
                        help="host:port of the server (default: $CLOCHE_ADDRESS)")
    parser.add_argument("--token-file", metavar="FILE", default=None,
                        help="file holding your token (default: $CLOCHE_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(func=run_status)
    return parser


def run_status(args: argparse.Namespace) -> int:
    import json

    from cloche import connect

    token = None  # connect() falls back to $CLOCHE_TOKEN
    if args.token_file is not None:
        token, _, _ = resolve_token(args.token_file, {})
        if token is None:
            raise UsageError(f"--token-file {args.token_file!r} names several principals: give"
                             " cloche status a file holding your own token")
    with connect(args.address, token=token) as model:
        status = model.server_status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status dict as the few lines ``cloche status`` prints."""
    def who(job: dict[str, Any]) -> str:
        if job["yours"]:
            return f"{job['request']} (yours)"
        return job["request"] or "a request of another principal"

    mem = status["memory"]
    rss = "?" if mem.get("rss_bytes") is None else f"{mem['rss_bytes'] / 2**20:.0f} MiB"
    lines = [(f"{status['model']} (world size {status['world_size']}), up"
             f" {status['uptime_s']:.0f} s; you are {status['principal']}, session"
             f" {status['session'][:8]}"),
             (f"sessions {status['sessions']} ({status['your_sessions']} yours), connections"
             f" {status['connections']}, memory {rss} (peak"
             f" {mem['peak_rss_bytes'] / 2**20:.0f} MiB)")]
    running = status["running"]
    lines.append("running: nothing" if running is None else
                 f"running: {who(running)} for {running['seconds']:.1f} s")
    lines.append(f"queue: {len(status['queue'])} waiting")
    lines += [f"  {q['position']}. {who(q)}" for q in status["queue"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- ui


def add_ui_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "ui", help="look at a model in your browser: neurons, heads, texts",
        description=(
            "Start the web UI on 127.0.0.1 and print its URL, which carries a per-launch secret"
            " (open it in your browser; nothing is opened for you). With no flag it shows the"
            " shipped default model, loaded here; --model loads another here; --connect uses a"
            " running cloche server (sharded or not) with $CLOCHE_TOKEN or --token-file."))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                       help="load this model here: a directory or a hub name (org/name)")
    where.add_argument("--connect", metavar="HOST:PORT", default=None,
                       help="use the cloche server at HOST:PORT")
    parser.add_argument("--token-file", metavar="FILE", default=None,
                        help="with --connect: file holding the server's token"
                             " (default: $CLOCHE_TOKEN)")
    parser.add_argument("--port", type=int, default=0,
                        help="port of the web UI on 127.0.0.1 (default: 0, a free port)")
    parser.add_argument("--dataset", default="default:heldout",
                        help="dataset for unit pages (default: default:heldout)")
    parser.add_argument("--limit", type=int, default=512,
                        help="examples of the dataset a unit page reads (default: 512)")
    parser.add_argument("--device", default="cpu", help="torch device for --model (default: cpu)")
    parser.set_defaults(func=run_ui)
    return parser


def run_ui(args: argparse.Namespace) -> int:
    import cloche
    from cloche.ui import start_ui

    if args.limit < 1:
        raise UsageError(f"--limit ({args.limit}) must be at least 1")
    if args.connect is not None:
        token = None  # connect() falls back to $CLOCHE_TOKEN
        if args.token_file is not None:
            token, _, _ = resolve_token(args.token_file, {})
            if token is None:
                raise UsageError(f"--token-file {args.token_file!r} names several principals:"
                                 " give cloche ui a file holding your own token")
        model = cloche.connect(args.connect, token=token)
    else:
        model = cloche.load(args.model, device=args.device)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with model, start_ui(model, port=args.port, dataset=args.dataset, limit=args.limit) as web:
        print(web.url(), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


# --------------------------------------------------------------------------------- demo


def serve_demo_ui(model: Any, found: dict[str, Any]) -> None:
    """``cloche demo --ui``: the web UI on what the tour found; its last lines are the links
    to the neuron and the head; serves until Ctrl-C (or SIGTERM)."""
    from cloche.ui import start_ui

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    layer, head, _ = found["induction_head"]
    point, unit, _ = found["neuron"]
    with start_ui(model) as web:
        print("\nweb UI (Ctrl-C to stop):", flush=True)
        print(f"  neuron: {web.url('unit', point=point, unit=unit)}", flush=True)
        print(f"  head:   {web.url('head', layer=layer, head=head)}", flush=True)
        while not stop.wait(0.5):
            pass


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "demo", add_help=False,
        help="tour the default model: find its induction head, ablate it, read a neuron "
             "(`cloche demo --help` for its flags)")
    # listed here for `cloche --help`; main() hands `demo ...` to cloche.experiments.demo
    return parser


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloche",
        description="cloche: a self-hostable server and client for interpretability research.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_check_parser(sub)
    add_status_parser(sub)
    add_plan_parser(sub)
    add_ui_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags (argparse would eat `--help`)
        from cloche.experiments.demo import main as demo_main

        return demo_main(argv[1:], ui=serve_demo_ui)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClocheError as exc:
        print(f"cloche: error: {exc}", file=sys.stderr)
        return 2
