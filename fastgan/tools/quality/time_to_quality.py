"""Time to quality: the seed GAN trained under several settings ("variants"),
same seeds, side by side, scored as it trains; each variant's scores at equal
steps and at equal wall-clock, the time each needs to reach a Fréchet
distance, and a summary over seeds.

The variants of one seed train in lockstep, one step each in turn, so a change
in the machine's load slows all of them alike; only the training steps are
timed (evaluation is not). Variants (``VARIANTS``): ``fastgan`` (the engine,
default settings), ``eager`` (the plain-PyTorch loop, default settings),
``alternating`` and ``simultaneous`` (the engine with that schedule), ``seed``
(``--preset seed``: the seed GAN's own settings, batch 32), ``fastgan-bf16``
(the engine, default settings, ``--dtype bf16``: bf16 weights with fp32
master weights, ``fastgan.train.precision``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .judge import Judge, load_judge
from .metrics import features_and_probs, real_floor, scores

# The seed GAN passes it after 500-1,000 steps of batch 64 on the 5,000-digit
# subset (bench/results/issue12-schedules.md; the real-data floor on 1,000
# images is FD 2.0, an untrained G 711).
DEFAULT_FD_THRESHOLD = 150.0


def variant_config(name: str, batch: int, seed: int) -> dict:
    """The ``TrainConfig`` fields of variant ``name`` (``batch`` unless it sets its own)."""
    from ...train.config import preset
    base = {"batch_size": batch, "seed": seed}
    table = {"fastgan": {}, "eager": {"reference": True},
             "alternating": {"schedule": "alternating"},
             "simultaneous": {"schedule": "simultaneous"}, "fastgan-bf16": {"dtype": "bf16"}}
    if name == "seed":
        return {**base, **preset("seed"), "seed": seed}
    if name not in table:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    return {**base, **table[name]}


VARIANTS = ("fastgan", "eager", "alternating", "simultaneous", "seed", "fastgan-bf16")


def train_curves(variants: Sequence[str], images: Tensor, judge: Judge, seed: int = 0,
                 batch: int = 64, max_steps: int = 2000, eval_every: int = 250,
                 threshold: Optional[float] = None, n_eval: int = 1000, device="cpu",
                 backend: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None,
                 on_done: Optional[Callable[[dict, object], None]] = None) -> list[dict]:
    """Train one ``Trainer`` per variant in lockstep and score each every
    ``eval_every`` steps on ``n_eval`` images of fixed noise. Returns one run
    dict per variant: its curve (step, images seen, training seconds, FD, IS,
    classes, KL) and the first point where FD reached ``threshold``.
    ``on_done(run, trainer)`` is called for each variant after its last step
    (e.g. to save a sample grid)."""
    from ...ops import dispatch as _backend
    from ...train import TrainConfig, Trainer

    dev = torch.device(device)
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    runs = []
    for name in variants:
        cfg = TrainConfig(**variant_config(name, batch, seed))
        trainer = Trainer(cfg, images, device=device, graphs=False if cfg.reference else None)
        z = torch.randn(n_eval, cfg.latent_dim,
                        generator=torch.Generator().manual_seed(10_000 + seed))
        runs.append({"contender": name, "seed": seed, "batch": cfg.batch_size,
                     "config": cfg.to_dict(), "trainer": trainer, "z": z, "train_s": 0.0,
                     "backend": None if cfg.reference else (backend or _backend.select(dev)),
                     "curve": [], "reached": None, "threshold": threshold})
    with _backend.use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(1, max_steps + 1):
            for r in runs:
                t0 = time.perf_counter()
                r["trainer"].train_step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                r["train_s"] += time.perf_counter() - t0
            if step % eval_every and step != max_steps:
                continue
            for r in runs:
                s = scores(judge.model, r["trainer"].sample(r["z"]), test_feats)
                point = {"step": step, "images": step * r["batch"], "train_s": r["train_s"],
                         "fd": s["fd"], "is": s["is"], "classes": s["classes"],
                         "kl_uniform": s["kl_uniform"]}
                r["curve"].append(point)
                if log:
                    log(f"{r['contender']} seed {seed} step {step}: FD {s['fd']:.2f}, "
                        f"IS {s['is']:.2f}, classes {s['classes']}, {r['train_s']:.1f} s training")
                if threshold is not None and r["reached"] is None and s["fd"] <= threshold:
                    r["reached"] = {"step": step, "train_s": r["train_s"]}
    for r in runs:
        trainer = r.pop("trainer")
        del r["z"], r["train_s"]
        r["final"] = r["curve"][-1] if r["curve"] else None
        if on_done is not None:
            on_done(r, trainer)
    return runs


def train_curve(reference: bool, images: Tensor, judge: Judge, seed: int = 0,
                batch: int = 64, max_steps: int = 2000, eval_every: int = 250,
                threshold: Optional[float] = None, n_eval: int = 1000, device="cpu",
                backend: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """One run of ``train_curves``: the eager reference loop or the engine, defaults."""
    return train_curves(("eager" if reference else "fastgan",), images, judge, seed, batch,
                        max_steps, eval_every, threshold, n_eval, device, backend, log)[0]


def time_to_quality_run(device="cpu", seeds=(0,), batch: int = 64, max_steps: int = 2000,
                        eval_every: int = 250, threshold: Optional[float] = None,
                        data=None, cache_dir=None, variants: Sequence[str] = ("eager", "fastgan"),
                        n_eval: int = 1000,
                        log: Optional[Callable[[str], None]] = None,
                        on_done: Optional[Callable[[dict, object], None]] = None) -> dict:
    """Each variant for each seed (``train_curves``), scored against the real
    floor of ``n_eval`` images; a JSON-able dict with the summary."""
    from ...train.data import load_mnist
    from ..benchmark import machine_info

    for name in variants:
        variant_config(name, batch, 0)  # an unknown name fails before any training
    ds = load_mnist(data)
    judge = load_judge(ds.images, ds.labels, cache_dir=cache_dir, source=ds.source, log=log)
    threshold = DEFAULT_FD_THRESHOLD if threshold is None else float(threshold)
    floor = real_floor(judge, n_eval)
    runs = []
    for seed in seeds:
        runs += train_curves(variants, judge.train[0], judge, seed=seed, batch=batch,
                             max_steps=max_steps, eval_every=eval_every, threshold=threshold,
                             n_eval=n_eval, device=device, log=log, on_done=on_done)
    return {"schema": "fastgan-quality/2", "machine": machine_info(torch.device(device)),
            "data": ds.source, "classifier": judge.info, "real_floor": _strip(floor),
            "threshold": threshold, "batch": batch, "max_steps": max_steps,
            "eval_every": eval_every, "n_eval": n_eval, "variants": list(variants),
            "runs": runs, "summary": summarize(runs)}


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "histogram"}


def at_time(curve: list, seconds: float) -> Optional[dict]:
    """The last point of ``curve`` trained within ``seconds`` (None if none was)."""
    points = [p for p in curve if p["train_s"] <= seconds * (1 + 1e-9)]
    return points[-1] if points else None


def _mean_std(xs) -> tuple:
    xs = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if not xs.size:
        return None, None
    return float(xs.mean()), (float(xs.std(ddof=1)) if xs.size > 1 else None)


def summarize(runs: list) -> dict:
    """Per variant, over seeds: the final scores (equal steps), the scores at
    equal wall-clock (each seed at the training time of its fastest variant),
    and the median time to the threshold."""
    budget = {}
    for r in runs:
        if r["final"]:
            s = r["seed"]
            budget[s] = min(budget.get(s, float("inf")), r["final"]["train_s"])
    out = {}
    for name in dict.fromkeys(r["contender"] for r in runs):
        rs = [r for r in runs if r["contender"] == name]
        final = [r["final"] for r in rs if r["final"]]
        timed = [at_time(r["curve"], budget[r["seed"]]) for r in rs if r["final"]]
        times = [r["reached"]["train_s"] for r in rs if r["reached"]]
        row = {"seeds": len(rs), "reached": f"{len(times)}/{len(rs)}",
               "time_to_threshold_s_median": float(np.median(times)) if times else None,
               "train_s_total_mean": _mean_std(p["train_s"] for p in final)[0],
               "final_fd": [p["fd"] for p in final]}
        for label, points in (("final", final), ("equal_time", timed)):
            for key in ("fd", "is", "classes"):
                m, sd = _mean_std(p[key] if p else None for p in points)
                row[f"{label}_{key}_mean"], row[f"{label}_{key}_std"] = m, sd
        row["equal_time_steps_mean"] = _mean_std(p["step"] if p else None for p in timed)[0]
        out[name] = row
    return out


def _pm(mean, std, spec=".2f") -> str:
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def format_time_to_quality(doc: dict) -> str:
    f = doc["real_floor"]
    lines = [f"data: {doc['data']}",
             f"classifier: test accuracy {doc['classifier']['test_accuracy']:.3f} "
             f"({doc['classifier']['path']})",
             f"real-data floor ({f['n']} real images): FD {f['fd']:.2f}, IS {f['is']:.2f}, "
             f"classes {f['classes']}",
             f"threshold: FD <= {doc['threshold']}, up to {doc['max_steps']} steps; "
             "equal time: each seed at its fastest variant's training time",
             f"{'variant':<13} {'seeds':>5} {'FD equal steps':>16} {'IS':>12} {'classes':>11} "
             f"{'FD equal time':>16} {'(steps)':>8} {'reached':>8} {'to FD (s)':>10} "
             f"{'train s':>8}"]
    for name, s in doc["summary"].items():
        t = s["time_to_threshold_s_median"]
        steps = s["equal_time_steps_mean"]
        lines.append(
            f"{name:<13} {s['seeds']:>5} {_pm(s['final_fd_mean'], s['final_fd_std']):>16} "
            f"{_pm(s['final_is_mean'], s['final_is_std']):>12} "
            f"{_pm(s['final_classes_mean'], s['final_classes_std'], '.1f'):>11} "
            f"{_pm(s['equal_time_fd_mean'], s['equal_time_fd_std']):>16} "
            f"{'-' if steps is None else f'{steps:.0f}':>8} {s['reached']:>8} "
            f"{'-' if t is None else f'{t:.1f}':>10} "
            f"{_pm(s['train_s_total_mean'], None, '.1f'):>8}")
    return "\n".join(lines)
