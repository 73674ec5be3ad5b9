"""oxoptim: fast, exact, drop-in ``torch.optim`` optimizers with Rust SIMD kernels."""

from ._core import __version__, simd_backend, supported_backends
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "simd_backend", "supported_backends", "__version__"]
