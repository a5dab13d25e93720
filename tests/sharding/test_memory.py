"""Each rank reads only its shard: its peak memory is well below loading the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

MEASURE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import cloche
from cloche.sharding.shard import build_shard, make_plan, skeleton

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def current_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

import transformers.models.gpt2.modeling_gpt2  # imports are not the model
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")

directory, mode, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = current_mb()
if mode == "whole":
    model = cloche.load(directory)
else:
    sk = skeleton(directory)
    plan = make_plan(sk, world)
    model = build_shard(sk, plan, int(mode), stage=None)
model = getattr(model, "hf_model", model)
peak = peak_mb()
with torch.no_grad():  # touch every weight, as a forward pass would (mapped pages count then)
    for p in model.parameters():
        p.sum()
print(json.dumps({"before": before, "peak": peak, "resident": current_mb()}))
"""


def _growth_mb(directory: Path, mode: str, world: int) -> tuple[float, float]:
    """(peak growth while loading, resident growth once every weight was touched), in MB."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory), mode, str(world)],
                         check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    numbers = json.loads(out.strip().splitlines()[-1])
    return numbers["peak"] - numbers["before"], numbers["resident"] - numbers["before"]


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    """~17 M parameters (~70 MB in float32): large enough to stand out from allocator noise."""
    config = transformers.GPT2Config(n_layer=8, n_embd=384, n_head=6, n_positions=128,
                                     vocab_size=8000, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2-medium")
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_a_middle_rank_peaks_far_below_the_whole_model(medium_dir):
    whole_peak, whole = _growth_mb(medium_dir, "whole", 4)
    shard_peak, shard = _growth_mb(medium_dir, "1", 4)
    print(f"\nmemory growth (MB), peak while loading / resident after touching every weight:"
          f" whole model {whole_peak:.0f} / {whole:.0f};"
          f" rank 1 of 4 {shard_peak:.0f} / {shard:.0f}")
    assert whole > 60  # float32 weights of the whole model: ~66 MB
    assert shard < 0.5 * whole
    assert shard_peak < 0.5 * max(whole, whole_peak)
