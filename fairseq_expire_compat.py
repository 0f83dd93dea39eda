"""Make fairseq 0.12.2 (its last release) run on Python >= 3.11, numpy 2 and torch >= 2.6.

Installed next to the ``fairseq_expire`` package together with ``fairseq_expire_compat.pth``, so Python runs
:func:`install` at start-up and the fixes are active in the real ``fairseq-train``, ``fairseq-eval-lm`` and
``fairseq-preprocess`` console scripts, with no wrapper and no PYTHONPATH. It imports nothing heavy: fixes that
touch fairseq are applied right after the fairseq module in question is first imported. Every fix is idempotent
and does nothing where fairseq already works. Each one names the upstream breakage it undoes.

This is a separate top-level module, not part of ``fairseq_expire``, because importing the plugin package
registers models and therefore imports torch and fairseq; the start-up hook must stay cheap for every Python
process of the environment (pip included).
"""

import dataclasses
import importlib.abc
import importlib.machinery
import os
import sys
import types

_INSTALLED = "_fairseq_expire_compat_installed"


# --- Python >= 3.11: dataclass instances as field defaults ---------------------------------------------------------
# fairseq's configs declare ``common: CommonConfig = CommonConfig()``. Python 3.11 rejects every unhashable default
# (bpo-44674); 3.10 only rejected list, dict and set. We restore the 3.10 rule for defaults that are dataclass
# instances: the default object is shared between instances exactly as it was on 3.10.


def _allow_dataclass_instance_defaults():
    original = dataclasses._get_field
    if getattr(original, "_fairseq_expire_compat", False):
        return

    def _get_field(cls, a_name, *args, **kwargs):
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if isinstance(default, dataclasses.Field):
            default = default.default
        default_cls = type(default)
        if not (dataclasses.is_dataclass(default_cls) and default_cls.__hash__ is None):
            return original(cls, a_name, *args, **kwargs)
        default_cls.__hash__ = object.__hash__  # looks hashable for the duration of the check only
        try:
            return original(cls, a_name, *args, **kwargs)
        finally:
            default_cls.__hash__ = None

    _get_field._fairseq_expire_compat = True
    dataclasses._get_field = _get_field


# --- torch >= 2.6: torch.load(weights_only=True) by default ---------------------------------------------------------
# fairseq checkpoints hold argparse Namespaces and omegaconf configs, which weights-only unpickling refuses, so
# checkpoint loading (resume, eval-lm) and the rank-0 state broadcast of a multi-process resume fail. Only in the
# two fairseq modules that read checkpoints, ``torch.load`` unpickles full objects again as it did before torch 2.6
# (fairseq's own trust model: load checkpoints you trust).


class _TorchWithFullUnpickling(types.ModuleType):
    """The torch module, except that ``load`` defaults to ``weights_only=False``."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def load(*args, weights_only=False, **kwargs):
        import torch

        return torch.load(*args, weights_only=weights_only, **kwargs)


def _full_unpickling_for_checkpoints(module):
    if not isinstance(module.torch, _TorchWithFullUnpickling):
        module.torch = _TorchWithFullUnpickling("torch")


# --- --user-dir pointing nowhere ---------------------------------------------------------------------------------------
# fairseq raises a bare ``FileNotFoundError: /abs/path`` from deep inside its argument parsing.


def _explain_missing_user_dir(module):
    original = module.import_user_module
    if getattr(original, "_fairseq_expire_compat", False):
        return

    def import_user_module(args):
        user_dir = getattr(args, "user_dir", None)
        try:
            return original(args)
        except FileNotFoundError as error:
            raise SystemExit(
                f"error: --user-dir {user_dir!r} does not exist (resolved to {os.path.abspath(user_dir)}). "
                "Pass the path of the plugin package directory, e.g. `--user-dir fairseq_expire` from the "
                "repository root or `--user-dir /path/to/fairseq-expire/fairseq_expire`."
            ) from error

    import_user_module._fairseq_expire_compat = True
    module.import_user_module = import_user_module


# --- torch >= 2.4: process groups left alive at exit ---------------------------------------------------------------
# fairseq's ``distributed_main`` ends with a barrier and returns, leaving the process group to interpreter teardown.
# With gloo, its worker threads are then destroyed while joinable and a rank can die with "terminate called without
# an active exception" (SIGABRT) after training finished: srun reports the job FAILED. Destroy the group first.


def _distributed_main_then_destroy_group(i, main, cfg, kwargs):
    """fairseq's ``distributed_main``, then ``destroy_process_group``; module level so that spawn can pickle it."""
    import torch.distributed
    from fairseq.distributed import utils

    utils._fairseq_expire_original_distributed_main(i, main, cfg, kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fix_distributed_utils(module):
    _full_unpickling_for_checkpoints(module)
    if not hasattr(module, "_fairseq_expire_original_distributed_main"):
        module._fairseq_expire_original_distributed_main = module.distributed_main
        module.distributed_main = _distributed_main_then_destroy_group


_POST_IMPORT_FIXES = {
    "fairseq.checkpoint_utils": _full_unpickling_for_checkpoints,
    "fairseq.distributed.utils": _fix_distributed_utils,
    "fairseq.utils": _explain_missing_user_dir,
}


class _PostImportFixer(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs a fix right after a fairseq module executes, before anyone else can use it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _POST_IMPORT_FIXES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _FixingLoader(spec.loader, _POST_IMPORT_FIXES[fullname])
        return spec


class _FixingLoader(importlib.abc.Loader):
    def __init__(self, loader, fix):
        self.loader = loader
        self.fix = fix

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.fix(module)


def install():
    """Apply every fix; safe to call any number of times."""
    _allow_dataclass_instance_defaults()
    for name, fix in _POST_IMPORT_FIXES.items():
        if name in sys.modules:
            fix(sys.modules[name])
    if not getattr(sys, _INSTALLED, False):
        sys.meta_path.insert(0, _PostImportFixer())
        setattr(sys, _INSTALLED, True)
