"""Training: the one loop (`loop.py`) and its users (`pretrain.py`: `deepsail pretrain`), with the pieces they share."""

from deepsail.train.amp import autocast, make_scaler
from deepsail.train.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from deepsail.train.config import TrainConfig
from deepsail.train.loop import TrainResult, forward_backward, optimizer_step, train_loop
from deepsail.train.metrics import MetricsLogger, peak_flops
from deepsail.train.optim import build_optimizer, decay_progress, lr_at
from deepsail.train.pretrain import evaluate, next_token_loss, pretrain

__all__ = [
    "MetricsLogger",
    "TrainConfig",
    "TrainResult",
    "autocast",
    "build_optimizer",
    "decay_progress",
    "evaluate",
    "forward_backward",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "make_scaler",
    "next_token_loss",
    "optimizer_step",
    "peak_flops",
    "pretrain",
    "resolve_checkpoint",
    "save_checkpoint",
    "train_loop",
]
