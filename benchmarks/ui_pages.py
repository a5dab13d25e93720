"""How fast the web UI answers, on this CPU with the default model (a benchmark, not a test).

Two figures the UI promises: a page whose data is cached renders in the browser in under
300 ms, and a cold unit (neuron) page over 512 held-out examples is computed in under 5 s.

- **cold unit page**: a fresh UI (empty cache), the unit page's data for one neuron of
  ``layers.1.mlp.post`` over the first 512 held-out examples, timed from the request to the
  last line of the stream (two dataset passes with reducers, one batched run of the chosen
  examples, the direct effect); a different neuron each round, so nothing is cached.
- **cached page render (browser)**: headless Chromium (Debian's, through Playwright) loading
  the unit, model and text pages a second time: from navigation to the page's ``data-ready``
  mark (HTML, scripts, the cached JSON, the SVG drawn). Skipped where no Chromium exists.
- **cached API answer**: the same cached data over plain HTTP (the server's share of it).
- **bare dataset pass**: the baseline, ``run_dataset`` over the same examples with a no-op
  probe at the same point (one forward pass, nothing kept), interleaved with the cold pages.

Run: ``PYTHONPATH=. python benchmarks/ui_pages.py [--rounds 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import httpx
import torch

import cloche
from cloche.ui import start_ui

POINT = "layers.1.mlp.post"
TEXT = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def stream_seconds(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    with client.stream("GET", url, timeout=600) as response:
        last = ""
        for line in response.iter_lines():
            last = line or last
    elapsed = time.perf_counter() - start
    if '"type": "result"' not in last:
        raise RuntimeError(f"the unit page failed: {last[:300]}")
    return elapsed


def summary(values: list[float]) -> str:
    values = sorted(values)
    return (f"median {statistics.median(values) * 1000:8.1f} ms  (min {values[0] * 1000:.1f},"
            f" max {values[-1] * 1000:.1f}, n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = cloche.load()
    web = start_ui(model, limit=args.limit)
    client = httpx.Client(cookies={f"cloche_ui_{web.port}": web.token})
    print(f"cloche-default on {torch.get_num_threads()} torch thread(s); {args.limit} held-out"
          " examples per unit page")
    stream_seconds(client, f"{web.base}/api/unit?point={POINT}&unit=0")  # warm-up (imports)
    bare, cold = [], []
    for u in range(1, args.rounds + 1):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        model.run_dataset("default:heldout", probes={POINT: lambda c, x: None}, save="bench",
                          limit=args.limit, batch_size=16, progress=False)
        bare.append(time.perf_counter() - start)
        model.save_context("bench").clear()
        cold.append(stream_seconds(client, f"{web.base}/api/unit?point={POINT}&unit={u}"))
    print(f"one bare dataset pass (baseline):    {summary(bare)}")
    print(f"cold unit page ({args.limit} examples):   {summary(cold)}"
          f"  = {statistics.median(cold) / statistics.median(bare):.2f}x the bare pass")
    cached = [stream_seconds(client, f"{web.base}/api/unit?point={POINT}&unit=1")
              for _ in range(args.rounds * 4)]
    print(f"cached unit data over HTTP:          {summary(cached)}")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("cached page render (browser): not run: playwright is not installed")
        return
    if not os.path.exists(path):
        print("cached page render (browser): not run: no Chromium")
        return
    pages = {"unit": web.url("unit", token=False, point=POINT, unit=1),
             "model": web.url("model", token=False), "text": web.url("text", token=False,
                                                                      text=TEXT)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(web.url())
        page.wait_for_selector("body[data-ready='1']", timeout=600_000)
        for name, url in pages.items():
            page.goto(url)  # computes (or not) and caches
            page.wait_for_selector("body[data-ready='1']", timeout=600_000)
            times = []
            for _ in range(args.rounds * 2):
                start = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("body[data-ready='1']", timeout=600_000)
                times.append(time.perf_counter() - start)
            print(f"cached {name} page render (browser): {summary(times)}")
        browser.close()
    web.stop()


if __name__ == "__main__":
    main()
