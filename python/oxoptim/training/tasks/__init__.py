"""Tasks: what the training loop needs to know about a problem, behind one small interface.

A task says how to draw a batch from its data, run the network on it, score it (the loss that is
back-propagated and the metrics logged on validation, each with its direction), and which lengths
batching may bucket by. The loop, evaluation and rules know nothing else about the problem.
"""

from .base import Batch, Task, TensorTask, as_xy
from .classification import ClassificationTask
from .language_model import LanguageModelTask

__all__ = ["Batch", "Task", "TensorTask", "as_xy", "ClassificationTask", "LanguageModelTask"]
