"""fastgan.benchmark and `fastgan bench`: FLOP counting, timing statistics,
contender selection, the result schema and a tiny --quick run through the CLI.
Nothing here asserts on timing."""
import argparse
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



def _native_bf16() -> bool:
    cpu = fastgan.ops.dispatch._load("cpu")[0]
    return cpu is None or cpu.gemm_info()["onednn"]["bfloat16"]


# On a CPU without AVX512_BF16 / AMX oneDNN has no bf16 GEMM: no bf16 peak, and a note says so.
NATIVE_BF16 = _native_bf16()


def _bf16_peak_ok(p: dict) -> bool:
    if NATIVE_BF16:
        return p["gflops"] > 0
    return p["gflops"] is None and "no oneDNN bf16 GEMM on this CPU" in p["note"]

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


def test_measure_many_rotates_the_order_and_settles():
    """Each callable follows each other one equally often (the first call after a switch
    pays for the previous callable's leftovers), and ``settle`` untimed calls come
    before each sample."""
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    t = B.measure_many(fns, CPU, warmup=0, iters=6, repeat=2, settle=1)
    assert all(len(t[k].samples_ms) == 6 for k in "abc")
    assert len(calls) == 6 * 3 * (1 + 2)
    samples = calls[::3]                       # the first call of each settle + sample
    assert all(calls[i:i + 3] == [calls[i]] * 3 for i in range(0, len(calls), 3))
    followers = {}
    for prev, nxt in zip(samples, samples[1:]):
        if prev != nxt:
            followers.setdefault(nxt, set()).add(prev)
    assert all(followers[k] == set("abc") - {k} for k in "abc")


def by_name(device):
    return {c.name: c for c in B.contenders(device)}


def test_contenders_on_cpu():
    names = [c.name for c in B.contenders(CPU)]
    assert names[:4] == ["eager", "eager-bf16", "eager-fused-adam", "compile"]
    assert not any("graph" in n or "reduce-overhead" in n for n in names)  # GPU only
    for b in fastgan.backends():
        # the Triton interpreter on CPU tensors is only timed when named exactly
        assert (f"fastgan-{b}" in names) == (b != "triton")
    if "triton" in fastgan.backends():
        assert [c.name for c in B.contenders(CPU, ["fastgan-triton"])] == ["fastgan-triton"]
    if "cpu" in fastgan.backends():
        # the CPU step under autograd (no tape) as well: it times what the tape saves
        assert "fastgan-cpu-autograd" not in names
        untaped, = B.contenders(CPU, ["fastgan-cpu-autograd"])
        assert not untaped.tape and by_name(CPU)["fastgan-cpu"].tape
        step = B.build_step(untaped, 4, CPU)[0]
        step()
        assert step.engine.taped == 0
    fused = [c.name for c in B.contenders(CPU, ["eager", "fastgan"])]
    assert fused[0] == "eager" and all(n.startswith("fastgan-") for n in fused[1:])
    # "eager" is the plain reference only; the family of all three is eager-all
    assert [c.name for c in B.contenders(CPU, ["eager-all"])] == [
        "eager", "eager-bf16", "eager-fused-adam"]
    by = {c.name: c for c in B.contenders(CPU)}
    assert by["eager-fused-adam"].fused_adam and not by["eager"].fused_adam
    assert by["eager-bf16"].dtype == "bf16" and by["eager"].dtype is None
    with pytest.raises(ValueError, match="contenders"):
        B.contenders(CPU, ["fastgan-nonexistent"])


def test_runs_pairs_contenders_with_dtypes():
    cs = B.contenders(CPU, ["eager-all", "fastgan-reference"])
    pairs = [(c.name, d) for c, d in B.runs(cs, ["fp32", "bf16"])]
    # eager at bf16 is eager-bf16: timed once, under that name
    assert pairs == [("eager", "fp32"), ("eager-fused-adam", "fp32"), ("fastgan-reference", "fp32"),
                     ("eager-bf16", "bf16"), ("eager-fused-adam", "bf16"),
                     ("fastgan-reference", "bf16")]
    # a pinned contender runs in its own dtype even when the run has only fp32
    assert [(c.name, d) for c, d in B.runs(cs, ["fp32"])][-1] == ("eager-bf16", "bf16")
    # without eager-bf16, eager at the bf16 label is eager under autocast
    assert [(c.name, d) for c, d in B.runs(B.contenders(CPU, ["eager"]), ["fp32", "bf16"])] == [
        ("eager", "fp32"), ("eager", "bf16")]


def _rec(name, ms, dtype="fp32", batch=64, gflop=None):
    r = dict.fromkeys(B.RECORD_FIELDS)
    r.update(kind="step", op="gan_step", contender=name, batch=batch, dtype=dtype, median_ms=ms)
    r["pass"] = "both"
    if gflop is not None and ms is not None:
        r["gemm_gflops"] = gflop / (ms / 1e3)
    return r


def test_add_speedups():
    rs = B.add_speedups([_rec("eager", 10.0), _rec("compile", 8.0),
                         _rec("compile-max-autotune", 5.0), _rec("fastgan-cpu", 4.0),
                         _rec("fastgan-x", None)])
    assert rs[0]["speedup_vs_eager"] == 1.0 and rs[3]["speedup_vs_eager"] == 2.5
    assert rs[3]["speedup_vs_compile"] == pytest.approx(5.0 / 4.0)  # against the best mode
    assert rs[3]["speedup_vs_eager_fp32"] == 2.5  # fp32 rows: the same baseline
    assert rs[4]["speedup_vs_eager"] is None


def test_speedups_across_dtypes():
    """bf16 rows: xeager over eager-bf16 (or eager at bf16), xfp32 over eager fp32
    at the same batch; compile within the row's dtype; other batches apart."""
    rs = B.add_speedups([
        _rec("eager", 12.0), _rec("eager-fused-adam", 10.0), _rec("compile", 6.0),
        _rec("fastgan-cpu", 4.0), _rec("eager-bf16", 9.0, "bf16"), _rec("compile", 3.0, "bf16"),
        _rec("fastgan-cpu", 2.0, "bf16"), _rec("eager", 100.0, batch=256),
        _rec("fastgan-cpu", 1.0, "bf16", batch=256)])
    by = {(r["contender"], r["dtype"], r["batch"]): r for r in rs}
    f16 = by["fastgan-cpu", "bf16", 64]
    assert f16["speedup_vs_eager"] == pytest.approx(9.0 / 2.0)   # vs eager-bf16
    assert f16["speedup_vs_eager_fp32"] == pytest.approx(12.0 / 2.0)   # vs eager fp32
    assert f16["speedup_vs_compile"] == pytest.approx(3.0 / 2.0)   # vs compile bf16
    assert by["fastgan-cpu", "fp32", 64]["speedup_vs_compile"] == pytest.approx(6.0 / 4.0)
    assert by["eager-bf16", "bf16", 64]["speedup_vs_eager"] == 1.0
    assert by["eager-bf16", "bf16", 64]["speedup_vs_eager_fp32"] == pytest.approx(12.0 / 9.0)
    assert by["eager-fused-adam", "fp32", 64]["speedup_vs_eager"] == pytest.approx(1.2)
    b256 = by["fastgan-cpu", "bf16", 256]   # no bf16 eager at 256: no same-dtype ratio
    assert b256["speedup_vs_eager"] is None and b256["speedup_vs_eager_fp32"] == 100.0
    # eager under the bf16 label (no eager-bf16 contender) is the bf16 baseline too
    (e, f) = B.add_speedups([_rec("eager", 8.0, "bf16"), _rec("fastgan-cpu", 2.0, "bf16")])
    assert f["speedup_vs_eager"] == 4.0 and f["speedup_vs_eager_fp32"] is None


def test_add_peaks():
    peaks = {"fp32": {"gflops": 400.0}, "bf16": {"gflops": 800.0}}
    rs = B.add_peaks([_rec("eager", 10.0, gflop=1.0), _rec("eager-bf16", 5.0, "bf16", gflop=1.0),
                      _rec("fastgan-x", None), _rec("eager", 1.0, "fp16", gflop=1.0)], peaks)
    assert rs[0]["peak_gflops"] == 400.0 and rs[0]["peak_frac"] == pytest.approx(100 / 400)
    assert rs[1]["peak_gflops"] == 800.0 and rs[1]["peak_frac"] == pytest.approx(200 / 800)
    assert rs[2]["peak_frac"] is None   # failed: no time
    assert rs[3]["peak_gflops"] is None and rs[3]["peak_frac"] is None   # no fp16 peak


def test_gemm_peak_measured_and_cached():
    from fastgan.tools.benchmark import peak as P
    p = B.gemm_peak(CPU, "fp32", 192)
    assert p["gflops"] > 0 and p["n"] == 192 and p["threads"] == torch.get_num_threads()
    assert p["calls"] >= 1 and p["note"] == ""
    if torch.backends.mkldnn.is_available():   # the faster of oneDNN and MKL's torch.mm
        assert p["op"] in ("mkldnn._linear_pointwise", "torch.mm")
    hits = P._measure.cache_info().hits
    assert B.gemm_peak(CPU, "fp32", 192) == p    # cached: measured once per process
    assert P._measure.cache_info().hits == hits + 1
    both = B.gemm_peaks(CPU, ("fp32",), 192)
    assert set(both) == {"fp32", "bf16"} and _bf16_peak_ok(both["bf16"])
    assert set(B.gemm_peaks(CPU, ("tf32",), 192)) == {"fp32", "bf16", "tf32"}
    with pytest.raises(ValueError, match="dtype"):
        B.gemm_peak(CPU, "int8")
    assert B.PEAK_N == 4096


def test_gemm_peak_is_the_faster_gemm(monkeypatch):
    """On the CPU the fp32 peak is the faster of oneDNN and MKL's torch.mm (MKL wins
    on an Intel CPU, oneDNN on an AMD one with AVX-512); bf16 is oneDNN's alone."""
    from fastgan.tools.benchmark import peak as P
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert [op for _, op in P._gemms(CPU, "fp32", 8)] == ["mkldnn._linear_pointwise", "torch.mm"]
    assert [op for _, op in P._gemms(CPU, "bf16", 8)] == ["mkldnn._linear_pointwise"]
    for fast in ("mkldnn._linear_pointwise", "torch.mm"):
        secs = {op: (1.0 if op == fast else 2.0) for op in ("mkldnn._linear_pointwise", "torch.mm")}
        calls = iter(op for _, op in P._gemms(CPU, "fp32", 8))
        monkeypatch.setattr(P, "_best_seconds", lambda fn, dev: (secs[next(calls)], 1))
        P._measure.cache_clear()
        p = B.gemm_peak(CPU, "fp32", 8)
        assert p["op"] == fast and p["gflops"] == pytest.approx(2 * 8 ** 3 / 1e9)
    P._measure.cache_clear()


def test_gemm_peak_fp32_is_ieee():
    """The fp32 peak is IEEE fp32: oneDNN's fp32 matmul precision is forced to
    ieee while it runs (and given back), so no implicit bf16/TF32 speeds it up."""
    from fastgan.tools.benchmark import peak as P
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if getattr(mm, "fp32_precision", None) is None:
        pytest.skip("this torch has no mkldnn.matmul.fp32_precision")
    prev = mm.fp32_precision
    try:
        mm.fp32_precision = "bf16"
        seen = []
        for fn, _ in P._gemms(CPU, "fp32", 64):
            with P._ieee_onednn("fp32"):
                seen.append(mm.fp32_precision)
                y = fn()
            assert y.dtype == torch.float32
        assert set(seen) == {"ieee"} and mm.fp32_precision == "bf16"
    finally:
        mm.fp32_precision = prev


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


def _contender(name):
    return next(c for c in B.contenders(CPU) if c.name == name)


def _watch_first_linear(model):
    """What the first Linear of ``model`` sees inside the step: autocast state,
    its weight's dtype, its output's dtype."""
    seen = []
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(mod, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), mod.weight.dtype, out.dtype))
    lin.register_forward_hook(hook)
    return seen


def _ops_in_step(step):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("name, fused", [("eager", False), ("eager-fused-adam", True)])
def test_eager_fused_adam_is_fused(name, fused):
    """eager-fused-adam is the eager reference with torch.optim.Adam(fused=True):
    the optimizer says so and the step calls the fused kernel; eager does not."""
    step, G, D = B.build_step(_contender(name), 8, CPU)
    for opt in (step.engine.g_opt, step.engine.d_opt):
        assert type(opt) is torch.optim.Adam
        assert bool(opt.param_groups[0]["fused"]) is fused
    seen = _watch_first_linear(G)
    w = G.net[0][0].weight.detach().clone()
    ops = _ops_in_step(step)
    assert ("aten::_fused_adam_" in ops) is fused
    assert seen and all(s == (False, torch.float32, torch.float32) for s in seen)  # no autocast
    assert not torch.equal(w, G.net[0][0].weight)


@pytest.mark.parametrize("name, dtype", [("eager-bf16", "fp32"), ("eager", "bf16")])
def test_eager_bf16_is_autocast(name, dtype):
    """eager-bf16 (whatever the run's dtype label) and eager under the bf16 label
    run the reference under CPU autocast bf16: fp32 weights, bf16 GEMM outputs."""
    step, G, D = B.build_step(_contender(name), 8, CPU, dtype)
    seen_g, seen_d = _watch_first_linear(G), _watch_first_linear(D)
    out = step()
    assert torch.isfinite(out.d_loss) and out.d_loss.dtype == torch.float32
    for seen in (seen_g, seen_d):
        assert seen and all(s == (True, torch.float32, torch.bfloat16) for s in seen)
    assert all(p.dtype == torch.float32 for p in G.parameters())
    assert not step.engine.d_opt.param_groups[0]["fused"]   # eager's default Adam


@pytest.mark.parametrize("pass_", ["forward", "both"])
def test_eager_bf16_op_is_autocast(pass_):
    fn = B.build_op(_contender("eager-bf16"), "linear_bn_act", pass_, 8, CPU)
    out = fn()
    y = out if pass_ == "forward" else out[0]
    assert y.dtype == (torch.bfloat16 if pass_ == "forward" else torch.float32)  # dX: x's dtype


def _fastgan_cpu():
    if "cpu" not in fastgan.backends():
        pytest.skip(f"the cpu backend is not built: {backend.unavailable()}")
    return _contender("fastgan-cpu")


def test_fastgan_bf16_step_is_the_bf16_training_mode():
    """fastgan's bf16 is not autocast: bf16 Linear weights, BN in fp32, fp32
    master weights in the optimizer, the fused backend running."""
    P = pytest.importorskip("fastgan.train.precision")
    c = _fastgan_cpu()
    step, G, D = B.build_step(c, 8, CPU, "bf16")
    for model in (G, D):
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                assert m.weight.dtype == torch.bfloat16
            if isinstance(m, torch.nn.BatchNorm1d):
                assert m.weight.dtype == m.running_mean.dtype == torch.float32
    for opt in (step.engine.g_opt, step.engine.d_opt):
        assert isinstance(opt, P.MasterWeightAdam)
    seen = _watch_first_linear(G)
    before = sum(n for (b, _), n in backend.calls.items() if b == "cpu")
    w = G.net[0][0].weight.detach().clone()
    out = step()
    assert torch.isfinite(out.d_loss) and torch.isfinite(out.g_loss)
    assert seen and all(s == (False, torch.bfloat16, torch.bfloat16) for s in seen)
    assert sum(n for (b, _), n in backend.calls.items() if b == "cpu") > before
    assert not torch.equal(w, G.net[0][0].weight)
    # fp32 stays the fp32 engine: torch's fused Adam (FusedAdam), fp32 weights
    step32, G32, _ = B.build_step(c, 8, CPU, "fp32")
    assert type(step32.engine.d_opt) is fastgan.train.FusedAdam
    assert G32.net[0][0].weight.dtype == torch.float32


def test_fastgan_bf16_op_is_the_bf16_layer():
    pytest.importorskip("fastgan.train.precision")
    c = _fastgan_cpu()
    before = sum(backend.calls.values())
    gx, gw, *rest = B.build_op(c, "linear_bn_act", "both", 8, CPU, "bf16")()
    assert gx.dtype == gw.dtype == torch.bfloat16     # x and the Linear in bf16
    assert rest[-1].dtype == torch.float32            # BN's bias: fp32
    assert sum(backend.calls.values()) > before


def test_new_contenders_run_side_by_side():
    """The honest contenders and fastgan, fp32 and bf16, one quick run: every
    record timed, labelled with how it computed, ratios against the right rows."""
    pytest.importorskip("fastgan.train.precision")   # fastgan's bf16 training mode
    names = ("eager-all", "fastgan-reference")
    cfg = B.Config(device=CPU, batches=(4,), dtypes=("fp32", "bf16"), contenders=names,
                   ops=("linear_act",), passes=("both",), warmup=1, iters=2, min_time_s=0.0,
                   peak_n=128)
    records = B.run(cfg)
    got = {(r["kind"], r["contender"], r["dtype"]): r for r in records}
    # the op has no optimizer: eager-fused-adam times the step only
    assert len(got) == len(records) == 6 + 4
    assert ("op", "eager-fused-adam", "fp32") not in got
    for r in records:
        assert r["median_ms"] is not None, (r["contender"], r["dtype"], r["note"])
        if r["dtype"] == "bf16" and not NATIVE_BF16:   # no bf16 peak on this CPU
            assert r["peak_gflops"] is None and r["peak_frac"] is None
        else:
            assert r["peak_gflops"] > 0 and r["peak_frac"] is not None and r["peak_frac"] > 0
        assert r["gemm_gflops"] == pytest.approx(r["gflop"] / (r["median_ms"] / 1e3))
        fp32 = got[r["kind"], "eager", "fp32"]["median_ms"]
        same = got[r["kind"], "eager" if r["dtype"] == "fp32" else "eager-bf16", r["dtype"]]
        assert r["speedup_vs_eager_fp32"] == pytest.approx(fp32 / r["median_ms"])
        assert r["speedup_vs_eager"] == pytest.approx(same["median_ms"] / r["median_ms"])
    assert got["step", "eager-bf16", "bf16"]["precision"] == "autocast bf16"
    assert got["step", "eager-fused-adam", "bf16"]["precision"] == "autocast bf16"
    assert got["step", "eager", "fp32"]["precision"] == "fp32"
    assert got["step", "fastgan-reference", "bf16"]["precision"] == "bf16 weights, fp32 masters"


def test_run_records_and_schema(tmp_path):
    cfg = B.Config(device=CPU, batches=(4,), dtypes=("fp32", "bf16"),
                   contenders=("eager", "fastgan"), ops=("linear_act",), passes=("both",),
                   warmup=1, iters=2, min_time_s=0.0, peak_n=128)
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
    doc = json.loads(json.dumps(B.result(cfg, records, peaks=B.peaks(cfg))))
    B.validate(doc)
    assert doc["peaks"]["fp32"]["gflops"] > 0 and _bf16_peak_ok(doc["peaks"]["bf16"])
    assert doc["peaks"]["fp32"]["n"] == 128 == doc["config"]["peak_n"]
    assert ["eager", "bf16", "autocast bf16"] in doc["config"]["runs"]
    assert doc["machine"]["cpu"] and doc["machine"]["torch"] == torch.__version__
    del doc["records"][0]["median_ms"]
    with pytest.raises(ValueError, match="record 0"):
        B.validate(doc)


def test_failed_contender_is_recorded_not_fatal():
    c = B.Contender("eager", fused=False)
    cfg = B.Config(device=CPU, batches=(1,), contenders=("eager",), ops=(), warmup=1, iters=1,
                   min_time_s=0.0, peak=False)  # batch 1: BatchNorm refuses to train
    (r,) = B.run(cfg)
    assert r["contender"] == c.name and r["median_ms"] is None and "ValueError" in r["note"]


def test_bench_cli_quick(tmp_path, capsys):
    out = tmp_path / "res" / "b"
    rc = main(["bench", "--quick", "--threads", "1", "--contenders", "eager,fastgan", "--batch-sizes", "4",
               "--ops", "linear_bn_act,gan_bce", "--peak-size", "128", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train step" in text and "xeager" in text and "xfp32" in text and "%peak" in text
    assert "GEMM peak (" in text and "128³" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    B.validate(doc)
    assert doc["complete"] is True
    assert doc["peaks"]["fp32"]["gflops"] > 0 and _bf16_peak_ok(doc["peaks"]["bf16"])
    assert {r["pass"] for r in doc["records"] if r["kind"] == "op"} == {"both"}
    assert {r["dtype"] for r in doc["records"]} == {"fp32"}
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["records"]) and set(rows[0]) == set(B.RECORD_FIELDS)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_cli_peak_options():
    from fastgan.cli import bench as cli
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())

    def cfg(*argv):
        return cli.config_from_args(parser.parse_args(["bench", "--device", "cpu", *argv]))
    assert cfg().peak_n == 4096 and cfg().peak
    assert cfg("--quick").peak_n == 1024      # CI's smoke run stays fast
    assert cfg("--peak-size", "512").peak_n == 512
    assert not cfg("--no-peak").peak
    assert B.peaks(cfg("--no-peak")) == {}
    assert "eager-fused-adam" in [c.name for c in B.contenders(CPU, cfg().contenders)]


def test_bench_cli_bad_arguments(capsys):
    assert main(["bench", "--batch-sizes", "64,x"]) == 1
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["bench", "--ops", "conv"]) == 1
    assert "conv" in capsys.readouterr().err
    assert main(["bench", "--contenders", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--peak-size", "0"]) == 1
    assert "--peak-size" in capsys.readouterr().err
