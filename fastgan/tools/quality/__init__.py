"""Sample quality of an MNIST generator, measured with a small classifier.

Inception networks know nothing of digits, so fastgan trains its own judge once:
a LeNet-style CNN on the available MNIST data (a held-out, class-balanced part of
it is the "test" set), cached under ``cache_dir`` keyed by a hash of the data,
with the SHA-256 of its weights recorded and checked on load.

Metrics (all on the classifier's 84-wide penultimate features or its softmax):

* ``frechet_distance``: between Gaussians fitted to real and generated
  features, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``. The trace of the
  matrix square root is the sum of the square roots of the eigenvalues of
  ``S1 S2`` (real and non-negative for two PSD matrices), which needs no
  ``sqrtm`` and no complex clean-up.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))``, at most 10 here.
* ``coverage``: how many of the 10 classes the generator produces, a class
  counting only when at least ``COVERAGE_MIN_SHARE`` (2.5%, a quarter of its
  fair share) of the images are classified as it, and the KL divergence of
  the class histogram to uniform (0 = perfectly balanced).

Every number is printed next to the real-data floor: as many real images as
the generator made (none of them in the test set), scored the same way,
because FD's bias grows as the sample shrinks. ``verdict`` places FD on a
0-100 scale between an untrained generator and real data and says it in one
line; ``evaluate`` scores any generator module that way. Nothing here prints
or parses arguments; ``log`` callbacks report progress.

Its parts: ``judge`` (the classifier and its cache), ``metrics`` (the numbers
and the scores of a set of images), ``generators`` (a generator from a
checkpoint, its samples and scores, ``evaluate``), ``verdict`` (the
calibrated scale) and ``time_to_quality`` (``fastgan bench --quality``).
"""
from .generators import (describe, evaluate, evaluate_generator, generate,
                         generator_from_state)
from .judge import (CACHE_ENV, CLASSIFIER_VERSION, FEATURE_DIM, NUM_CLASSES, Judge, LeNet,
                    accuracy, data_hash, default_cache_dir, load_judge, split_real,
                    train_classifier, weights_hash)
from .metrics import (COVERAGE_MIN_SHARE, coverage, features_and_probs, frechet_distance,
                      frechet_distance_features, gaussian_stats, inception_score, real_floor,
                      real_sample, scores)
from .time_to_quality import (DEFAULT_FD_THRESHOLD, VARIANTS, at_time, format_time_to_quality,
                              summarize, time_to_quality_run, train_curve, train_curves,
                              variant_config)
from .verdict import BANDS, Scale, calibrate, quality_score, untrained_generator, verdict

__all__ = [
    "BANDS", "CACHE_ENV", "CLASSIFIER_VERSION", "COVERAGE_MIN_SHARE", "DEFAULT_FD_THRESHOLD",
    "FEATURE_DIM", "NUM_CLASSES", "VARIANTS", "Judge", "LeNet", "Scale", "accuracy", "at_time",
    "calibrate", "coverage", "data_hash", "default_cache_dir", "describe", "evaluate",
    "evaluate_generator", "features_and_probs", "format_time_to_quality", "frechet_distance",
    "frechet_distance_features", "gaussian_stats", "generate", "generator_from_state",
    "inception_score", "load_judge", "quality_score", "real_floor", "real_sample", "scores",
    "split_real", "summarize", "time_to_quality_run", "train_classifier", "train_curve",
    "train_curves", "untrained_generator", "variant_config", "verdict", "weights_hash",
]
