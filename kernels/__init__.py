"""Triton kernels of fastgan (shipped as ``fastgan.kernels``). Placeholder until
the Triton backend lands: reports itself unavailable."""
name = "triton"


def available():
    return False, "the Triton backend is not implemented yet"


def supports(device):
    return False
