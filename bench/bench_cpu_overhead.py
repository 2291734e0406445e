"""Per-call cost of one fused layer on the CPU eager fast path (issue 11, item 4).

The measurement is ``bench/bench_drop_in.py overhead`` (one implementation:
layer, functional op, C++ forward and plain ``nn.Sequential``, train and
eval, wall clock and thread CPU time); this command runs it under the name
and output path the issue 11 notes cite.

    python bench/bench_cpu_overhead.py [--out bench/results/issue11-overhead.json] [--threads 2]

Other options (``--samples``, ``--repeat``, ``--modes``) go to ``bench_drop_in.py overhead``.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/issue11-overhead.json")
    ap.add_argument("--threads", type=int, default=2)
    a, rest = ap.parse_known_args(argv)
    drop_in = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "bench_drop_in.py"))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    return drop_in["main"](["overhead", a.out, "--threads", str(a.threads), *rest])


if __name__ == "__main__":
    sys.exit(main())
