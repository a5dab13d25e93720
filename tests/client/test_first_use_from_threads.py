"""Many threads of a fresh client process touch their model's tokenizer at once: all succeed.

(transformers' lazy module fails when several threads import it at the same moment: before,
15 of 16 threads got ``ImportError: cannot import name 'AutoTokenizer'``.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest_server import REPO

SCRIPT = textwrap.dedent("""
    import sys, threading
    import cloche
    assert "transformers" not in sys.modules
    models = [cloche.connect(sys.argv[1], token=sys.argv[2]) for _ in range(8)]
    barrier, failures = threading.Barrier(len(models)), []

    def first_use(model):
        barrier.wait()
        try:
            assert model.tokenize("def f(x):").numel() > 0
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=first_use, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [], failures
""")


def test_eight_threads_load_their_tokenizers_at_once(served):
    result = subprocess.run([sys.executable, "-c", SCRIPT, served.address, served.token],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
