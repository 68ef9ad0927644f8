"""Base unlearning methods. Each module registers itself; importing this package loads them all."""

from ember.methods.base import METHODS, Method, MethodContext, MethodReport, get_method, register_method

__all__ = ["METHODS", "Method", "MethodContext", "MethodReport", "get_method", "register_method"]

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
