"""A model's modules, walked once per structure: the kernel swaps (linear.py, elementwise.py)
enter on every engine call, a decode step in the job's loop, and walking a model's modules
there cost ~0.9 ms a step on the 70M Llama (whose batch-1 decode step is ~13 ms): entry and
exit of `ModelRunner.kernels()` took 1.22 ms, now 0.35 ms.

The walk is cached per model and redone after a submodule is registered into any module a walk
has met (torch's global module-registration hook counts those), so a model whose layers are
replaced (an adapter, a new head) is walked again on its next call. Registrations into other
modules do not count: Hugging Face's forward slices `self.layers[:n]`, a new ModuleList each
call. What the swaps check per module that can change without a registration (dtype, an
instance forward) they still check on every entry.
"""
from __future__ import annotations

import weakref

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

# per model: {scan name: (registrations seen, result)}, and under None the walk itself
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_registrations = 0
_walked = weakref.WeakSet()  # every module a walk met


def _count(module, name, submodule):
    global _registrations
    if module in _walked:
        _registrations += 1


register_module_module_registration_hook(_count)


def registrations() -> int:
    """Submodules registered so far into modules that a walk met (any model)."""
    return _registrations


def scan(model: nn.Module, name: str, select) -> list:
    """select(model.modules()) as a list, cached per model until a submodule is registered.
    select must depend on the module tree only (types, names), not on weights or dtypes."""
    cache = _CACHE.setdefault(model, {})
    seen, found = cache.get(name, (None, None))
    if seen != _registrations:
        found = list(select(_walk(model, cache)))
        cache[name] = (_registrations, found)
    return found


def _walk(model: nn.Module, cache: dict) -> list[nn.Module]:
    """model.modules() as a list, walked once per registration count for all of the model's scans."""
    seen, walk = cache.get(None, (None, None))
    if seen != _registrations:
        walk = list(model.modules())
        _walked.update(walk)
        cache[None] = (_registrations, walk)
    return walk
