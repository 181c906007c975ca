"""slim_kernels' PEFT hook: register SLIM with PEFT whenever ``peft`` is imported, in any
Python of the environment where slim_kernels is installed.

PEFT (0.21) finds a method only in its own tables (``peft.mapping.PEFT_TYPE_TO_*``) and has no
plugin entry point, so a script that loads a SLIM adapter without importing slim_kernels
(``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers'
``model.load_adapter``, the ``lm_eval`` command with ``peft=``) would meet a bare
``KeyError: 'SLIM'``. The package therefore installs ``slim_kernels_peft.pth`` into
site-packages, whose one line runs :func:`install` at interpreter start: a finder on
``sys.meta_path`` that waits for ``peft`` to be imported and then imports
``slim_kernels.integrations.peft``, which registers SLIM (``docs/huggingface.md``, "How SLIM
gets registered"). Until ``peft`` is imported it costs one entry on ``sys.meta_path``: it
imports no torch and not even slim_kernels (this module stands outside the package, as
setuptools' ``_distutils_hack`` does, so a ``.pth`` line can import it cheaply and without
choosing which slim_kernels a script will import). ``SLIM_KERNELS_PEFT_HOOK=0`` turns it off;
``import slim_kernels`` installs it too (for a Python started with ``-S``).

Where the registration fails (a PEFT version it was not tested with), PEFT's config table
gets a stand-in for "SLIM" whose only job is to raise an error that names slim_kernels, the
reason and the fix, instead of ``KeyError: 'SLIM'``. This module never raises: a broken hook
must not break ``import peft``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading

__all__ = ["install", "installed"]

_LOCK = threading.Lock()
_STATE = {"installed": False, "error": None}


def _enabled() -> bool:
    return os.environ.get("SLIM_KERNELS_PEFT_HOOK", "").strip().lower() not in ("0", "false",
                                                                                 "no", "off")


def _register() -> None:
    """Import the integration (which registers SLIM); on failure, the stand-in."""
    try:
        import slim_kernels.integrations.peft  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: say so when a SLIM adapter is loaded
        _STATE["error"] = f"{type(e).__name__}: {e}"
        _install_stand_in(_STATE["error"])


def _install_stand_in(reason: str) -> None:
    try:
        from peft import mapping
        table = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    except Exception:  # noqa: BLE001 - a PEFT without the table: nothing to do
        return
    if "SLIM" in table:
        return
    message = (
        f"this is a SLIM adapter (peft_type 'SLIM'), and slim_kernels could not register SLIM "
        f"with this PEFT: {reason}. Fix that and load again (`import slim_kernels.peft` shows "
        f"the same error).")

    class SlimNotRegistered:
        """Stands for SLIM in PEFT's table when registering it failed: raises the reason."""

        _slim_kernels_stub = True

        def __init__(self, *args, **kwargs):
            raise ImportError(message)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(message)

    table["SLIM"] = SlimNotRegistered


class _LoaderWrapper(importlib.abc.Loader):
    """The loader of ``peft``, which registers SLIM once the package has been executed."""

    def __init__(self, loader, finder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _uninstall(self._finder)  # (peft is imported once)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds ``peft`` with the other finders and wraps its loader. A lookup that does not
    import it (``importlib.util.find_spec("peft")``, as transformers' ``is_peft_available``
    does) changes nothing: the loader runs only when peft is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWrapper(spec.loader, self)
                return spec
        return None


def _uninstall(finder) -> None:
    with _LOCK:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def install() -> None:
    """Register SLIM when ``peft`` is imported (now, if it already is). Idempotent."""
    try:
        with _LOCK:
            if _STATE["installed"] or not _enabled():
                return
            _STATE["installed"] = True
            if "peft" not in sys.modules:
                sys.meta_path.insert(0, _PeftFinder())
                return
        _register()
    except Exception:  # noqa: BLE001 - never break the interpreter's start or an import
        pass


def installed() -> bool:
    """Whether the hook is installed in this process (or registration already happened)."""
    return _STATE["installed"]
