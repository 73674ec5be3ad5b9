"""Command line: ``oxoptim demo`` (a small SGD example) and ``oxoptim train`` (multi-stage training)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def demo(quiet: bool = False) -> float:
    """Fits a least-squares problem with oxoptim.SGD(momentum) and checks it against torch.optim.SGD."""
    import torch

    import oxoptim

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    w_true = torch.randn(64, 1)
    y = x @ w_true + 0.01 * torch.randn(512, 1)
    results = {}
    for name, cls in (("oxoptim.SGD", oxoptim.SGD), ("torch.optim.SGD", torch.optim.SGD)):
        w = torch.zeros(64, 1, requires_grad=True)
        opt = cls([w], lr=0.05, momentum=0.9)
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(x @ w, y)
            loss.backward()
            opt.step()
        results[name] = (loss.item(), w.detach().clone())
    diff = (results["oxoptim.SGD"][1] - results["torch.optim.SGD"][1]).abs().max().item()
    if not quiet:
        print(f"SIMD backend: {oxoptim.simd_backend()}")
        for name, (final_loss, _) in results.items():
            print(f"{name:>16}: final loss {final_loss:.6f} after 100 steps")
        print(f"max |oxoptim - torch| over the weights: {diff:.3g}")
    return diff


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="oxoptim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="least squares with oxoptim.SGD vs torch.optim.SGD")
    from .training.cli import add_train_parser  # stdlib and torch only: optional packages load lazily
    from .training.tune_cli import add_tune_parser

    add_train_parser(sub)
    add_tune_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return 0 if demo() <= 1e-6 else 1
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
