"""Trainable heads over frozen prompt features: bucket classifier (cross-entropy) or regressor (MSE).

Features are standardised (train-split mean/std, stored in the head as buffers so inference needs
nothing else), then a small MLP (or a linear layer when ``hidden == 0``). Training: AdamW, mini-batches,
early stopping on the loss of a held-out slice of the *training* split — never on the calibration
split, whose prompts must stay unseen for the conformal guarantee (:mod:`timebill.predictor.conformal`).
Seeded, so a rerun on the same features gives the same head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from timebill.errors import PredictorError

KINDS = ("classify", "regress")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "classify"
    in_dim: int = 576
    n_out: int = 64  # classes (classify) or 1 (regress)
    hidden: int = 256  # 0 = linear head
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 15  # epochs without a better held-out loss before stopping
    val_fraction: float = 0.1  # slice of the training split held out for early stopping
    seed: int = 0
    target_scale: float = 1024.0  # regress: lengths are divided by this (the cap) before MSE

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PredictorError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "regress" and self.n_out != 1:
            raise PredictorError("a regression head has one output")
        if self.in_dim < 1 or self.n_out < 1 or self.hidden < 0:
            raise PredictorError(f"bad head sizes: in={self.in_dim} out={self.n_out} hidden={self.hidden}")

    def to_dict(self) -> dict:
        return asdict(self)


class Head(nn.Module):
    """Standardise, then MLP/linear. Outputs logits (classify) or length / target_scale (regress)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.in_dim))
        self.register_buffer("std", torch.ones(config.in_dim))
        if config.hidden:
            self.net = nn.Sequential(
                nn.Linear(config.in_dim, config.hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, config.n_out),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.in_dim, config.n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @torch.inference_mode()
    def infer(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities (classify, rows sum to 1) or predicted lengths in tokens (regress)."""
        was_training = self.training
        self.eval()
        out = self(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        self.train(was_training)
        if self.config.kind == "classify":
            return torch.softmax(out, dim=-1).numpy()
        return (out[:, 0] * self.config.target_scale).numpy()


def _targets(config: HeadConfig, y: np.ndarray) -> torch.Tensor:
    if config.kind == "classify":
        y = np.asarray(y, dtype=np.int64)
        if y.min() < 0 or y.max() >= config.n_out:
            raise PredictorError(f"class labels must be in [0, {config.n_out}), got {y.min()}..{y.max()}")
        return torch.as_tensor(y)
    return torch.as_tensor(np.asarray(y, dtype=np.float32) / config.target_scale)


def train_head(x: np.ndarray, y: np.ndarray, config: HeadConfig, threads: int | None = None) -> tuple[Head, dict]:
    """Fit a head on features ``x`` (n, in_dim) and targets ``y`` (classes, or lengths for regress).

    Returns (head with the best held-out weights, history dict with losses and the stopping epoch).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != config.in_dim or len(x) != len(y):
        raise PredictorError(f"features {x.shape} do not match the head (in_dim={config.in_dim}, {len(y)} labels)")
    if len(x) < 10:
        raise PredictorError(f"Too few labelled prompts to train a head ({len(x)}); label more first.")
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.randperm(len(x), generator=gen).numpy()
    n_val = max(1, int(round(len(x) * config.val_fraction)))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    xt = torch.as_tensor(x)
    yt = _targets(config, y)

    head = Head(config)
    head.mean.copy_(xt[fit_idx].mean(0))
    head.std.copy_(xt[fit_idx].std(0).clamp(min=1e-6))
    loss_fn = nn.CrossEntropyLoss() if config.kind == "classify" else nn.MSELoss()
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    x_fit, y_fit, x_val, y_val = xt[fit_idx], yt[fit_idx], xt[val_idx], yt[val_idx]
    if config.kind == "regress":
        y_fit, y_val = y_fit[:, None], y_val[:, None]
    best = (math.inf, 0, copy.deepcopy(head.state_dict()))
    history = {"train_loss": [], "val_loss": []}
    for epoch in range(config.max_epochs):
        head.train()
        perm = torch.randperm(len(x_fit), generator=gen)
        total = 0.0
        for start in range(0, len(perm), config.batch_size):
            batch = perm[start : start + config.batch_size]
            loss = loss_fn(head(x_fit[batch]), y_fit[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        head.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(head(x_val), y_val))
        history["train_loss"].append(total / len(x_fit))
        history["val_loss"].append(val_loss)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(head.state_dict()))
        elif epoch - best[1] >= config.patience:
            break
    head.load_state_dict(best[2])
    head.eval()
    history.update(best_epoch=best[1], best_val_loss=best[0], epochs_run=len(history["val_loss"]))
    history.update(n_fit=len(fit_idx), n_val=len(val_idx))
    return head, history


def head_state(head: Head) -> dict:
    """What a predictor file stores for a head: config and tensors."""
    return {
        "config": head.config.to_dict(),
        "state": {k: v.detach().clone() for k, v in head.state_dict().items()},
    }


def head_from_state(data: dict) -> Head:
    try:
        head = Head(HeadConfig(**data["config"]))
        head.load_state_dict(data["state"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise PredictorError(f"The predictor's head weights are malformed ({exc}); retrain it.") from exc
    head.eval()
    return head
