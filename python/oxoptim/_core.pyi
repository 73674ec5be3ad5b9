# Hand-written stub for the Rust extension; checked by `mypy.stubtest oxoptim._core`.
from typing import Optional, Sequence, final

import torch

__version__: str
__all__ = [
    "TensorCache",
    "__version__",
    "adam_group_step",
    "sgd_group_step",
    "accumulate_mean",
    "adam_step",
    "any_nonfinite",
    "calls_in_flight",
    "copy_scaled",
    "direction_sq_norm",
    "lerp_average",
    "parallel_backend",
    "scale_",
    "sgd_step",
    "simd_backend",
    "subgradient_step",
    "supported_backends",
    "tensor_norm",
]

@final
class TensorCache:
    """Descriptions of an optimizer's long-lived tensors, reused between steps."""

    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def begin_step(self) -> None: ...
    def finish_step(self) -> None: ...

def sgd_group_step(
    params: list[torch.Tensor],
    state: dict,
    cache: TensorCache,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    num_threads: int = 1,
) -> bool: ...
def adam_group_step(
    params: list[torch.Tensor],
    state: dict,
    cache: TensorCache,
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
) -> bool: ...
def simd_backend() -> str: ...
def supported_backends() -> list[str]: ...
def parallel_backend() -> str: ...
def calls_in_flight() -> int: ...
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

# Subgradient method, averaging and deterministic reductions (rust/python/src/extras.rs).
def subgradient_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    step: float,
    l1: float,
    weight_decay: float,
    maximize: bool,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
def direction_sq_norm(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    l1: float,
    weight_decay: float,
    maximize: bool,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> Optional[float]: ...
def tensor_norm(
    tensors: list[torch.Tensor],
    norm_type: float,
    *,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> Optional[float]: ...
def any_nonfinite(
    tensors: list[torch.Tensor],
    *,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> Optional[bool]: ...
def accumulate_mean(
    means: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    weight: float,
    first: bool,
    clear_grad: bool = True,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
def lerp_average(
    averages: list[torch.Tensor],
    params: list[torch.Tensor],
    *,
    weight: float,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
def copy_scaled(
    dst: list[torch.Tensor],
    src: list[torch.Tensor],
    *,
    scale: float,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
def scale_(
    tensors: list[torch.Tensor],
    *,
    scale: float,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...
