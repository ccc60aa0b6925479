"""The user's code on the command line: ``MODULE:NAME`` factories, loaded and checked.

``rdiag meter`` takes the user's code by name: ``--factory MODULE:FUNCTION``
(``width -> nn.Module``), optionally ``--optimizer-factory`` and
``--data-factory``; ``rdiag ntk`` and ``rdiag sharpness`` take ``--factory`` (a
function of no argument or of the width) and ``--data-factory``, loaded and
checked here with the same messages. ``MODULE`` is a dotted module path, imported with the
current directory on ``sys.path`` (as ``python -m`` would), or a file
``path/to/file.py`` (executed once however many flags name it).
:func:`load_function` checks that the object is callable with the arguments
the command will pass, naming the flag and the signature otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_object(spec: str, flag: str, what: str) -> Any:
    """The object ``MODULE:NAME`` (or ``path/to/file.py:NAME``) names, for ``flag``."""
    source, sep, name = spec.rpartition(":")
    usage = (
        f"pass {flag} MODULE:NAME naming {what}, e.g. mypkg.models:make_model or "
        "path/to/models.py:make_model"
    )
    if not sep or not source or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"expected {flag} MODULE:NAME, got {spec!r}; {usage}")
    if source.endswith(".py") or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no file {source!r} (from {flag} {spec}); pass an existing "
                f"path/to/file.py:{name}"
            )
        # One module per file, executed once however many flags name it.
        module_name = "_rdiag_user_" + "".join(
            c if c.isalnum() else "_" for c in str(path.resolve())
        )
        loaded = sys.modules.get(module_name)
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = loaded or importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look it up
        run = (lambda: None) if loaded else (lambda: loader.loader.exec_module(module))
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m`: the user's own modules
        module = None

        def run() -> None:
            nonlocal module
            module = importlib.import_module(source)

    try:
        run()
    except ModuleNotFoundError as err:
        parts = source.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if err.name in prefixes:
            raise ImportError(
                f"cannot import module {source!r} (from {flag} {spec}): no module "
                f"named {err.name!r} in the current directory or the installed "
                f"packages; run from the directory that holds it, add that to "
                f"PYTHONPATH, or pass a file: path/to/{parts[-1]}.py:{name}"
            ) from err
        raise ImportError(
            f"importing {source!r} (from {flag} {spec}) failed: it imports "
            f"{err.name!r}, which is not installed; install it"
        ) from err
    except Exception as err:
        raise ImportError(
            f"importing {source!r} (from {flag} {spec}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                k
                for k, v in vars(module).items()
                if callable(v)
                and not k.startswith("_")
                and getattr(v, "__module__", None) == module.__name__
            )
            listed = ", ".join(defined[:10]) + (", ..." if len(defined) > 10 else "")
            raise AttributeError(
                f"module {source!r} has no attribute {name!r} (from {flag} {spec}); "
                f"it defines {listed or 'no functions or classes'}"
            )
        obj = getattr(obj, part)
    return obj


def load_function(spec: str, flag: str, what: str, *args: str) -> Callable:
    """A function by ``MODULE:NAME`` that takes the arguments named by ``args``."""
    return load_function_of(spec, flag, what, args)[0]


def load_function_of(
    spec: str, flag: str, what: str, *calls: tuple[str, ...]
) -> tuple[Callable, tuple[str, ...]]:
    """A function by ``MODULE:NAME`` and the first of ``calls`` (argument names) it takes.

    ``rdiag ntk --factory`` takes a function of no argument or of the width:
    ``load_function_of(spec, "--factory", what, (), ("width",))``.
    """
    obj = load_object(spec, flag, what)
    if not callable(obj):
        raise TypeError(
            f"expected {flag} {spec} to name {what}, got a {type(obj).__name__}; "
            "name a function"
        )
    try:
        signature = inspect.signature(obj)
    except ValueError:  # no signature to read (a builtin): let the call tell
        return obj, calls[0]
    for args in calls:
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return obj, args
    shown = signature.replace(return_annotation=inspect.Signature.empty)
    name = getattr(obj, "__name__", type(obj).__name__)
    tried = " or ".join(f"{name}({', '.join(args)})" for args in calls)
    raise TypeError(
        f"expected {flag} {spec} to name {what}, got {name}{shown}, which "
        f"cannot be called as {tried}"
    )
