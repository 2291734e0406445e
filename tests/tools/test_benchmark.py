"""fastgan.benchmark and `fastgan bench`: FLOP counting, timing statistics,
contender selection, the result schema and a tiny --quick run through the CLI.
Nothing here asserts on timing."""
import csv
import json

import pytest
import torch

import fastgan
from fastgan import backend
from fastgan import benchmark as B
from fastgan.cli import main
from fastgan.models import Discriminator, Generator

CPU = torch.device("cpu")


def test_step_flops_closed_form():
    g = 100 * 256 + 256 * 512 + 512 * 1024 + 1024 * 784
    d = 784 * 1024 + 1024 * 512 + 512 * 256 + 256 * 1
    assert B.linear_shapes(Generator(fused=False))[0] == (100, 256)
    assert B.forward_flops(Discriminator(fused=False), 3) == 2 * 3 * d
    assert B.step_flops(Generator(), Discriminator(), 64) == 2 * 64 * (3 * g + 9 * d)


def test_op_flops():
    k, n = B.OP_SHAPES["linear_act"]
    assert B.op_flops("linear_act", "forward", 8) == 2 * 8 * k * n
    assert B.op_flops("linear_act", "both", 8) == 3 * B.op_flops("linear_act", "forward", 8)
    assert B.op_flops("gan_bce", "both", 8) == 0


def test_measure_counts_and_percentiles():
    calls = []
    t = B.measure(lambda: calls.append(1), CPU, warmup=3, iters=7, min_time_s=0.0)
    assert len(t.samples_ms) == 7 and len(calls) == 3 + 7  # first call + 2 warm-up + 7
    t.samples_ms = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert t.median_ms == 3.0
    assert t.percentile(20) == pytest.approx(1.8) and t.percentile(80) == pytest.approx(4.2)


def test_contenders_on_cpu():
    names = [c.name for c in B.contenders(CPU)]
    assert names[:2] == ["eager", "compile"]
    assert not any("graph" in n or "reduce-overhead" in n for n in names)  # GPU only
    for b in fastgan.backends():
        # the Triton interpreter on CPU tensors is only timed when named exactly
        assert (f"fastgan-{b}" in names) == (b != "triton")
    if "triton" in fastgan.backends():
        assert [c.name for c in B.contenders(CPU, ["fastgan-triton"])] == ["fastgan-triton"]
    fused = [c.name for c in B.contenders(CPU, ["eager", "fastgan"])]
    assert fused[0] == "eager" and all(n.startswith("fastgan-") for n in fused[1:])
    with pytest.raises(ValueError, match="contenders"):
        B.contenders(CPU, ["fastgan-nonexistent"])


def test_add_speedups():
    def rec(name, ms):
        r = dict.fromkeys(B.RECORD_FIELDS)
        r.update(kind="step", op="gan_step", contender=name, batch=64, dtype="fp32", median_ms=ms)
        r["pass"] = "both"
        return r
    rs = B.add_speedups([rec("eager", 10.0), rec("compile", 8.0),
                         rec("compile-max-autotune", 5.0), rec("fastgan-cpu", 4.0),
                         rec("fastgan-x", None)])
    assert rs[0]["speedup_vs_eager"] == 1.0 and rs[3]["speedup_vs_eager"] == 2.5
    assert rs[3]["speedup_vs_compile"] == pytest.approx(5.0 / 4.0)  # against the best mode
    assert rs[4]["speedup_vs_eager"] is None


@pytest.mark.parametrize("name", ["eager", "fastgan-reference", "fastgan-cpu"])
def test_build_step_runs_the_named_backend(name):
    if name not in [c.name for c in B.contenders(CPU)]:
        pytest.skip(f"{name} is not available here: {backend.unavailable()}")
    c = next(c for c in B.contenders(CPU) if c.name == name)
    step, G, D = B.build_step(c, 8, CPU)
    before = dict(backend.calls)
    w = G.net[0][0].weight.detach().clone()
    out = step()
    assert torch.isfinite(out.d_loss) and torch.isfinite(out.g_loss)
    assert not torch.equal(w, G.net[0][0].weight)  # the step trained G
    ran = {b for (b, f), n in backend.calls.items() if n > before.get((b, f), 0)}
    assert ran == (set() if name == "eager" else {c.backend})


@pytest.mark.parametrize("pass_", B.PASSES)
@pytest.mark.parametrize("op", B.OPS)
def test_build_op_runs(op, pass_):
    c = next(c for c in B.contenders(CPU) if c.fused)
    before = sum(backend.calls.values())
    out = B.build_op(c, op, pass_, 4, CPU)()
    assert out is not None
    if (op, pass_) != ("gan_bce", "backward"):  # gan_bce's gradient comes from its forward
        assert sum(backend.calls.values()) > before


def test_run_records_and_schema(tmp_path):
    cfg = B.Config(device=CPU, batches=(4,), dtypes=("fp32", "bf16"),
                   contenders=("eager", "fastgan"), ops=("linear_act",), passes=("both",),
                   warmup=1, iters=2, min_time_s=0.0)
    seen = []
    records = B.run(cfg, on_record=seen.append)
    assert seen == records
    n_contenders = len(B.contenders(CPU, cfg.contenders))
    assert len(records) == 2 * 2 * n_contenders  # (step, op) x dtypes x contenders
    for r in records:
        assert r["median_ms"] is not None, r["note"]
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["note"] == ""
    step = [r for r in records if r["kind"] == "step" and r["contender"] == "eager"][0]
    assert step["gflop"] == pytest.approx(B.step_flops(Generator(), Discriminator(), 4) / 1e9)
    assert step["speedup_vs_eager"] == 1.0
    doc = json.loads(json.dumps(B.result(cfg, records)))
    B.validate(doc)
    assert doc["machine"]["cpu"] and doc["machine"]["torch"] == torch.__version__
    del doc["records"][0]["median_ms"]
    with pytest.raises(ValueError, match="record 0"):
        B.validate(doc)


def test_failed_contender_is_recorded_not_fatal():
    c = B.Contender("eager", fused=False)
    cfg = B.Config(device=CPU, batches=(1,), contenders=("eager",), ops=(), warmup=1, iters=1,
                   min_time_s=0.0)  # batch 1: BatchNorm refuses to train
    (r,) = B.run(cfg)
    assert r["contender"] == c.name and r["median_ms"] is None and "ValueError" in r["note"]


def test_bench_cli_quick(tmp_path, capsys):
    out = tmp_path / "res" / "b"
    rc = main(["bench", "--quick", "--threads", "1", "--contenders", "eager,fastgan", "--batch-sizes", "4",
               "--ops", "linear_bn_act,gan_bce", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train step" in text and "xeager" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    B.validate(doc)
    assert doc["complete"] is True
    assert {r["pass"] for r in doc["records"] if r["kind"] == "op"} == {"both"}
    assert {r["dtype"] for r in doc["records"]} == {"fp32"}
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["records"]) and set(rows[0]) == set(B.RECORD_FIELDS)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_cli_bad_arguments(capsys):
    assert main(["bench", "--batch-sizes", "64,x"]) == 1
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["bench", "--ops", "conv"]) == 1
    assert "conv" in capsys.readouterr().err
    assert main(["bench", "--contenders", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
