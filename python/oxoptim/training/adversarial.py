"""Adversarial training on embeddings (the fast gradient method of Miyato et al., 2017)."""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["EmbeddingAdversary"]


class EmbeddingAdversary:
    """Adds the loss at adversarially perturbed embeddings to each training step.

    For a batch, the clean loss is back-propagated first; the gradient ``g`` with respect to
    every ``nn.Embedding`` output of ``model`` gives the perturbation ``r = eps * g / ||g||``
    (L2 norm per example, over all but the first dimension), and the loss at ``embedding + r``
    is back-propagated on top. The parameters' gradient is thus that of
    ``loss(x) + loss(x + r_adv)``; the clean loss is returned for logging. Discrete token ids
    cannot be perturbed, their embeddings can: a cheap regulariser for text models.
    """

    def __init__(self, model: nn.Module, eps: float):
        if not eps > 0:
            raise ValueError(f"adversarial eps must be > 0, not {eps!r}")
        self.eps = float(eps)
        self.embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not self.embeddings:
            raise ValueError("adversarial training needs a model with an nn.Embedding layer")
        self._capture = False
        self._outputs: List[torch.Tensor] = []
        self._deltas: Optional[List[torch.Tensor]] = None
        self._calls = 0
        self._handles = [m.register_forward_hook(self._hook) for m in self.embeddings]

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> Optional[torch.Tensor]:
        if self._deltas is not None:  # perturbed pass: embedding calls in the same order as the clean one
            delta = self._deltas[self._calls] if self._calls < len(self._deltas) else None
            self._calls += 1
            return None if delta is None else output + delta
        if not self._capture:
            return None
        if not output.requires_grad:  # a frozen embedding: still perturb its output
            output = output.detach().requires_grad_()
        output.retain_grad()
        self._outputs.append(output)
        return output

    def forward_backward(
        self,
        forward: Callable[[], torch.Tensor],
        sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """Runs ``forward()`` (which returns the batch loss) clean and perturbed, back-propagating both.

        ``sync()`` wraps the clean pass; under DDP pass ``net.no_sync`` so that gradients are
        all-reduced once, after the perturbed pass.
        """
        self._capture, self._outputs = True, []
        try:
            with sync():
                loss = forward()
                loss.backward()
        finally:
            self._capture = False
        if not self._outputs:  # else the "perturbed" pass would only add the clean gradient again
            raise RuntimeError("adversarial training saw no nn.Embedding output in the forward pass: the model "
                               "embeds its tokens otherwise (the GPT models, through oxoptim.rows), so there is "
                               "nothing to perturb")
        deltas = []
        for out in self._outputs:
            g = out.grad
            if g is None:
                g = torch.zeros_like(out)
            g = g.detach()
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12) if g.dim() > 1 else g.norm().clamp_min(1e-12)
            deltas.append(self.eps * g / norm.view(-1, *([1] * (g.dim() - 1))))
        self._outputs = []
        self._deltas, self._calls = deltas, 0
        try:
            forward().backward()
        finally:
            self._deltas = None
        return loss.detach()

    def remove(self) -> None:
        """Detaches the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
