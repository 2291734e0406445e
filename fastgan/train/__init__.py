"""Layer 3, the training application: the GAN step and its CUDA-graph capture,
the trainer, data, checkpoints and torch.distributed.

``from fastgan.train import GANStep, Trainer, TrainConfig`` keeps working as
before the package was split; each name lives in one module below.
"""
from .adam import FusedAdam  # noqa: F401
from .batches import ResidentBatches  # noqa: F401
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION  # noqa: F401
from .config import ConfigError, TrainConfig, mix_seed  # noqa: F401
from .graphs import GraphCaptureError  # noqa: F401
from .precision import DTYPES, MasterWeightAdam, to_train_dtype  # noqa: F401
from .step import STAT_NAMES, GANStep, ReferenceStep, StepStats, make_adam  # noqa: F401
from .trainer import Trainer, build_models  # noqa: F401
