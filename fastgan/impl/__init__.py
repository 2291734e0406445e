"""Layer 2, the implementations: one module per backend, named as the backend.

* ``reference``: plain PyTorch, the specification every other backend is tested against;
* ``cpu``: the C++ kernels of ``fastgan._C`` (csrc/cpu);
* ``cuda``: the CUDA kernels of ``fastgan._C`` (csrc/cuda);
* ``triton``: the Triton kernels of ``fastgan.kernels`` (kernels/).

Each defines ``name``, ``available()``, ``supports(device)`` and the functions of
``fastgan.ops.spec.BACKEND_FUNCTIONS``, with the reference's signatures. They
import nothing above ``fastgan.ops.spec``; ``fastgan.ops.dispatch`` loads them by name.
"""
