"""Time to quality: the seed GAN trained by fastgan and by the eager reference,
same hyper-parameters and seeds, scored as it trains; the wall-clock each
needs to reach a Fréchet distance, and a summary over seeds."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .judge import Judge, load_judge
from .metrics import features_and_probs, real_floor, scores

# The seed GAN passes it after about 1,000 steps of batch 64 on the 5,000-digit
# subset (FD 110 at step 1,092 in one run; the real-vs-real floor is 0.64).
DEFAULT_FD_THRESHOLD = 150.0


def train_curve(reference: bool, images: Tensor, judge: Judge, seed: int = 0,
                batch: int = 64, max_steps: int = 2000, eval_every: int = 250,
                threshold: Optional[float] = None, stop_at_threshold: bool = False,
                n_eval: int = 1000, device="cpu", backend: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Train the seed GAN with the engine (``fastgan.train.Trainer``) and score it
    every ``eval_every`` steps. Wall-clock counts training steps only (evaluation
    time is excluded); returns the curve and the time the FD first reached
    ``threshold``."""
    from ...ops import dispatch as _backend
    from ...train import TrainConfig, Trainer

    cfg = TrainConfig(batch_size=batch, seed=seed, reference=reference)
    trainer = Trainer(cfg, images, device=device, graphs=None if not reference else False)
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    z = torch.randn(n_eval, cfg.latent_dim, generator=torch.Generator().manual_seed(10_000 + seed))
    curve, train_s, reached = [], 0.0, None
    dev = torch.device(device)
    with _backend.use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(1, max_steps + 1):
            t0 = time.perf_counter()
            trainer.train_step()
            if step % eval_every == 0 or step == max_steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                train_s += time.perf_counter() - t0
                s = scores(judge.model, trainer.sample(z), test_feats)
                curve.append({"step": step, "train_s": train_s, "fd": s["fd"], "is": s["is"],
                              "classes": s["classes"], "kl_uniform": s["kl_uniform"]})
                if log:
                    log(f"{'reference' if reference else 'fastgan'} seed {seed} step {step}: "
                        f"FD {s['fd']:.2f}, IS {s['is']:.2f}, classes {s['classes']}, "
                        f"{train_s:.1f} s training")
                if threshold is not None and reached is None and s["fd"] <= threshold:
                    reached = {"step": step, "train_s": train_s}
                    if stop_at_threshold:
                        break
            else:
                train_s += time.perf_counter() - t0
    return {"contender": "eager" if reference else "fastgan", "seed": seed, "batch": batch,
            "backend": None if reference else (backend or _backend.select(dev)),
            "curve": curve, "final": curve[-1] if curve else None, "reached": reached,
            "threshold": threshold}


def time_to_quality_run(device="cpu", seeds=(0,), batch: int = 64, max_steps: int = 2000,
                        eval_every: int = 250, threshold: Optional[float] = None,
                        data=None, cache_dir=None, stop_at_threshold: bool = False,
                        log: Optional[Callable[[str], None]] = None) -> dict:
    """fastgan vs the eager reference, same hyper-parameters, each seed: the
    wall-clock to reach the FD threshold and the final scores. A JSON-able dict."""
    from ...train.data import load_mnist
    from ..benchmark import machine_info

    ds = load_mnist(data)
    judge = load_judge(ds.images, ds.labels, cache_dir=cache_dir, source=ds.source, log=log)
    threshold = DEFAULT_FD_THRESHOLD if threshold is None else float(threshold)
    floor = real_floor(judge)
    runs = []
    for seed in seeds:
        for reference in (True, False):
            runs.append(train_curve(reference, judge.train[0], judge, seed=seed, batch=batch,
                                    max_steps=max_steps, eval_every=eval_every,
                                    threshold=threshold, stop_at_threshold=stop_at_threshold,
                                    device=device, log=log))
    return {"schema": "fastgan-quality/1", "machine": machine_info(torch.device(device)),
            "data": ds.source, "classifier": judge.info, "real_floor": _strip(floor),
            "threshold": threshold, "batch": batch, "max_steps": max_steps,
            "eval_every": eval_every, "runs": runs, "summary": summarize(runs)}


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "histogram"}


def summarize(runs: list) -> dict:
    """Per contender: final FD mean/std over seeds, median time to threshold."""
    out = {}
    for name in sorted({r["contender"] for r in runs}):
        rs = [r for r in runs if r["contender"] == name]
        fds = np.array([r["final"]["fd"] for r in rs if r["final"]])
        times = [r["reached"]["train_s"] for r in rs if r["reached"]]
        out[name] = {"seeds": len(rs), "final_fd_mean": float(fds.mean()) if fds.size else None,
                     "final_fd_std": float(fds.std(ddof=1)) if fds.size > 1 else None,
                     "final_fd": fds.tolist(),
                     "reached": f"{len(times)}/{len(rs)}",
                     "time_to_threshold_s_median": float(np.median(times)) if times else None,
                     "train_s_total_mean": float(np.mean([r["final"]["train_s"] for r in rs
                                                          if r["final"]])) if rs else None}
    return out


def format_time_to_quality(doc: dict) -> str:
    f = doc["real_floor"]
    lines = [f"data: {doc['data']}",
             f"classifier: test accuracy {doc['classifier']['test_accuracy']:.3f} "
             f"({doc['classifier']['path']})",
             f"real-vs-real floor: FD {f['fd']:.2f}, IS {f['is']:.2f}, classes {f['classes']}",
             f"threshold: FD <= {doc['threshold']}, batch {doc['batch']}, "
             f"up to {doc['max_steps']} steps",
             f"{'contender':<10} {'seeds':>5} {'final FD (mean ± std)':>24} {'reached':>8} "
             f"{'time to FD (median s)':>22} {'train s (mean)':>15}"]
    for name, s in doc["summary"].items():
        fd = "-" if s["final_fd_mean"] is None else (
            f"{s['final_fd_mean']:.2f} ± {s['final_fd_std']:.2f}" if s["final_fd_std"] is not None
            else f"{s['final_fd_mean']:.2f}")
        t = "-" if s["time_to_threshold_s_median"] is None else f"{s['time_to_threshold_s_median']:.1f}"
        lines.append(f"{name:<10} {s['seeds']:>5} {fd:>24} {s['reached']:>8} {t:>22} "
                     f"{s['train_s_total_mean']:>15.1f}")
    return "\n".join(lines)
