"""What checksummed checkpoints cost: fastgan.train.checkpoint.save/load
(SHA-256 of every tensor, verified on load, plus the finiteness and layout
checks) next to a plain torch.save/torch.load of the same state, side by side
in one process, on the default seed GAN's training state (G 256-512-1024,
D 1024-512-256, Adam moments: about 35 MB).

    python bench/results/issue14_checkpoint_cost.py [--repeats 5]

Prints one JSON object (medians in ms and their ratios).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from fastgan.train import TrainConfig, Trainer, checkpoint


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(batch_size=64), torch.rand(256, 784) * 2 - 1)
    trainer.train_step()
    state = trainer.state_dict()
    folder = tempfile.mkdtemp()
    ours, plain = os.path.join(folder, "ours.pt"), os.path.join(folder, "plain.pt")

    def plain_save():
        torch.save(state, plain)
        with open(plain, "rb+") as f:  # the same durability as ours: fsync
            os.fsync(f.fileno())

    rows = {
        "save_ms": (_median_ms(lambda: checkpoint.save(state, ours), args.repeats),
                    _median_ms(plain_save, args.repeats)),
        "load_ms": (_median_ms(lambda: checkpoint.load(ours), args.repeats),
                    _median_ms(lambda: torch.load(plain, map_location="cpu", weights_only=True),
                               args.repeats)),
        "checksums_only_ms": (_median_ms(lambda: checkpoint.checksums(state), args.repeats),
                              0.0),
    }
    print(json.dumps({
        "checkpoint_mb": round(os.path.getsize(ours) / 1e6, 2),
        **{k: {"fastgan": round(a, 1), "torch": round(b, 1),
               "ratio": round(a / b, 2) if b else None} for k, (a, b) in rows.items()},
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()
