"""Modules that remember how they were built, so that a resized copy (fewer experts, one task, more tasks) is
built by the module's own class instead of by code that knows every class.

    router.init_args()                                  # {"dim": 32, "num_experts": 8, "top_k": 2, ...}
    small = router.rebuilt(num_tasks=1, num_experts=3)  # same class and options, new shapes, fresh init
"""

from __future__ import annotations

import inspect

from torch import nn


class Rebuildable(nn.Module):
    """An `nn.Module` that records its constructor arguments (`init_args`) and can build a copy with some of
    them changed (`rebuilt`). Routers and MoE layers derive from it; their `slice` and `grow` use it."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # Set before nn.Module.__init__ runs; copy.deepcopy and pickle call __new__ without arguments and then
        # restore the recorded ones with the rest of the instance's __dict__.
        object.__setattr__(self, "_init_call", (args, kwargs))
        return self

    def init_args(self) -> dict:
        """The constructor arguments by name, defaults filled in and `**kwargs` spread out."""
        args, kwargs = self._init_call
        signature = inspect.signature(type(self).__init__)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        out = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(self).__name__} takes *args; it cannot be rebuilt by argument name")
            else:
                out[name] = value
        return out

    def rebuilt(self, **changes) -> Rebuildable:
        """A new module of this class built with this one's arguments and `changes`, freshly initialised, on this
        module's device and floating dtype, in its train/eval mode."""
        new = type(self)(**{**self.init_args(), **changes})
        ref = next(iter(self.parameters()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        return new.train(self.training)
