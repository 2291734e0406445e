"""Where known degradations of real digits land on fastgan eval's 0-100 scale
(the evidence for the words of fastgan.tools.quality.verdict.BANDS).

    python bench/results/issue12_verdict_calibration.py [CACHE_DIR]

Output of one run: bench/results/issue12-verdict-calibration.txt.
"""
import sys

import torch
import torch.nn.functional as F

import fastgan.quality as Q
from fastgan.train.data import load_mnist

torch.set_num_threads(1)
ds = load_mnist(None)
j = Q.load_judge(ds.images, ds.labels, cache_dir=sys.argv[1] if len(sys.argv) > 1 else None)
n = 1000
scale = Q.calibrate(j, n)
test_feats, _ = Q.features_and_probs(j.model, j.test[0])
real = Q.real_sample(j, n, seed=3)
g = torch.Generator().manual_seed(0)


def show(name, imgs):
    s = Q.scores(j.model, imgs.clamp(-1, 1), test_feats)
    print(f"{name:<34} FD {s['fd']:8.2f}  score {Q.quality_score(s['fd'], scale):5.1f}  "
          f"classes {s['classes']}  IS {s['is']:.2f}")


print(f"scale on {n} images: real digits FD {scale.real['fd']:.2f} (100), an untrained G "
      f"FD {scale.untrained['fd']:.1f} (0)")
show("real", real)
for p in (0.01, 0.03, 0.1):
    m = torch.rand(real.shape, generator=g) < p
    show(f"real + {p:.0%} white specks", torch.where(m, torch.ones_like(real), real))
for sd in (0.1, 0.3, 0.6):
    show(f"real + gaussian noise sd {sd}", real + sd * torch.randn(real.shape, generator=g))
x = real.reshape(-1, 1, 28, 28)
k = torch.ones(1, 1, 3, 3) / 9
show("real, 3x3 box blur", F.conv2d(x, k, padding=1).reshape(n, -1))
show("real, two 3x3 blurs", F.conv2d(F.conv2d(x, k, padding=1), k, padding=1).reshape(n, -1))
lab = j.train[1][torch.randperm(j.train[0].shape[0], generator=torch.Generator().manual_seed(3))[:n]]
show("real, classes 0-4 only", real[lab < 5].repeat(2, 1)[:n])
