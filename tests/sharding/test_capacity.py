"""``cloche plan``: per-rank sizes on the meta device, the published 405B and 70B shapes, every
adapted family, and agreement with what a sharded launch actually loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cloche.cli import main
from cloche.errors import UsageError
from cloche.model.families import ADAPTERS
from cloche.sharding.capacity import plan_capacity
from cloche.sharding.launch import start_local

from tests.model.hf_cache import add_snapshot, use_cache
from tests.sharding.conftest import TIMEOUT_S
from tests.threads import TORCH_THREADS
from tests.tiny_models import FAMILIES, _configs

CONFIGS = Path(__file__).parent / "configs"
GiB = 2**30


def _plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_schema_is_exactly_the_documented_one(tiny4_dir, capsys):
    out = _plan_json(capsys, "--model", str(tiny4_dir("llama")), "--world-size", "2")
    assert set(out) == {"world_size", "total_parameters", "ranks"}
    assert out["world_size"] == 2
    assert [r["rank"] for r in out["ranks"]] == [0, 1]
    for r in out["ranks"]:
        assert set(r) == {"rank", "layers", "parameters", "weight_bytes", "activation_bytes",
                          "fits"}
        assert r["weight_bytes"] == 4 * r["parameters"]  # float32, as cloche serve loads
        assert r["activation_bytes"] > 0 and r["fits"] is True
    assert [r["layers"] for r in out["ranks"]] == [[0, 1], [2, 3]]  # inclusive
    # untied Llama: the ranks' parameters add up to the model's
    assert sum(r["parameters"] for r in out["ranks"]) == out["total_parameters"]


def test_405b_shape_needs_about_810_gb_and_ten_80_gib_devices(capsys):
    config = str(CONFIGS / "llama3-405b.json")
    out = _plan_json(capsys, "--model", config, "--dtype", "bfloat16",
                     "--device-memory", "80GiB")
    assert out["total_parameters"] == pytest.approx(405.85e9, rel=1e-3)
    weights = sum(r["weight_bytes"] for r in out["ranks"])
    assert 800e9 < weights < 820e9  # ~2 bytes per parameter, nothing counted twice
    assert out["world_size"] == 10  # with no --world-size: the smallest that fits
    assert all(r["fits"] for r in out["ranks"])
    assert all(r["weight_bytes"] + r["activation_bytes"] <= 80 * GiB for r in out["ranks"])
    assert out["ranks"][-1]["layers"] == [out["ranks"][-1]["layers"][0], 125]
    # one rank fewer cannot fit: 9 ranks of 80 GiB hold less than the weights alone at bf16
    nine = _plan_json(capsys, "--model", config, "--dtype", "bfloat16", "--world-size", "9")
    assert not all(r["fits"] for r in nine["ranks"])
    assert main(["plan", "--model", config, "--dtype", "bfloat16"]) == 0
    table = capsys.readouterr().out
    assert "811.71 GB of weights in bfloat16" in table
    assert "smallest world size that fits 80.0 GiB devices: 10" in table


def test_70b_shape_and_smaller_devices():
    plan = plan_capacity(CONFIGS / "llama3-70b.json", dtype="bfloat16",
                         device_memory=24 * GiB)
    assert plan.total_parameters == pytest.approx(70.55e9, rel=1e-3)
    assert plan.total_weight_bytes == 2 * plan.total_parameters
    assert plan.world_size == plan.smallest_world_size and plan.fits
    assert plan.world_size >= 141.1e9 / (24 * GiB)
    # a larger batch needs more activation memory on every rank, never less
    bigger = plan_capacity(CONFIGS / "llama3-70b.json", plan.world_size, dtype="bfloat16",
                           batch=8, seq=4096)
    for small, large in zip(plan.ranks, bigger.ranks, strict=True):
        assert large.activation_bytes > small.activation_bytes
        assert large.weight_bytes == small.weight_bytes


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        plan_capacity(tmp_path / "missing.json")
    with pytest.raises(UsageError, match=r"world_size \(9\) must not exceed the number of layers"):
        plan_capacity(_tiny_config("llama", 4), 9)
    with pytest.raises(UsageError, match="no world size up to 4"):
        plan_capacity(_tiny_config("llama", 4), device_memory=1024)
    explicit = plan_capacity(_tiny_config("llama", 4), layers_per_rank=[1, 3])
    assert [r.layers for r in explicit.ranks] == [(0, 0), (1, 3)]
    with pytest.raises(UsageError, match=r"sums to 3, but the model has 4"):
        plan_capacity(_tiny_config("llama", 4), layers_per_rank=[1, 2])
    with pytest.raises(UsageError, match=r"batch \(0\)"):
        plan_capacity(_tiny_config("llama", 4), 2, batch=0)


def _tiny_config(family: str, n_layers: int = 4):
    cls, config = _configs(n_layers)[family]
    config.architectures = [cls.__name__]
    return config


def test_every_adapted_family_is_planned_on_the_meta_device():
    model_types = {_tiny_config(f).model_type for f in FAMILIES}
    for adapter in ADAPTERS:  # the tiny set covers every adapter, so this covers every family
        assert set(adapter.model_types) & model_types, adapter.model_types
    for family in FAMILIES:
        cls, config = _configs(4)[family]
        config.architectures = [cls.__name__]
        plan = plan_capacity(config, 2)
        torch.manual_seed(0)
        real = cls(config)
        assert plan.total_parameters == sum(p.numel() for p in real.parameters()), family
        assert plan.ranks[0].layers[0] == 0
        assert plan.ranks[-1].layers[1] == 3
        tied = plan.ranks[0].parameters + plan.ranks[1].parameters - plan.total_parameters
        shared = real.get_output_embeddings()
        if shared is not None and shared.weight is real.get_input_embeddings().weight:
            assert tied == shared.weight.numel(), family  # held by both ends
        else:
            assert tied == 0, family


def _loaded(shard) -> tuple[int, int]:
    """(parameters, bytes) that this rank's shard really holds (stubs hold none)."""
    params = list(shard.hf_model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "world_size"), [("llama", 2), ("gpt2", 3)])
def test_the_plan_is_what_a_sharded_launch_loads(tiny4_dir, family, world_size):
    directory = tiny4_dir(family)  # gpt2 ties its embedding and unembedding
    plan = plan_capacity(directory, world_size)
    model = start_local(directory, world_size, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        assert model.info()["layers_per_rank"] == [r.layers[1] - r.layers[0] + 1
                                                   for r in plan.ranks]
        loaded = model.call(_loaded, rank="all")
    finally:
        model.close()
    assert {r.rank: (r.parameters, r.weight_bytes) for r in plan.ranks} == \
        {rank: tuple(v) for rank, v in loaded.items()}


def test_a_hub_name_needs_only_its_config(monkeypatch, tmp_path, tiny4_dir, capsys):
    """Offline, from a cache whose snapshot holds config.json alone: no weight is needed."""
    cache = use_cache(monkeypatch, tmp_path / "hf-home")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((tiny4_dir("llama") / "config.json").read_bytes())
    add_snapshot(cache, "org/tiny-llama", only_config, refs=("main", "v1"))
    by_name = _plan_json(capsys, "--model", "org/tiny-llama", "--revision", "v1",
                         "--world-size", "2")
    assert by_name == _plan_json(capsys, "--model", str(tiny4_dir("llama")), "--world-size", "2")
    with pytest.raises(UsageError, match=r"has no config\.json of 'org/absent'"):
        plan_capacity("org/absent", 2)
