"""bench/bench_ops.py, the op benchmark of every backend: its plans, its
argument errors, and a tiny real run on the CPU. Nothing here asserts on timing."""
import importlib.util
import json
import os

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
