"""fuse never makes a model slower: the speed rule (``fastgan.nn.fuse.speed``),
checked structurally, with no timing.

* The table against the measurements it was calibrated from (the result files
  its ``CALIBRATION`` names): no cell where the forced fused op lost may fuse.
* ``calibrate`` itself, on made-up cells: it leaves every loss plain.
* It is the one decision every call makes: where it says "no gain" a fused
  model calls no fastgan op and computes exactly what the plain model does.
"""
import copy
import os
import re

import pytest
import torch
from torch import nn

import fastgan
from fastgan import backend
from fastgan.fuse import fuse
from fastgan.nn.fuse import speed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_backend():
    if speed.backend("cpu") != "cpu":
        pytest.skip("the cpu backend is not built here")


def _calibration():
    """(dtype, GEMM path, hardware, result files, measure, noise) of each note in
    ``CALIBRATION``."""
    for (dtype, gemm, kind), note in speed.CALIBRATION.items():
        note = "".join(note)
        files = re.findall(r"bench/results/[\w.-]+\.json", note)
        noise = float(re.search(r"noise ([0-9.]+)", note).group(1)) if "noise" in note else 0.0
        yield dtype, gemm, kind, files, "min" if "by min" in note else "median", noise


def test_no_measured_loss_fuses():
    """Every cell of the calibration's result files where the forced fused op was
    slower than plain beyond the calibration's noise (by its own measure) takes
    the plain path, for the GEMM path and hardware it was measured with (whatever
    this machine's)."""
    checked = 0
    for dtype, gemm, kind, files, by, noise in _calibration():
        files = [os.path.join(ROOT, f) for f in files]
        if not files or not all(os.path.exists(f) for f in files):
            pytest.skip(f"the calibration's result files are not here: {files}")
        cells = [c for f in files for c in speed.load_cells(f)
                 if speed.cell_key(c)[:3] == (dtype, gemm, kind)]
        assert cells, (dtype, gemm, kind, files)
        for c in cells:
            *_, bn, dropout, grad = speed.cell_key(c)
            k, n = map(int, c["layer"].split("->"))
            why = speed.no_gain("cpu", getattr(torch, dtype), c["batch"], k, n,
                                None if bn == "none" else bn == "train",
                                0.2 if dropout else 0.0, grad, name="cpu", gemm_path=gemm,
                                kind=kind)
            if speed.cell_speedup(c, by) < 1.0 - noise:
                assert why is not None, f"the rule fuses a cell measured slower: {c}"
            checked += 1
    assert checked


def test_every_row_has_its_calibration():
    """Each (dtype, GEMM path, hardware) with rows names the run it was calibrated from."""
    assert {key[:3] for key in speed.TABLE["cpu"]} == set(speed.CALIBRATION)


def test_calibrate_leaves_every_loss_plain():
    def cell(b, layer, s, mode="train", bn=False, p=0.0, pass_="fwd+bwd", dtype="fp32"):
        return dict(batch=b, layer=layer, speedup=s, mode=mode, bn=bn, dropout=p,
                    pass_=pass_, dtype=dtype)
    cells = [cell(1, "100->128", 0.5), cell(16, "100->128", 0.9), cell(64, "100->128", 1.1),
             cell(1, "512->1024", 0.8), cell(16, "512->1024", 1.2), cell(64, "512->1024", 1.5),
             cell(64, "8->8", 0.7),                                 # small work loses
             cell(64, "100->128", 0.6, dtype="bf16"),               # a kind that only lost
             cell(4, "8->8", 1.3, mode="eval", pass_="fwd")]        # a kind that only won
    rows = speed.calibrate(cells)
    mb, mw = rows[("float32", "onednn", "", "none", False, True)]   # (no path: oneDNN)
    for c in cells[:7]:
        fused = c["batch"] >= mb and speed.cell_work(c) >= mw
        assert fused == (c["speedup"] >= 1.0), c
    assert (mb, mw) == (1, 64 * 100 * 128)   # the most wins, every loss left out
    assert rows[("bfloat16", "onednn", "", "none", False, True)] == (65, 64 * 100 * 128 + 1)
    assert rows[("float32", "onednn", "", "none", False, False)] == (4, 4 * 64)


def test_calibrate_leaves_a_losing_narrow_layer_plain(monkeypatch):
    """A discriminator's last layer (N = 1) that loses at every batch does not hold the
    wide layers of its kind back to its sizes: the row gets a min_out instead."""
    def cell(b, layer, s):
        return dict(batch=b, layer=layer, speedup=s, mode="train", bn=False, dropout=0.0,
                    pass_="fwd+bwd", dtype="fp32")
    cells = [cell(b, "256->1", 0.7) for b in (64, 1024, 4096)] + \
            [cell(b, "100->128", 1.2) for b in (16, 64, 1024)]
    rows = speed.calibrate(cells)
    key = ("float32", "onednn", "", "none", False, True)
    min_batch, min_work, min_out = rows[key]
    assert (min_batch, min_out) == (16, 128) and min_work <= 16 * 100 * 128
    for c in cells:
        assert speed.fused_in(c, rows[key]) == (c["speedup"] > 1)
    cpu_backend()
    monkeypatch.setitem(speed.TABLE, "cpu", rows)
    speed.reset()
    assert "or 128 output features" in speed.no_gain("cpu", torch.float32, 4096, 256, 1, None, 0.0,
                                                     gemm_path="onednn", kind="")
    assert speed.no_gain("cpu", torch.float32, 64, 100, 128, None, 0.0, gemm_path="onednn",
                         kind="") is None
    # a two-number row (no min_out) reads as min_out 1
    assert speed.fused_in(cell(64, "256->1", 0.7), (1, 0))


def test_rows_are_per_gemm_path_and_follow_the_policy(monkeypatch):
    """A row measured with one GEMM path is not read for another (oneDNN's rows say
    nothing where the plain layers' GEMM is the fused op's own, or 6x slower); the
    layers' cached answers follow a change of the cpu backend's GEMM policy."""
    cpu_backend()
    from fastgan.impl import cpu
    kind = (speed.hardware("cpu"), "none", True, True)
    monkeypatch.setitem(speed.TABLE, "cpu", {("bfloat16", "widened", *kind): (1, 0),
                                             ("bfloat16", "aten", *kind): None})
    speed.reset()
    args = ("cpu", torch.bfloat16, 64, 256, 512, None, True, True)
    try:
        with cpu.gemm_policy("widen"):
            assert speed.fused_wins(*args)
        with cpu.gemm_policy("aten"):
            assert not speed.fused_wins(*args)
            assert speed.no_gain("cpu", torch.bfloat16, 64, 256, 512, None, 0.2) == speed.NEVER
        assert speed.no_gain("cpu", torch.bfloat16, 64, 256, 512, None, 0.2,
                             gemm_path="onednn") == speed.UNMEASURED
    finally:
        speed.reset()


def test_rows_are_per_hardware_kind(monkeypatch):
    """Each kind of CPU reads its own rows (MKL runs AVX-512 on Intel only: the plain
    layers' fp32 GEMM is 2x faster there than on an AMD CPU with the same ISA); a
    kind with no rows reads those of the same ISA level, else of any kind measured
    with the GEMM path."""
    call = ("float32", "aten", "none", True, True)

    def rows(*kinds):
        return {(*call[:2], kind, *call[2:]): (1, 0) if kind == "intel-avx512" else None
                for kind in kinds}
    args = (torch.float32, 64, 512, 1024, None, 0.2)
    monkeypatch.setitem(speed.TABLE, "cpu", rows("intel-avx512", "amd-avx512", "amd-avx2"))
    speed.reset()
    try:
        def no_gain(kind):
            return speed.no_gain("cpu", *args, name="cpu", gemm_path="aten", kind=kind)
        assert no_gain("intel-avx512") is None
        assert no_gain("amd-avx512") == speed.NEVER
        assert no_gain("intel-avx2") == speed.NEVER            # amd-avx2's rows: same ISA
        assert speed.measured_kind("cpu", "float32", "aten", "intel-avx2") == "amd-avx2"
        assert speed.measured_kind("cpu", "float32", "aten", "aarch64-default") == "amd-avx2"
        assert speed.measured_kind("cpu", "float32", "onednn", "intel-avx512") == ""
        monkeypatch.setitem(speed.TABLE, "cpu", rows("intel-avx512"))
        speed.reset()
        assert no_gain("amd-avx2") is None                      # the only kind measured
    finally:
        speed.reset()


def test_this_machine_has_a_hardware_kind():
    cpu_backend()
    from fastgan.impl import cpu
    vendor, _, isa = cpu.hardware().rpartition("-")
    assert vendor and isa == torch.backends.cpu.get_cpu_capability().lower()
    assert speed.hardware("cpu") == cpu.hardware() == cpu.gemm_info()["hardware"]
    if os.path.exists("/proc/cpuinfo"):
        info = open("/proc/cpuinfo").read()
        want = ("intel" if "GenuineIntel" in info else "amd" if "AuthenticAMD" in info
                else None)
        if want is not None:
            assert vendor == want


def test_old_result_files_get_their_hardware():
    """Result files written before the hardware was recorded: told apart by their
    gemm_info (the three machines they came from)."""
    assert speed.file_hardware({"gemm_info": {"aten_fp32_avx512": True}}) == "intel-avx512"
    assert speed.file_hardware({"gemm_info": {"onednn": {"float32": True}}}) == "amd-avx512"
    assert speed.file_hardware({"gemm_info": {"onednn": {"float32": False}}}) == "amd-avx2"
    assert speed.file_hardware({"gemm_info": {"hardware": "intel-avx2"}}) == "intel-avx2"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_unmeasured_dtypes_stay_plain_on_the_cpu(dtype):
    cpu_backend()
    assert speed.no_gain("cpu", dtype, 256, 1024, 1024, True, 0.2) == speed.UNMEASURED


def test_the_reference_backend_and_other_devices_never_gain():
    with fastgan.use_backend("reference"):
        assert speed.no_gain("cpu", torch.float32, 256, 1024, 1024, True, 0.2) == speed.REFERENCE
    assert speed.no_gain("mps", torch.float32, 256, 1024, 1024, True, 0.2) == speed.NO_BACKEND


@pytest.mark.parametrize("bn_training,p", [(None, 0.0), (None, 0.2), (True, 0.0), (False, 0.0)])
def test_cuda_backends_fuse_until_measured(bn_training, p):
    """No GPU has run the matrix: the CUDA backends have no table and fuse everywhere."""
    for name in ("triton", "cuda"):
        assert name not in speed.TABLE
        assert speed.no_gain("cuda", torch.float32, 1, 8, 8, bn_training, p, name=name) is None


def test_autocast_counts_as_its_dtype(dropout_only_rule):
    cpu_backend()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Dropout(0.3))
    model, report = fuse(copy.deepcopy(plain))
    assert report.fused   # fp32, dropout, 512 x 512: fuses
    x = torch.randn(64, 512)
    before = backend.calls[("cpu", "linear_act_forward")]
    model(x)
    assert backend.calls[("cpu", "linear_act_forward")] == before + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert backend.calls[("cpu", "linear_act_forward")] == before + 1


def test_where_the_rule_says_no_the_model_is_the_plain_model(dropout_only_rule):
    """A layer too small to gain, in training with dropout: plain PyTorch runs, with
    nn.Dropout's own random stream, bit for bit the untouched model's result."""
    cpu_backend()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(100, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.2),
                          nn.Dropout(0.2), nn.Linear(128, 1))
    model, _ = fuse(copy.deepcopy(plain))   # (a batch of 656 rows would gain: it plans it)
    assert "measured slower than the plain layers below batch 64" in \
        speed.no_gain("cpu", torch.float32, 64, 100, 128, True, 0.2)
    x = torch.randn(64, 100)
    calls = dict(backend.calls)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    assert torch.equal(y, plain(x)) and dict(backend.calls) == calls


def test_the_report_and_the_calls_agree(dropout_only_rule):
    """The report's verdict, taken at fuse time, is what the calls then do."""
    cpu_backend()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 512), nn.Dropout(0.3), nn.LeakyReLU(0.2))
    _, report = fuse(model)
    verdict = {r.path: r.fused for r in report.runs}
    assert verdict == {"0": True, "4": False, "6": True}
    assert "in eval mode it runs unfused" in report.runs[0].notes[0]
    before = {op: backend.calls[("cpu", op)] for op in ("linear_act_forward",
                                                        "linear_bn_act_forward")}
    model(torch.randn(64, 512))
    assert backend.calls[("cpu", "linear_bn_act_forward")] == before["linear_bn_act_forward"] + 1
    assert backend.calls[("cpu", "linear_act_forward")] == before["linear_act_forward"] + 1
