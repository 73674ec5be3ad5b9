"""oxoptim: fast, exact, drop-in ``torch.optim`` optimizers with Rust SIMD kernels."""

from ._core import __version__, parallel_backend, simd_backend, supported_backends
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .averaging import GradientAverager, ParamAverager
from .clip import clip_grad_norm_, get_total_norm
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD
from .subgradient import Subgradient

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adagrad",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adadelta",
    "ASGD",
    "Rprop",
    "Subgradient",
    "GradientAverager",
    "ParamAverager",
    "clip_grad_norm_",
    "get_total_norm",
    "parallel_backend",
    "simd_backend",
    "supported_backends",
    "__version__",
]
