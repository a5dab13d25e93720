"""The suite's one torch thread count, for the test process and every process it starts.

Results are compared bitwise across processes (a local model against ``cloche serve``), and a
matmul's reduction order depends on how many threads split it, so both sides must use the same
count. ``tests/conftest.py`` pins the test process to it around every test; servers get
``--threads``, sharded ranks ``threads=`` (their ``--threads``).
"""

TORCH_THREADS = 1
