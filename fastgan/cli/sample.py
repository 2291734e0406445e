"""fastgan sample: a grid of digits from a training checkpoint.

    fastgan sample --checkpoint runs/fastgan/checkpoint.pt --n 64 --out grid.png
"""
from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="write a grid of generated digits (PNG)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `fastgan train`")
    p.add_argument("--n", type=int, default=64, help="number of digits (default 64)")
    p.add_argument("--nrow", type=int, default=None,
                   help="digits per row (default: about sqrt(n))")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    return p


MAX_N = 10_000   # digits in one grid: 100 x 100 cells, a 6,000-pixel-square PNG


def grid_image(images, nrow: int | None = None, pad: int = 2, scale: int = 2) -> np.ndarray:
    """(n, 784) values in [-1, 1] -> one uint8 grayscale image, ``nrow`` digits a row."""
    x = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    n = x.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    cell = 28 + pad
    out = np.zeros((rows * cell + pad, nrow * cell + pad), dtype=np.uint8)
    pix = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * cell: pad + r * cell + 28, pad + c * cell: pad + c * cell + 28] = pix[i]
    return out.repeat(scale, 0).repeat(scale, 1)


def save_grid(images, path, nrow: int | None = None) -> Path:
    """Write the grid PNG atomically (``fastgan.train.checkpoint.write_atomic``:
    temp file, fsync, os.replace; mode 0o666 less the umask)."""
    from PIL import Image

    from ..train.checkpoint import write_atomic
    buf = io.BytesIO()
    Image.fromarray(grid_image(images, nrow)).save(buf, format="PNG")
    return write_atomic(path, buf.getbuffer())


def run(args) -> int:
    import torch

    from .. import backends
    from ..train import checkpoint
    from ..train import ConfigError, build_models
    from ..train.precision import input_dtype
    from . import CLIError
    from .train import check_seed, config_of, resolve_device

    if not 1 <= args.n <= MAX_N:
        raise CLIError(f"--n must be in [1, {MAX_N:,}], got {args.n}")
    if args.nrow is not None and args.nrow < 1:
        raise CLIError(f"--nrow must be at least 1, got {args.nrow}")
    check_seed(args.seed, "--seed")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    device = resolve_device(args.device)
    state = checkpoint.load(args.checkpoint)
    cfg = config_of(state, args.checkpoint)
    # The fused model only where a fused backend runs on this device; otherwise
    # the plain model (same state_dict keys, same eval-mode math) avoids the
    # slow reference path.
    fast = {"cpu": {"cpu"}, "cuda": {"triton", "cuda"}}.get(device.type, set())
    cfg.reference = cfg.reference or not (fast & set(backends()))
    G, _ = build_models(cfg)
    try:
        G.load_state_dict(state["generator"])
    except RuntimeError as e:
        raise ConfigError(f"{args.checkpoint}: generator weights do not fit its config: "
                          f"{str(e).splitlines()[0]}") from None
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    # Drawn in fp32 (the same digits for every dtype's run), fed in G's dtype.
    z = torch.randn(args.n, cfg.latent_dim, generator=g).to(device, input_dtype(G))
    with torch.no_grad():
        images = G(z).float().cpu()
    try:
        save_grid(images, out, args.nrow)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {args.n} samples to {out} (checkpoint step {state['steps']})")
    return 0

