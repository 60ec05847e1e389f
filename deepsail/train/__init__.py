"""Pretraining: the `deepsail pretrain` verb and the pieces it is made of."""

from deepsail.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deepsail.train.config import TrainConfig
from deepsail.train.metrics import MetricsLogger, peak_flops
from deepsail.train.optim import build_optimizer, decay_progress, lr_at
from deepsail.train.precision import autocast, make_scaler, resolve_precision
from deepsail.train.trainer import TrainResult, evaluate, pretrain, token_byte_lengths, train

__all__ = [
    "MetricsLogger", "TrainConfig", "TrainResult", "autocast", "build_optimizer", "decay_progress", "evaluate",
    "latest_checkpoint", "load_checkpoint", "lr_at", "make_scaler", "peak_flops", "pretrain", "resolve_precision",
    "save_checkpoint", "token_byte_lengths", "train",
]
