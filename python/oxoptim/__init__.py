"""oxoptim: fast, exact, drop-in ``torch.optim`` optimizers with Rust SIMD kernels.

``import oxoptim as optim`` stands in for ``torch.optim``: every optimizer
class has its name, signature, defaults, errors and ``state_dict``. Most are
Rust-backed twins (subclasses of torch's); LBFGS, SparseAdam and Muon are
torch's own classes, re-exported unchanged; ``lr_scheduler``,
``swa_utils`` and ``Optimizer`` are torch's too.
"""

import torch
from torch.optim import LBFGS, Optimizer, SparseAdam

from . import lr_scheduler, swa_utils
from ._core import __version__, parallel_backend, simd_backend, supported_backends
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .adamax import Adamax
from .asgd import ASGD
from .averaging import GradientAverager, ParamAverager
from . import rows
from .backward import ClipPerParameter, ClipPreviousNorm, StepInBackward, step_in_backward
from .clip import clip_grad_norm_, get_total_norm
from .lion import Lion
from .nadam import NAdam
from .offload import CPUOffloadOptimizer
from .prodigy import Prodigy
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedule_free import AdamWScheduleFree, SGDScheduleFree
from .sgd import SGD
from .sgd8bit import SGD8bit
from .subgradient import Subgradient

__all__ = [
    # Rust-backed twins of torch.optim's classes.
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
    # torch's own implementation, re-exported (no Rust kernel yet).
    "LBFGS",
    "SparseAdam",
    # torch.optim's base class and modules, re-exported.
    "Optimizer",
    "lr_scheduler",
    "swa_utils",
    # Beyond torch.optim, each checked against its reference package.
    "Lion",
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "Prodigy",
    # oxoptim's own.
    "Adam8bit",
    "AdamW8bit",
    "SGD8bit",
    "Subgradient",
    "GradientAverager",
    "ParamAverager",
    "clip_grad_norm_",
    "get_total_norm",
    "step_in_backward",
    "StepInBackward",
    "ClipPerParameter",
    "ClipPreviousNorm",
    "CPUOffloadOptimizer",
    "parallel_backend",
    "simd_backend",
    "supported_backends",
    "__version__",
]

# torch.optim's other public names, in the torch releases that have them.
for _name in ("functional", "swap_in_optimizer_params_and_state"):
    if hasattr(torch.optim, _name):
        globals()[_name] = getattr(torch.optim, _name)
        __all__.append(_name)
del _name

# A Rust-backed twin where torch has the class (torch >= 2.5).
if hasattr(torch.optim, "Adafactor"):
    from .adafactor import Adafactor

    __all__.append("Adafactor")
# torch's own implementation, in the torch releases that have it.
try:
    from torch.optim import Muon

    __all__.append("Muon")
except ImportError:  # pragma: no cover - older torch
    pass
