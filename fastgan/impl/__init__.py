"""Layer 2, the implementations: one module per backend, named as the backend.

* ``reference``: plain PyTorch, the specification every other backend is tested against;
* ``cpu``: the C++ kernels of ``fastgan._C`` (csrc/cpu);
* ``cuda``: the CUDA kernels of ``fastgan._C`` (csrc/cuda);
* ``triton``: the Triton kernels of ``fastgan.kernels`` (kernels/).

Each defines ``name``, ``available()``, ``supports(device)`` and the functions of
``fastgan.ops.spec.BACKEND_FUNCTIONS``, with the reference's signatures. They
import nothing above ``fastgan.ops.spec``; ``fastgan.ops.dispatch`` loads them by name.
"""


def keep_cpu_heap(device) -> bool:
    """On the CPU, keep freed tensor memory in the heap for the next step
    (``cpu.keep_freed_memory``; see csrc/cpu/memory.cpp). The training engine and
    ``fastgan bench`` call it; a no-op elsewhere or without the extension."""
    if getattr(device, "type", device) != "cpu":
        return False
    try:
        from . import cpu
    except ImportError:  # fastgan._C not built: nothing of ours to tune
        return False
    return cpu.keep_freed_memory()
