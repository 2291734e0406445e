"""Layer 3, tools over the ops and the engine: throughput benchmarks
(``benchmark``) and sample quality (``quality``)."""
