"""GPU check for a lent GPU machine: a 1–8 B Llama-style model in bf16, capture-all, a reducer
over a dataset, a backward pass, and the NCCL path; throughput as ratios to the plain forward.

    python benchmarks/gpu_check.py                 # GPU: ~1.1 B params, bf16, batch 8x512
    python benchmarks/gpu_check.py --size 8b       # Llama-3-8B shape (8.0 B params)
    python benchmarks/gpu_check.py --size 3b       # ~3 B params
    python benchmarks/gpu_check.py --tiny          # CPU smoke test of this script (gloo)

What it does, in order (every step prints one line; nothing is asserted on timings):

1. builds a Llama-style model from a config with random weights (directly on the GPU, in
   bf16) and saves it with ``save_pretrained`` to a temporary directory;
2. plain Hugging Face forward throughput (tokens/s) — the baseline — and plain Hugging Face
   forward + backward of the next-token loss (the reference for cloche's backward);
3. cloche world size 1 (``cloche.load``), each as a ratio to the plain forward (higher is
   faster; the backward also as a ratio to the plain forward + backward):
   ``run`` with no probes; ``run`` with capture-all (``ctx.save`` at every canonical point,
   attention patterns included: the model runs eager attention then); ``run_dataset`` over
   ``--dataset-batches`` batches with a ``Mean`` reducer at every block's ``resid_post``;
   ``run(backward=True)`` with a gradient probe saving every block's ``resid_pre`` gradient;
4. cloche sharded over ``--world-size`` ranks, one process per GPU (default: every GPU, at
   least 2): NCCL for activations and gloo for control; checks logits against world size 1
   (max |Δ|), then ``run``, 4 micro-batches, capture (``resid_post`` of every block), the
   dataset reducer and the backward with ratios. On a single-GPU machine step 4 is skipped
   with that reason (NCCL needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time

import torch

SIZES = {  # Llama-style configs (parameters approximate, vocab 32000)
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 26,
           "num_attention_heads": 24, "num_key_value_heads": 8},
    # Llama-3-8B's published shape (its vocabulary is set below)
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity(cloche, device: str) -> None:
    """0. The shipped default model in float32 on ``device`` against the CPU: every canonical
    point, the logits and a gradient probe (max |delta|), so a CUDA-only bug shows at once."""
    points = [p.name for p in cloche.load().probe_points() if not p.name.startswith("module:")]
    text = ["The quick brown fox jumps over the lazy dog. " * 4]

    def saver(ctx, x):
        ctx.save(ctx.point, x.float().cpu())

    seen = {}
    for where in ("cpu", device):
        model = cloche.load(device=where)
        out = model.run(text, probes=dict.fromkeys(points, saver), save="parity",
                        grad_probes={"layers.0.resid_pre": saver}, backward=True)
        saved = model.save_context("parity")
        seen[where] = ({name: saved[name].fetch() for name in points},
                       saved["layers.0.resid_pre"].fetch(),
                       out.logits.float().cpu())
    (acts, grad, logits), (acts_d, grad_d, logits_d) = seen["cpu"], seen[device]
    worst = max(acts, key=lambda n: (acts[n] - acts_d[n]).abs().max().item())
    print(f"0. default model, {device} vs cpu (float32): {len(points)} points, worst"
          f" {worst} max |delta| {(acts[worst] - acts_d[worst]).abs().max().item():.3g};"
          f" logits {(logits - logits_d).abs().max().item():.3g}; resid_pre gradient"
          f" {(grad - grad_d).abs().max().item():.3g}", flush=True)
    features(cloche, device, text)


def features(cloche, device: str, text: list[str]) -> None:
    """0b. A TopK dictionary attached to the default model: its features, attribution patching
    and the attribution graph on ``device`` against the CPU (the same weights on both)."""
    from cloche import experiments as ex

    g = torch.Generator().manual_seed(0)
    d = cloche.load().d_model
    weights = {"W_enc": torch.randn(d, 4 * d, generator=g) * 0.3,
               "b_enc": torch.zeros(4 * d), "W_dec": torch.randn(4 * d, d, generator=g) * 0.05,
               "b_dec": torch.zeros(d)}
    seen = {}
    for where in ("cpu", device):
        model = cloche.load(device=where)
        model.attach_dictionary("gpu", weights, point="layers.1.resid_post",
                                architecture="topk", k=16)
        model.run(text, probes={"dict:gpu:features": lambda c, x: c.save("f", x.float().cpu())},
                  save="feat")
        scores = ex.attribution_patching(model, "The cat sat on the mat", "The dog sat on the mat",
                                         ex.patching.logit_diff(5, 6), progress=False)
        graph = ex.attribution_graph(model, text[0][:60], max_nodes=64, progress=False)
        seen[where] = (model.save_context("feat")["f"].fetch(),
                       scores["layers.1.resid_post"], graph)
    (f, s, gr), (f_d, s_d, gr_d) = seen["cpu"], seen[device]
    same = [n.id for n in gr.nodes] == [n.id for n in gr_d.nodes]
    print(f"0b. TopK dictionary at layers.1.resid_post, {device} vs cpu: features max |delta|"
          f" {(f - f_d).abs().max().item():.3g}; attribution patching at resid_post max |delta|"
          f" {abs(torch.as_tensor(s) - torch.as_tensor(s_d)).max().item():.3g}; attribution"
          f" graph {len(gr.nodes)} nodes, same nodes {same}, adjacency max |delta|"
          f" {abs(gr.adjacency - gr_d.adjacency).max() if same else float('nan'):.3g}"
          f" (largest entry {abs(gr.adjacency).max():.3g})", flush=True)


@contextlib.contextmanager
def serving(cloche, model):
    """A ``cloche.server.Server`` on 127.0.0.1 (this process) serving ``model``; yields a
    connected client."""
    from cloche.server import Server, ServerConfig

    token = secrets.token_hex(16)
    server = Server(model, ServerConfig(token=token, port=0))
    host, port = server.start()
    try:
        remote = cloche.connect(f"{host}:{port}", token=token)
        try:
            yield remote
        finally:
            remote.close()
    finally:
        server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test (tiny config, gloo)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dataset-batches", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=None)
    args = parser.parse_args()

    import transformers

    import cloche
    from cloche.data import Dataset
    from cloche.sharding.launch import start_local

    if args.tiny:
        args.size, args.batch, args.seq, args.repeats = "tiny", 2, 32, 2
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    world = args.world_size or (max(2, torch.cuda.device_count()) if cuda else 2)
    print(f"device {device} ({torch.cuda.get_device_name(0) if cuda else 'cpu'}),"
          f" {torch.cuda.device_count() if cuda else 0} GPUs, dtype {dtype},"
          f" torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    parity(cloche, device)
    vocab = 512 if args.tiny else (128256 if args.size == "8b" else 32000)
    config = transformers.LlamaConfig(vocab_size=vocab,
                                      max_position_embeddings=max(2048, args.seq),
                                      tie_word_embeddings=False, **SIZES[args.size])
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        with torch.device(device):
            torch.manual_seed(0)
            hf = transformers.LlamaForCausalLM(config).to(dtype)
        n_params = sum(p.numel() for p in hf.parameters())
        hf.save_pretrained(directory)
        print(f"1. built and saved {n_params / 1e9:.2f} B params in"
              f" {time.perf_counter() - started:.0f} s", flush=True)

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
        rows = torch.randint(0, config.vocab_size, (args.dataset_batches * args.batch, args.seq),
                             generator=g)
        dataset = Dataset(rows.tolist(), name="gpu_check", seq_len=args.seq, pad_id=0)
        tokens = args.batch * args.seq
        hf.eval()

        def plain() -> None:
            with torch.no_grad():
                hf(input_ids=ids.to(device))

        def plain_backward() -> None:
            x = ids.to(device)
            hf(input_ids=x, labels=x).loss.backward()
            hf.zero_grad(set_to_none=True)

        base = timed(plain, device, args.repeats)
        base_bw = timed(plain_backward, device, args.repeats)
        print(f"2. plain HF forward: {tokens / base:,.0f} tokens/s; forward + backward:"
              f" {tokens / base_bw:,.0f} tokens/s ({base / base_bw:.2f}x the forward)", flush=True)
        hf.set_attn_implementation("eager")  # what any tool that reads attention patterns runs
        base_eager = timed(plain, device, args.repeats)
        print(f"   plain HF forward, eager attention: {tokens / base_eager:,.0f} tokens/s"
              f" ({base / base_eager:.2f}x the default forward)", flush=True)
        hf = None  # free the baseline's memory before loading cloche's copy
        if cuda:
            torch.cuda.empty_cache()

        def saver(ctx, x):
            ctx.save(ctx.point, x)

        def mean(ctx, x):
            ctx.reduce(f"mean:{ctx.point}", x, cloche.Mean())

        blocks = range(config.num_hidden_layers)

        def capture(model, points) -> None:
            model.save_context("gpu_check").clear()
            model.run(ids, probes=dict.fromkeys(points, saver), save="gpu_check",
                      return_logits=False)
            model.save_context("gpu_check").clear()

        def reduce_dataset(model) -> None:
            model.save_context("gpu_reduce").clear()
            model.run_dataset(dataset, probes={f"layers.{i}.resid_post": mean for i in blocks},
                              save="gpu_reduce", batch_size=args.batch, progress=False)

        def backward(model) -> None:
            model.save_context("gpu_grad").clear()
            model.run(ids, grad_probes={f"layers.{i}.resid_pre": saver for i in blocks},
                      backward=True, save="gpu_grad", return_logits=False)
            model.save_context("gpu_grad").clear()

        def report(step: str, model, points: list[str]) -> None:
            t_run = timed(lambda: model.run(ids, return_logits=False), device, args.repeats)
            t_cap = timed(lambda: capture(model, points), device, args.repeats)
            t_red = timed(lambda: reduce_dataset(model), device, max(1, args.repeats // 2))
            t_bw = timed(lambda: backward(model), device, args.repeats)
            per_batch = t_red / args.dataset_batches
            print(f"{step} run {tokens / t_run:,.0f} tokens/s ({base / t_run:.2f}x plain forward)",
                  flush=True)
            print(f"   capture {len(points)} points {tokens / t_cap:,.0f} tokens/s"
                  f" ({base / t_cap:.2f}x plain forward, {base_eager / t_cap:.2f}x plain eager"
                  " forward)", flush=True)
            unpatterned = [p for p in points if not p.endswith((".pattern", ".scores"))]
            if len(unpatterned) < len(points):
                t_some = timed(lambda: capture(model, unpatterned), device, args.repeats)
                print(f"   capture {len(unpatterned)} points (no attention patterns or scores:"
                      f" the fused attention stays) {tokens / t_some:,.0f} tokens/s"
                      f" ({base / t_some:.2f}x plain forward)", flush=True)
            print(f"   run_dataset, Mean at {config.num_hidden_layers} points:"
                  f" {tokens / per_batch:,.0f} tokens/s ({base / per_batch:.2f}x plain forward)",
                  flush=True)
            print(f"   backward {tokens / t_bw:,.0f} tokens/s ({base / t_bw:.2f}x plain forward,"
                  f" {base_bw / t_bw:.2f}x plain forward + backward)", flush=True)

        local = cloche.load(directory, device=device, dtype=dtype)
        every = [p.name for p in local.probe_points() if not p.name.startswith("module:")]
        report("3. cloche ws1:", local, every)
        with serving(cloche, local) as remote:
            print(f"3b. remote (a server on 127.0.0.1 serving the {device} model, a client in"
                  " this process):", flush=True)
            report("   ", remote, [f"layers.{i}.resid_post" for i in blocks])
        reference = local.run(ids[:2, :64]).logits.float()
        local = None
        if cuda:
            torch.cuda.empty_cache()

        if cuda and torch.cuda.device_count() < world:
            print(f"4. skipped: world size {world} needs {world} GPUs for NCCL, this machine has"
                  f" {torch.cuda.device_count()}", flush=True)
            return 0
        started = time.perf_counter()
        dist = start_local(directory, world, backend="nccl" if cuda else "gloo",
                           device=device if cuda else None,
                           dtype=str(dtype).removeprefix("torch."), timeout_s=120,
                           threads=None if cuda else 1)
        try:
            print(f"4. sharded over {world} ranks {dist.info()['layers_per_rank']} in"
                  f" {time.perf_counter() - started:.0f} s", flush=True)
            delta = (dist.run(ids[:2, :64]).logits.float() - reference).abs().max().item()
            print(f"   logits vs world size 1: max |delta| = {delta:.3g}", flush=True)
            t_mb = timed(lambda: dist.run(ids, return_logits=False, micro_batches=4), device,
                         args.repeats)
            print(f"   4 micro-batches {tokens / t_mb:,.0f} tokens/s ({base / t_mb:.2f}x)",
                  flush=True)
            report("  ", dist, [f"layers.{i}.resid_post" for i in blocks])
        finally:
            dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
