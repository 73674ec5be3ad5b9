"""torch's state-dict hooks around an overridden ``state_dict``/``load_state_dict``.

An oxoptim optimizer converts a state dict before torch loads it (8-bit codes, float32
scalars of half-precision weights) or adds to the one torch saves (``skipped_steps``).
torch runs its hooks inside its own method, so they would see the dict half converted.
These decorators run them where a user of ``torch.optim`` expects: load pre-hooks on the
caller's dict (their result is what is converted and loaded), load post-hooks on the
final state, state-dict pre-hooks first and post-hooks on the dict returned.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["load_hooks_outside", "save_hooks_outside"]

F = TypeVar("F", bound=Callable[..., Any])

_PRE_LOAD, _POST_LOAD = "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
_PRE_SAVE, _POST_SAVE = "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"


@contextmanager
def _hooks_held(opt: Any, pre: str, post: str) -> Iterator[tuple[OrderedDict, OrderedDict]]:
    """torch's hook tables of ``opt``, emptied while the body runs (the inner methods, torch's
    included, then run none) and put back after: the handles keep referring to them."""
    held = (getattr(opt, pre), getattr(opt, post))
    setattr(opt, pre, OrderedDict())
    setattr(opt, post, OrderedDict())
    try:
        yield held
    finally:
        setattr(opt, pre, held[0])
        setattr(opt, post, held[1])


def _outermost(opt: Any, flag: str) -> bool:
    return not opt.__dict__.get(flag, False)


def load_hooks_outside(load: F) -> F:
    @functools.wraps(load)
    def wrapper(self: Any, state_dict: dict) -> None:
        if not _outermost(self, "_oxoptim_loading") or not hasattr(self, _PRE_LOAD):
            return load(self, state_dict)
        state_dict = state_dict.copy()  # shallow, as torch's
        for hook in list(getattr(self, _PRE_LOAD).values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.__dict__["_oxoptim_loading"] = True
        try:
            with _hooks_held(self, _PRE_LOAD, _POST_LOAD) as (_, post):
                load(self, state_dict)
        finally:
            del self.__dict__["_oxoptim_loading"]
        for hook in list(post.values()):
            hook(self)

    return wrapper  # type: ignore[return-value]


def save_hooks_outside(save: F) -> F:
    @functools.wraps(save)
    def wrapper(self: Any) -> dict:
        if not _outermost(self, "_oxoptim_saving") or not hasattr(self, _PRE_SAVE):
            return save(self)
        for hook in list(getattr(self, _PRE_SAVE).values()):
            hook(self)
        self.__dict__["_oxoptim_saving"] = True
        try:
            with _hooks_held(self, _PRE_SAVE, _POST_SAVE) as (_, post):
                state_dict = save(self)
        finally:
            del self.__dict__["_oxoptim_saving"]
        for hook in list(post.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    return wrapper  # type: ignore[return-value]
