# Hand-written stub for the Rust extension; checked by `mypy.stubtest oxoptim._core`.
from typing import Optional, Sequence

import torch

__version__: str
__all__ = ["__version__", "adam_step", "sgd_step", "simd_backend", "supported_backends"]

def simd_backend() -> str: ...
def supported_backends() -> list[str]: ...
def sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    fresh: Sequence[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
