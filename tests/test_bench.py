"""`primerge bench`: the zoo generator, the child-process measurement and the report.

A tiny zoo (1-2 layers, hidden 48) keeps this fast; it checks that the harness works
and that its numbers are sane, not how fast anything is.
"""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from primerge import bench
from primerge.bench.accuracy import truncation_error
from primerge.bench.report import format_table, summarize
from primerge.bench.runs import Inputs, Measurement, Row, measure_merge, parse_method, parse_methods, write_recipe
from primerge.bench.zoo import StreamingSafetensors, ZooSpec, build_zoo, task_vector, zoo_folder
from primerge.cli.main import build_parser, main
from primerge.io.readers import open_checkpoint
from primerge.core.recipe import load_recipe

TINY = dict(scale=0.0625, layers=1, tasks=3, seed=7)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny_zoo(cache):
    return build_zoo(ZooSpec(**TINY), cache, log=lambda _: None)


def test_default_zoo_is_llama_shaped_and_about_100m_parameters():
    spec = ZooSpec()
    shapes = dict(spec.tensors())
    assert 95e6 < spec.parameters() < 105e6
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32000, 768)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (768, 768)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 768)  # 4 KV heads of 64
    assert shapes["model.layers.7.mlp.down_proj.weight"] == (768, 2048)
    assert shapes["model.layers.7.post_attention_layernorm.weight"] == (768,)
    assert "model.layers.8.mlp.up_proj.weight" not in shapes
    assert spec.key != ZooSpec(layers=4).key != ZooSpec(scale=0.5).key


def test_streaming_writer_round_trips_and_checks_order(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7).bfloat16()}
    writer = StreamingSafetensors(tmp_path / "x.safetensors", [(k, tuple(v.shape)) for k, v in tensors.items()])
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", tensors["b"])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_zoo_is_cached_readable_and_structured(cache, tiny_zoo):
    spec = ZooSpec(**TINY)
    assert tiny_zoo == zoo_folder(spec, cache)
    stamp = (tiny_zoo / "ft-0" / "model.safetensors").stat().st_mtime_ns
    assert build_zoo(spec, cache, log=lambda _: pytest.fail("regenerated")) == tiny_zoo
    assert (tiny_zoo / "ft-0" / "model.safetensors").stat().st_mtime_ns == stamp

    base = open_checkpoint(tiny_zoo / "base")
    assert sorted(base.names) == sorted(n for n, _ in spec.tensors())
    assert base.info("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    name = "model.layers.0.mlp.down_proj.weight"
    theta0 = base.load(name).float()
    taus = torch.stack([open_checkpoint(tiny_zoo / f"ft-{t}").load(name).float() - theta0 for t in range(3)])
    rms = taus.square().mean().sqrt().item()
    assert 0.8e-3 < rms < 1.2e-3
    s = torch.linalg.svdvals(taus[0])
    assert s[0] > 3 * s[len(s) // 2]  # strong directions above a decaying tail
    # shared directions: task vectors correlate, but are far from equal
    cos = torch.nn.functional.cosine_similarity(taus[0].flatten(), taus[1].flatten(), dim=0).item()
    assert 0.05 < cos < 0.7
    # the generator is seeded per tensor: the same numbers again
    again = task_vector(spec, name, tuple(theta0.shape), 0)
    assert torch.allclose((theta0 + again).bfloat16().float() - theta0, taus[0])


def test_parse_methods():
    runs = parse_methods("task_arithmetic, prime:svd=exact;rank=0.02,tsv")
    assert [r.label for r in runs] == ["task_arithmetic", "prime:svd=exact;rank=0.02", "tsv"]
    assert runs[1].method == "prime" and runs[1].parameters == {"svd": "exact", "rank": 0.02}
    with pytest.raises(Exception, match="key=value"):
        parse_method("prime:exact")


def test_a_child_reports_its_own_peak_not_its_parents(tiny_zoo, tmp_path):
    """A parent holding 1 GiB forks the merge child: the child's peak RSS is its own."""
    inputs = Inputs.from_zoo("tiny", tiny_zoo, 3)
    recipe = write_recipe(tmp_path / "r.yaml", inputs.base, inputs.models, parse_method("task_arithmetic"))
    ballast = torch.ones(256, 1024, 1024)  # 1 GiB resident in this (the parent) process
    m = measure_merge(recipe, tmp_path / "out")
    assert ballast.sum() > 0 and 50 < m.rss_mib < 900


def test_measured_merge_numbers_are_sane(tiny_zoo, tmp_path):
    inputs = Inputs.from_zoo("tiny", tiny_zoo, 3)
    recipe = write_recipe(tmp_path / "r.yaml", inputs.base, inputs.models, parse_method("prime"))
    assert load_recipe(recipe).method == "prime"
    m = measure_merge(recipe, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert 0 < m.merge_s < m.wall_s < 120
    assert m.cpu_s > 0.1  # at least importing torch
    assert 50 < m.rss_mib < 4096  # the child's own peak, in MiB


def test_a_ray_merge_reports_its_workers_unit_rates_and_counts(tmp_path):
    """The child's ``units/s per worker`` line (a Ray merge) becomes the mean rate, its ``units per
    worker`` line the counts (most first), and both the row's note."""
    import sys

    lines = ("print('units/s per worker: 0.5 1.5'); print('units per worker: 3 5'); print('peak rss: 2048 kB'); "
             "print('merged with prime in 2.5s')")
    m = measure_merge(tmp_path / "r.yaml", tmp_path / "out", runner=[sys.executable, "-c", lines])
    assert m.merge_s == 2.5 and m.unit_rate == 1.0 and m.rss_mib == 2.0 and m.worker_units == (5, 3)
    plain = measure_merge(tmp_path / "r.yaml", tmp_path / "out", runner=[sys.executable, "-c", lines.split("; ")[3]])
    assert math.isnan(plain.unit_rate) and plain.rss_mib > 2.0 and plain.worker_units == ()  # no peak line: rusage
    row = Row("ray", "z", "prime", 8, [m, m, plain])
    assert row.as_dict(None)["note"] == "units/s per worker 1; units per worker 5/3"


def test_truncation_error_is_zero_for_the_same_path_and_small_otherwise(tiny_zoo):
    inputs = Inputs.from_zoo("tiny", tiny_zoo, 3)
    exact = parse_method("prime:svd=exact")
    same = truncation_error(inputs, exact, exact)
    assert same.total == same.worst == 0.0 and 0 < same.rounding < 1  # bf16 outputs: their own rounding
    total, worst, _ = truncation_error(inputs, parse_method("prime:svd=randomized"), exact)
    assert 0 < total <= worst < 0.5


def _row(group, label, tasks, wall, merge, rss):
    row = Row(group, "z", label, tasks)
    row.runs = [Measurement(wall + d, wall + d, rss + d, merge + d) for d in (-0.1, 0.0, 5.0)]
    return row


def test_summary_ratios():
    rows = [
        _row("methods", "task_arithmetic", 8, 10, 8, 1000),
        _row("methods", "prime", 8, 15, 12, 1100),
        _row("methods", "tsv:svd=exact", 8, 90, 88, 1200),
        _row("tasks", "prime T=4", 4, 8, 6, 700),
        _row("tasks", "prime T=8", 8, 15, 12, 1100),
        _row("depth", "prime L=4", 8, 8, 6, 1000),
        _row("depth", "prime L=8", 8, 15, 12, 1050),
    ]
    result = summarize(rows, (2e-4, 1e-3))
    by = {r["method"]: r for r in result}
    assert by["prime"]["wall_s"] == 15 and by["prime"]["wall_x"] == 1.5  # medians, not means
    assert by["task_arithmetic"]["merge_x"] == 1.0
    assert by["prime T=8"]["rss_x"] == pytest.approx(1100 / 700, abs=1e-3)
    assert by["prime L=8"]["rss_x"] == 1.05
    assert "rel_err=2.000e-04" in result[-1]["note"]
    table = format_table(result)
    assert table.count("\n") == len(result) + 1 and "| prime T=4" in table


def test_cli_bench_end_to_end(tiny_zoo, cache, tmp_path, capsys):
    args = build_parser().parse_args(["bench", "--help"][:1])
    assert args.methods == bench.DEFAULT_METHODS and args.repeats == 3
    out_csv = tmp_path / "res.csv"
    code = main(["bench", "--methods", "prime", "--repeats", "1", "--no-scaling", "--cache", str(cache),
                 "--csv", str(out_csv), "--layers", "1", "--scale", "0.0625", "--tasks", "3", "--seed", "7"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| task_arithmetic" in text and "| prime " in text and "prime vs prime:svd=exact" in text
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["method"] for r in rows] == ["task_arithmetic", "prime", "prime vs prime:svd=exact"]
    assert float(rows[0]["wall_x"]) == 1.0 and math.isfinite(float(rows[1]["rss_x"]))
    assert float(rows[1]["rss_mib"]) > 50


def test_fitted_exponent_recovers_a_power_law():
    from primerge.bench.sweep import fitted_exponent

    xs = [512, 1024, 2048, 4096]
    assert fitted_exponent(xs, [3.0 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fitted_exponent(xs, [7.0] * 4) == pytest.approx(0.0)
    assert fitted_exponent([2, 4, 8, 16], [1.5 * t**0.5 for t in (2, 4, 8, 16)]) == pytest.approx(0.5)


def test_sweep_parsing_and_zoo_specs():
    from primerge.bench.sweep import SWEEP_VOCAB, parse_sweep, sweep_spec

    sweep = parse_sweep("hidden=1024, 512,1024")
    assert sweep.axis == "hidden" and sweep.points == (512, 1024) and sweep.group == "sweep-hidden"
    for bad in ("width=1,2", "hidden=512", "tasks=0,2", "tasks=a,b", "hidden"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sweep(bad)
    wide = sweep_spec(ZooSpec(layers=1), "hidden", 2048)
    assert abs(wide.hidden - 2048) < 12 and wide.vocab == SWEEP_VOCAB  # 12 heads: a multiple of 12
    assert wide.key != ZooSpec(layers=1, scale=wide.scale).key  # the fixed vocabulary is in the key
    assert ZooSpec().key == "llama-L8-s1-T8-seed0-v1"  # the default zoo's cache key is unchanged
    assert sweep_spec(ZooSpec(layers=1), "tasks", 16).tasks == 16


def test_cli_bench_sweep_over_tasks(cache, tmp_path, capsys):
    out_csv = tmp_path / "sweep.csv"
    code = main(["bench", "--methods", "task_arithmetic,prime", "--repeats", "1", "--sweep", "tasks=2,3",
                 "--cache", str(cache), "--csv", str(out_csv), "--layers", "1", "--scale", "0.0625", "--seed", "7"])
    assert code == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["method"] for r in rows] == ["task_arithmetic tasks=2", "prime tasks=2", "task_arithmetic tasks=3",
                                           "prime tasks=3", "task_arithmetic", "prime"]
    assert [r["T"] for r in rows[:4]] == ["2", "2", "3", "3"]
    assert float(rows[0]["wall_x"]) == 1.0 and float(rows[2]["wall_x"]) > 0  # against T = 2, same method
    fits = rows[4:]
    assert all(r["group"] == "fit-tasks" and "engine s ∝ tasks^" in r["note"] and "peak RSS" in r["note"]
               for r in fits)
    assert "| fit-tasks" in capsys.readouterr().out


def test_realistic_zoo_has_llama_shapes_and_a_noise_floor(cache):
    """``hidden_size`` gives LLaMA's shapes (LLaMA-7B's 11008 at 4096); ``noise_floor`` f puts the
    share f of a matrix task vector's energy in an i.i.d. floor: on 96 × 256, the energy beyond the
    six strong directions is f·(1 − 6/96) of the floor's plus O(1/√(mn)) cross terms, in [0.42, 0.52]."""
    spec = ZooSpec(layers=6, hidden_size=1024, noise_floor=0.5)
    shapes = dict(spec.tensors())
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (1024, 1024)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 1024)  # 4 KV heads of 64
    assert shapes["model.layers.5.mlp.gate_proj.weight"] == (2816, 1024)
    assert shapes["lm_head.weight"] == (32000, 1024)
    assert ZooSpec(hidden_size=4096).intermediate == 11008
    assert spec.key == "llama-L6-h1024-nf0.5-T8-seed0-v1" and ZooSpec().key == "llama-L8-s1-T8-seed0-v1"
    for bad in (dict(hidden_size=1000), dict(noise_floor=1.0)):
        with pytest.raises(ValueError):
            ZooSpec(**bad)
    floor = ZooSpec(layers=1, hidden_size=64, noise_floor=0.5, tasks=2)
    tau = task_vector(floor, "model.layers.0.mlp.up_proj.weight", (96, 256), 0)
    s = torch.linalg.svdvals(tau.double()).square()
    assert 0.42 < float(s[6:].sum() / s.sum()) < 0.52
    assert float(tau.square().mean().sqrt()) == pytest.approx(1e-3, rel=0.03)  # unit parts, cross terms ~1/√(mn)
    assert task_vector(floor, "model.layers.0.mlp.up_proj.weight", (96, 256), 0).equal(tau)  # seeded


def test_floors_measure_io_and_price_svd_flops(tiny_zoo, tmp_path):
    from primerge.bench.floors import gemm_rate, io_floor, output_bytes, weight_files
    from primerge.bench.report import Floors

    folders = [tiny_zoo / "base", tiny_zoo / "ft-0"]
    assert output_bytes(folders[0]) == (tiny_zoo / "base" / "model.safetensors").stat().st_size > 0
    assert weight_files(folders[0]) == [tiny_zoo / "base" / "model.safetensors"]
    assert 0 < io_floor(folders, output_bytes(folders[0]), tmp_path, repeats=2) < 60
    assert not list(tmp_path.iterdir())  # the written bytes are removed
    assert gemm_rate(repeats=1, size=256) > 1e6
    row = Row("methods", "tiny", "prime", 3, [Measurement(1.0, 1.0, 100.0, 0.5, svd_flops=f) for f in (2e9, 4e9, 9e9)])
    assert Floors({"tiny": 0.25}, gemm_rate=2e9).of(row) == {"io_floor_s": 0.25, "svd_floor_s": 2.0}
