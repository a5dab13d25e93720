"""Found by benchmarks/soak.py: the first ``model.tokenizer`` of 16 threads at once fails.

16 threads of one fresh client process, each with its own ``cloche.connect`` connection, touch
``model.tokenizer`` (which any text input does) at the same moment: 15 of 16 fail with
``ImportError: cannot import name 'AutoTokenizer' from 'transformers'``. A second try works.
``RemoteExecutor.tokenizer`` (cloche/client/executor.py) runs ``from transformers import
AutoTokenizer`` lazily on each caller's thread, and transformers' lazy module is not safe to
import from several threads at once (plain ``from transformers import AutoTokenizer`` in 16
threads started a few ms apart fails the same way, without cloche).

    PYTHONPATH=. python benchmarks/soak_repros/tokenizer_import_race.py
"""
import os
import subprocess
import sys
import threading

import cloche

TOKEN = "repro-token-0123456789abcdef"
server = subprocess.Popen([sys.executable, "-m", "cloche", "serve", "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=dict(os.environ, CLOCHE_TOKEN=TOKEN))
address = next(line.split()[-1] for line in server.stdout if line.startswith("listening on"))
try:
    assert "transformers" not in sys.modules
    models = [cloche.connect(address, token=TOKEN) for _ in range(16)]
    barrier = threading.Barrier(len(models))
    failures = []

    def first_use(model):
        barrier.wait()
        try:
            _ = model.tokenizer
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=first_use, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(failures)} of {len(models)} threads failed", *sorted(set(failures)), sep="\n")
    print("a second model.tokenizer on every model works:",
          all(m.tokenizer is not None for m in models))
finally:
    server.terminate()
    server.wait()
