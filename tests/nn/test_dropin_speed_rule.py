"""fuse never makes a model slower: the speed rule (``fastgan.nn.fuse.speed``),
checked structurally, with no timing.

* Against the measurements it was built from (bench/results/issue13-fuse-speed-rule.md):
  no measured cell where the fused op lost may fuse.
* It is the one decision every call makes: where it says "no gain" a fused
  model calls no fastgan op and computes exactly what the plain model does.
"""
import copy

import pytest
import torch
from torch import nn

import fastgan
from fastgan import backend
from fastgan.fuse import fuse
from fastgan.nn.fuse import speed

# (op, in_features, out_features, dropout p, batch, measured fused / eager), the cpu
# backend against eager, training forward+backward, fp32, 1 thread (bench_ops.py runs
# of bench/results/issue13-fuse-speed-rule.md and bench/results/cpu-amd-epyc.md).
MEASURED = [
    ("linear_bn_act", 512, 512, 0.4, 64, 1.04), ("linear_act", 512, 512, 0.4, 64, 1.12),
    ("linear_bn_act", 256, 512, 0.2, 64, 1.08), ("linear_act", 256, 512, 0.2, 64, 1.11),
    ("linear_bn_act", 1024, 784, 0.3, 64, 1.09), ("linear_act", 1024, 784, 0.3, 64, 1.07),
    ("linear_act", 1024, 784, 0.3, 256, 1.06), ("linear_act", 784, 1024, 0.2, 256, 1.14),
    ("linear_bn_act", 512, 1024, 0.2, 64, 1.05), ("linear_bn_act", 512, 1024, 0.2, 256, 1.12),
    ("linear_bn_act", 100, 128, 0.2, 64, 0.75), ("linear_act", 100, 128, 0.2, 64, 0.79),
    ("linear_bn_act", 128, 256, 0.0, 64, 0.55), ("linear_act", 128, 256, 0.0, 64, 0.67),
    ("linear_bn_act", 512, 1024, 0.0, 64, 0.81), ("linear_act", 512, 1024, 0.0, 64, 0.88),
]
NOISE = 0.1   # run-to-run spread of these ratios on the shared 2-vCPU VM


def cpu_backend():
    if speed.backend("cpu") != "cpu":
        pytest.skip("the cpu backend is not built here")


@pytest.mark.parametrize("op,k,n,p,batch,ratio", MEASURED)
def test_no_measured_loss_fuses(op, k, n, p, batch, ratio):
    cpu_backend()
    why = speed.no_gain("cpu", torch.float32, batch, k, n, True if op == "linear_bn_act" else None,
                        p)
    if why is None:
        assert ratio >= 1.0 - NOISE, "the rule fuses a cell measured slower than eager"
    if ratio < 1.0 - NOISE:
        assert why is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cpu_fuses_only_fp32(dtype):
    cpu_backend()
    assert speed.no_gain("cpu", dtype, 256, 1024, 1024, True, 0.2) == speed.CPU_DTYPE


def test_the_reference_backend_and_other_devices_never_gain():
    with fastgan.use_backend("reference"):
        assert speed.no_gain("cpu", torch.float32, 256, 1024, 1024, True, 0.2) == speed.REFERENCE
    assert speed.no_gain("mps", torch.float32, 256, 1024, 1024, True, 0.2) == speed.NO_BACKEND


@pytest.mark.parametrize("bn_training,p,fuses", [(None, 0.0, False), (None, 0.2, True),
                                                 (True, 0.0, True), (False, 0.0, False)])
def test_cuda_rule(bn_training, p, fuses):
    if speed.backend("cuda") is None:
        pytest.skip("no CUDA backend here")
    assert (speed.no_gain("cuda", torch.float32, 64, 256, 256, bn_training, p) is None) == fuses


def test_autocast_counts_as_its_dtype():
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


def test_where_the_rule_says_no_the_model_is_the_plain_model():
    """A layer too small to gain, in training with dropout: plain PyTorch runs, with
    nn.Dropout's own random stream, bit for bit the untouched model's result."""
    cpu_backend()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(100, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.2),
                          nn.Dropout(0.2), nn.Linear(128, 1))
    model, report = fuse(copy.deepcopy(plain))
    assert not report.fused and speed.CPU_SMALL in report.unfused[0].reason
    x = torch.randn(64, 100)
    calls = dict(backend.calls)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    assert torch.equal(y, plain(x)) and dict(backend.calls) == calls


def test_the_report_and_the_calls_agree():
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
