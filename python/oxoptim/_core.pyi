# Hand-written stub for the Rust extension; checked by `mypy.stubtest oxoptim._core`.
from typing import Any, Optional, final

import torch

__version__: str
__all__ = [
    "TensorCache",
    "__version__",
    "accumulate_mean",
    "any_nonfinite",
    "calls_in_flight",
    "copy_scaled",
    "dequantize_blockwise",
    "direction_sq_norm",
    "group_step",
    "groups_step",
    "layout",
    "lerp_average",
    "optimizers",
    "parallel_backend",
    "prodigy_sums",
    "quantization_map",
    "quantize_blockwise",
    "scale_",
    "simd_backend",
    "step",
    "stream_probe",
    "subgradient_step",
    "takes_hyper",
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

# Optimizer steps generated from the Rust table (rust/python/src/generic.rs).
def optimizers() -> dict[str, dict[str, Any]]: ...
def layout(kind: str, hyper: dict[str, Any]) -> tuple[list[str], list[str]]: ...
def takes_hyper(kind: str, hyper: dict[str, Any]) -> bool: ...
def step(
    kind: str,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: list[list[torch.Tensor]],
    scalars: list[list[torch.Tensor]],
    hyper: dict[str, Any],
    *,
    num_threads: int = 1,
    backend: Optional[str] = None,
    stochastic_round: Optional[tuple[int, int]] = None,
    compensation: Optional[list[torch.Tensor]] = None,
    bf16_state: bool = False,
    stream_ids: Optional[list[int]] = None,
    stream_offsets: Optional[list[int]] = None,
    check_only: bool = False,
) -> bool: ...
def group_step(
    kind: str,
    params: list[torch.Tensor],
    state: dict,
    cache: TensorCache,
    hyper: dict[str, Any],
    *,
    num_threads: int = 1,
    stochastic_round: Optional[tuple[int, int]] = None,
    kahan: bool = False,
    bf16_state: bool = False,
    stream_ids: Optional[list[int]] = None,
) -> bool: ...
def groups_step(
    groups: list[tuple[list[torch.Tensor], list[tuple[str, dict[str, Any]]], Optional[tuple[int, int]], Optional[list[int]]]],
    state: dict,
    cache: TensorCache,
    *,
    num_threads: int = 1,
) -> bool: ...
def simd_backend() -> str: ...
def supported_backends() -> list[str]: ...
def parallel_backend() -> str: ...
def calls_in_flight() -> int: ...

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
def prodigy_sums(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    s: list[torch.Tensor],
    p0: Optional[list[torch.Tensor]],
    *,
    weight_decay: float,
    beta3: float,
    s_weight: float,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> Optional[list[tuple[float, float]]]: ...
def tensor_norm(
    tensors: list[torch.Tensor],
    norm_type: float,
    *,
    as_torch: bool = False,
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
def stream_probe(
    arrays: list[list[torch.Tensor]],
    *,
    num_threads: int = 1,
    backend: Optional[str] = None,
) -> bool: ...

# Block-wise 8-bit quantisation (rust/python/src/lowbit.rs).
def quantization_map(signed: bool) -> list[float]: ...
def quantize_blockwise(
    values: list[torch.Tensor],
    codes: list[torch.Tensor],
    absmax: list[torch.Tensor],
    *,
    signed: bool,
    num_threads: int = 1,
) -> bool: ...
def dequantize_blockwise(
    codes: list[torch.Tensor],
    absmax: list[torch.Tensor],
    out: list[torch.Tensor],
    *,
    signed: bool,
    num_threads: int = 1,
) -> bool: ...
