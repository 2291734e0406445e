"""bench/bench_ops.py, the op benchmark of every backend: its plans, its
argument errors, and a tiny real run on the CPU. Nothing here asserts on timing."""
import importlib.util
import json
import os
import runpy

import pytest
import torch

import fastgan

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_ops.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ops", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend, n", [("cpu", 2 * 2 * 3), ("cuda", 3 * 3 * 2 * 4),
                                        ("triton", 3 * 3 * 2 * 5)])
def test_default_plans(bench, capsys, tmp_path, backend, n):
    """ops x batches x dtypes x contenders, each backend with its own defaults."""
    out = str(tmp_path / "out.json")
    assert bench.main(["--backend", backend, out, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"{n} measurements -> {out}")
    assert not os.path.exists(out)


def test_argument_errors(bench, tmp_path):
    out = str(tmp_path / "r.json")
    for argv in ([out], ["--backend", "cpu", "--batch", "1"],
                 ["--backend", "cpu", "--contenders", "compile"], ["--backend", "gpu"],
                 ["--backend", "cuda", "--dropout", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    if not torch.cuda.is_available():
        assert bench.main(["--backend", "triton", out]) == 2 and not os.path.exists(out)


@pytest.mark.skipif("cpu" not in fastgan.backends(), reason="the cpu backend is not built")
def test_tiny_cpu_run(bench, tmp_path, capsys):
    out = tmp_path / "sub" / "cpu_ops.json"
    rc = bench.main(["--backend", "cpu", str(out), "--batch", "4", "--k", "8", "--n", "16",
                     "--ops", "linear_bn_act", "gan_bce", "--contenders", "eager", "cpu",
                     "--samples", "2", "--iters", "2", "--min-run-time", "0", "--warmup", "1",
                     "--threads", "1"])  # conftest.py puts the thread count back
    assert rc == 0
    assert "linear_bn_act" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["backend"] == "cpu" and doc["machine"]["cpu"] and doc["config"]["k"] == 8
    assert [(r["op"], r["contender"]) for r in doc["rows"]] == [
        ("linear_bn_act", "eager"), ("linear_bn_act", "cpu"), ("gan_bce", "eager"),
        ("gan_bce", "cpu")]
    for r in doc["rows"]:
        assert "skipped" not in r, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] == 2
        assert r["iters"] == 2 and r["speedup_vs_eager"] > 0


BENCH = os.path.dirname(PATH)


@pytest.mark.skipif("cpu" not in fastgan.backends(), reason="the cpu backend is not built")
def test_overhead_is_one_measurement(tmp_path, capsys):
    """bench/bench_drop_in.py overhead is the one per-call overhead measurement;
    bench/bench_cpu_overhead.py (the command the issue 11 notes cite) runs it."""
    drop_in = runpy.run_path(os.path.join(BENCH, "bench_drop_in.py"))
    rows = drop_in["overhead"](repeat=2, samples=1)
    assert [(r["layer"], r["mode"], r["dropout"]) for r in rows] == [
        (cls, mode, p) for mode in ("train", "eval") for cls in ("LinearAct", "LinearBNAct")
        for p in (0.0, 0.2)]
    for r in rows:
        for k in ("layer", "fused", "functional", "kernel", "plain"):
            assert r[f"{k}_us"] > 0 and r[f"{k}_cpu_us"] >= 0
        assert r["overhead_us"] == pytest.approx(r["layer_us"] - r["kernel_us"], abs=0.02)
        assert r["fused_overhead_us"] == pytest.approx(r["fused_us"] - r["kernel_us"], abs=0.02)
    # "fused" runs the fused op, whatever the speed rule picks for "layer"
    from fastgan import nn as fnn
    from fastgan.ops import dispatch
    for cls, op in ((fnn.LinearAct, "linear_act_forward"),
                    (fnn.LinearBNAct, "linear_bn_act_forward")):
        fns = drop_in["_overhead_callables"](cls, 0.2, True)
        before = dispatch.calls[("cpu", op)]
        fns["fused"]()
        assert dispatch.calls[("cpu", op)] == before + 1
    out = tmp_path / "o" / "overhead.json"
    shim = runpy.run_path(os.path.join(BENCH, "bench_cpu_overhead.py"))
    assert shim["main"](["--out", str(out), "--threads", "1", "--samples", "1", "--repeat", "2",
                         "--modes", "eval"]) == 0  # conftest.py puts the thread count back
    doc = json.loads(out.read_text())
    assert doc["what"] == "overhead" and {r["mode"] for r in doc["rows"]} == {"eval"}
    assert len(doc["rows"]) == 4 and "functional_us" in doc["rows"][0]
    assert "overhead" in capsys.readouterr().out
