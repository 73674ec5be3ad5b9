"""Cross-entropy of a bias-free linear layer's output, ``chunk`` classes at a time: the logits
(tokens × classes) never exist whole.

Forward keeps a running maximum and sum of exponentials per token (the logits in float32 for
half-precision weights, else in the weights' dtype; the sums, the loss and the softmax in float64,
as a token's sum runs over every chunk; the maximum and the sum's logarithm kept apart, as torch's
log-softmax subtracts them) and the target's logit. Backward forms
each chunk's logits again from the input and the weight rows, turns them into the gradient of the
logits, ``softmax - one_hot`` times the loss's coefficient, and from it the chunk's share of the
input gradient and the chunk's rows of the weight gradient. Every chunk depends only on its own
rows, the input and the saved maximum and sum, so the same chunks give the same bits whether the rows
are then written into a gradient (``oxoptim.rows.linear_cross_entropy`` outside a
``step_in_backward`` context) or updated at once (inside one, with the weight's rows released).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits and products: float64 for float64 weights, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkedCrossEntropy:
    """One call's input (flattened to tokens × features), targets and saved log-sum-exp."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 reduction: str, chunk: int) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if weight.dim() != 2:
            raise ValueError(f"the weight must be 2-D (classes × features), got shape {tuple(weight.shape)}")
        if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({_rows_by_cols(x)} and "
                               f"{weight.shape[1]}x{weight.shape[0]})")
        if x.dtype != weight.dtype:  # torch's own error (F.linear's), on empty operands
            F.linear(torch.empty(0, weight.shape[1], dtype=x.dtype), weight[:0])
        if target.shape != x.shape[:-1]:
            raise ValueError(f"Expected input batch_size ({x.shape[:-1].numel()}) to match target batch_size "
                             f"({target.numel()}): the target's shape must be the input's without its last "
                             f"dimension, {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
        if target.dtype != torch.int64:
            # torch's own check (and message) of a target dtype, on an empty problem; then class indices.
            F.cross_entropy(torch.empty(0, max(weight.shape[0], 1)), target.reshape(-1)[:0])
            target = target.long()
        self.classes, self.ignore_index = weight.shape[0], ignore_index
        self._inputs: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._x2_acc: Optional[torch.Tensor] = None  # the input widened (half-precision weights)
        self.attach(x, target)
        bad = self.valid & ((self.target < 0) | (self.target >= self.classes))
        if bool(bad.any()):
            raise IndexError(f"Target {int(self.target[bad][0])} is out of bounds.")
        self.reduction, self.chunk, self.shape = reduction, chunk, target.shape
        self.acc = accumulation_dtype(weight.dtype)
        # The log-sum-exp as top + log_total, kept apart: logits far from 0 would lose the small
        # differences (z - top) of the loss and the softmax if added first. Per-token sums, the
        # loss and the softmax are float64 (a token's sum runs over every chunk, one at a time).
        self.top: Optional[torch.Tensor] = None
        self.log_total: Optional[torch.Tensor] = None

    def attach(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """The call's input and (int64) targets: at the call, and again in backward from autograd's
        saved tensors, whose version check catches an in-place change in between."""
        flat = target.reshape(-1)
        self._inputs = (x.reshape(-1, x.shape[-1]), flat, flat != self.ignore_index)
        self._x2_acc = None

    def detach(self) -> None:
        """Drops the input and targets (autograd keeps them between forward and backward, and frees
        them after): what stays is per token, the maximum and the log of the sum."""
        self._inputs = self._x2_acc = None

    def _attached(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._inputs is not None, "the input and targets are attached in forward and backward"
        return self._inputs

    @property
    def x2(self) -> torch.Tensor:
        """The input, tokens × features."""
        return self._attached()[0]

    @property
    def target(self) -> torch.Tensor:
        """The targets, one per token (int64)."""
        return self._attached()[1]

    @property
    def valid(self) -> torch.Tensor:
        """Tokens whose target is not ignored."""
        return self._attached()[2]

    def chunks(self):
        return ((a, min(a + self.chunk, self.classes)) for a in range(0, self.classes, self.chunk))

    def logits(self, weight: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Classes ``a:b`` of every token's logits, in the accumulation dtype (half-precision inputs
        and rows widened first: a logit rounded to bfloat16 would move exp(logit) by up to 25%)."""
        if weight.dtype == self.acc:
            return torch.mm(self.x2, weight[a:b].t())
        return torch.mm(self.x2_acc(), weight[a:b].to(self.acc).t())

    def x2_acc(self) -> torch.Tensor:
        """The input in the accumulation dtype (widened once)."""
        if self._x2_acc is None:
            self._x2_acc = self.x2.to(self.acc)
        return self._x2_acc

    def _in_chunk(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (non-ignored) whose target lies in classes ``a:b``, and those targets less ``a``."""
        tokens = (self.valid & (self.target >= a) & (self.target < b)).nonzero().reshape(-1)
        return tokens, self.target[tokens] - a

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The reduced loss (per token for ``none``), in the weight's dtype; saves the log-sum-exp."""
        n = self.x2.shape[0]
        top = torch.full((n,), -torch.inf, dtype=self.acc)
        total = torch.zeros(n, dtype=torch.float64)
        picked = torch.zeros(n, dtype=self.acc)
        for a, b in self.chunks():
            z = self.logits(weight, a, b)
            new_top = torch.maximum(top, z.amax(1)) if b > a else top
            # exp(top - new_top), 1 where both are -inf (no class seen yet, or only -inf logits).
            scale = torch.where(top == new_top, torch.ones_like(total), torch.exp(top.double() - new_top.double()))
            total = total * scale + torch.exp(z - new_top[:, None]).sum(1, dtype=torch.float64)
            top = new_top
            tokens, at = self._in_chunk(a, b)
            picked[tokens] = z[tokens, at]
        self.top, self.log_total = top, torch.log(total)
        losses = torch.where(self.valid, (top - picked).double() + self.log_total, torch.zeros_like(total))
        if self.reduction == "none":
            return losses.reshape(self.shape).to(weight.dtype)
        loss = losses.sum()
        if self.reduction == "mean":
            loss = loss / self.valid.sum()
        return loss.to(weight.dtype)

    def coefficients(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Each token's factor of ``softmax - one_hot`` in the gradient of the logits (0 if ignored)."""
        g = grad_out.double()
        if self.reduction == "none":
            per_token = g.reshape(-1)
        elif self.reduction == "mean":
            per_token = (g / self.valid.sum()).expand(self.valid.shape)
        else:
            per_token = g.expand(self.valid.shape)
        return torch.where(self.valid, per_token, torch.zeros_like(per_token))

    def logit_grad(self, weight: torch.Tensor, a: int, b: int, coef: torch.Tensor) -> torch.Tensor:
        """The gradient of classes ``a:b`` of the logits (float64 maths), in the accumulation dtype."""
        assert self.top is not None and self.log_total is not None, "forward first"
        p = torch.exp((self.logits(weight, a, b) - self.top[:, None]).double() - self.log_total[:, None])
        tokens, at = self._in_chunk(a, b)
        p[tokens, at] -= 1
        return p.mul_(coef[:, None]).to(self.acc)

    def input_grad(self) -> torch.Tensor:
        """A zero input gradient to add the chunks' shares to: float64, so that adding many chunks
        rounds each share once, not the running sum."""
        return torch.zeros(self.x2.shape, dtype=torch.float64)

    def add_input_grad(self, dx: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor, a: int, b: int) -> None:
        """``dx += dz @ weight[a:b]``, the product in the accumulation dtype (half-precision rows widened)."""
        dx.add_(torch.mm(dz, weight[a:b].to(self.acc)))

    def weight_rows(self, dz: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of the weight gradient, ``dz.T @ x`` (summed in the accumulation dtype,
        rounded once to ``out``'s)."""
        if out.dtype == self.acc:
            return torch.mm(dz.t(), self.x2, out=out)
        return out.copy_(torch.mm(dz.t(), self.x2_acc()))

    def backward(self, weight: torch.Tensor, grad_out: torch.Tensor, want_x: bool, want_weight: bool
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The input's and the weight's gradients (either may be skipped), chunk by chunk."""
        coef = self.coefficients(grad_out)
        dx = self.input_grad() if want_x else None
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_weight else None
        # Each chunk's rows formed where a 64-byte aligned buffer would hold them, as the released
        # weight's backward forms them: a BLAS may round a product differently into memory at another
        # alignment. Rows that start aligned in the gradient are formed in place, others copied.
        rows = torch.empty(min(self.chunk, self.classes), weight.shape[1], dtype=weight.dtype) if want_weight else None
        for a, b in self.chunks():
            dz = self.logit_grad(weight, a, b, coef)
            if dx is not None:
                self.add_input_grad(dx, dz, weight, a, b)
            if dw is not None and rows is not None:
                if dw[a:b].data_ptr() % 64 == rows.data_ptr() % 64:
                    self.weight_rows(dz, out=dw[a:b])
                else:
                    dw[a:b] = self.weight_rows(dz, out=rows[: b - a])
        return (None if dx is None else dx.to(weight.dtype)), dw


def _rows_by_cols(x: torch.Tensor) -> str:
    return f"{x.shape[:-1].numel()}x{x.shape[-1]}" if x.dim() else "0x0"

