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
import functools
import glob
import importlib.abc
import importlib.machinery
import logging
import os
import shutil
import sys
import types
import zipfile

_INSTALLED = "_fairseq_expire_compat_installed"
logger = logging.getLogger("fairseq_expire_compat")


class UsageError(ValueError):
    """Bad input, said with the option to change and how. The fairseq console scripts print it as one line
    (``error: ...``, exit status 1) instead of a traceback, also when fairseq wrapped it in an error of its own.

    It lives here, not in the plugin, because the console-script fix below must recognise it; the plugin
    re-exports it as :class:`fairseq_expire.errors.UsageError`.
    """


def _replaces(module, name: str):
    """Decorator: ``module.name`` becomes ``fix(original, *args, **kwargs)``, once. Each replacement carries the
    marks of the layers below it (``functools.wraps``), so applying the fixes again (``install()`` twice, a module
    fixed by two fixes) adds no layer."""

    def apply(fix):
        original = getattr(module, name)
        mark = f"_fairseq_expire_{fix.__name__}"
        if getattr(original, mark, False):
            return original

        @functools.wraps(original)
        def replacement(*args, **kwargs):
            return fix(original, *args, **kwargs)

        setattr(replacement, mark, True)
        setattr(module, name, replacement)
        return replacement

    return apply


# --- Python >= 3.11: dataclass instances as field defaults ---------------------------------------------------------
# fairseq's configs declare ``common: CommonConfig = CommonConfig()``. Python 3.11 rejects every unhashable default
# (bpo-44674); 3.10 only rejected list, dict and set. We restore the 3.10 rule for defaults that are dataclass
# instances: the default object is shared between instances exactly as it was on 3.10.


def _allow_dataclass_instance_defaults():
    @_replaces(dataclasses, "_get_field")
    def get_field_allowing_dataclass_defaults(original, cls, a_name, *args, **kwargs):
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


# --- checkpoint files torn by a kill ---------------------------------------------------------------------------------
# ``save_checkpoint`` writes the first file of a save atomically (``.tmp``, then rename) but ``PathManager.copy``s it
# over ``checkpoint_last.pt`` and the others in place: a kill during the copy (Slurm preemption) leaves a truncated
# ``checkpoint_last.pt``, and the same command then fails for good with ``EOFError``/``UnpicklingError``. Copies go
# through a temporary file and ``os.replace``, a resume whose ``checkpoint_last.pt`` is unreadable starts from the
# newest intact checkpoint of the save directory, and an unreadable checkpoint is named in one line.

TEMPORARY = ".tmp"  # fairseq's own suffix for the file being written


def readable_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint file. torch's zip format writes its central directory last, so
    an empty, truncated or foreign file has none; files in torch's legacy format are fully unpickled."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        import torch

        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


class _AtomicCopyPathManager:
    """fairseq's ``PathManager``, except that copying a local file makes the destination appear complete."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def copy(self, src_path, dst_path, overwrite=False, **kwargs):
        if "://" in src_path or "://" in dst_path:  # remote storage: its own semantics
            return self._path_manager.copy(src_path, dst_path, overwrite=overwrite, **kwargs)
        if os.path.exists(dst_path) and not overwrite:
            return False
        shutil.copyfile(src_path, dst_path + TEMPORARY)
        os.replace(dst_path + TEMPORARY, dst_path)
        return True


def _newest_readable_checkpoint(save_dir: str, suffix: str, but: str):
    candidates = [p for p in glob.glob(os.path.join(save_dir, f"checkpoint*{suffix}.pt")) if p != but]
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        if readable_checkpoint(path):
            return path
    return None


def repair_last_checkpoint(save_dir: str, suffix: str = "") -> None:
    """Make ``checkpoint_last.pt`` intact before a resume: a torn one (or none left by an interrupted save) is
    replaced by the newest readable checkpoint of ``save_dir``, and stale temporary files are removed."""
    last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    interrupted = os.path.exists(last + TEMPORARY)
    for stale in glob.glob(os.path.join(save_dir, f"*.pt{TEMPORARY}")):
        logger.warning(f"removing {stale}, left by an interrupted checkpoint save")
        _remove(stale)
    if os.path.exists(last) and readable_checkpoint(last):
        return
    if not os.path.exists(last) and not interrupted:
        return  # a first launch
    fallback = _newest_readable_checkpoint(save_dir, suffix, but=last)
    if fallback is None:
        logger.warning(
            f"{last} is unreadable (a save was interrupted) and no intact checkpoint is left in "
            f"{save_dir}: training starts from scratch"
        )
        _remove(last)
        return
    logger.warning(f"{last} is unreadable or missing (a save was interrupted): resuming from {fallback}")
    _AtomicCopyPathManager(None).copy(fallback, last, overwrite=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:  # another rank was first
        pass


def _fix_checkpoint_utils(module):
    _full_unpickling_for_checkpoints(module)
    if isinstance(module.PathManager, _AtomicCopyPathManager):
        return
    module.PathManager = _AtomicCopyPathManager(module.PathManager)
    load_checkpoint, load_checkpoint_to_cpu = module.load_checkpoint, module.load_checkpoint_to_cpu

    def load_checkpoint_resuming_from_an_intact_file(cfg, trainer, **kwargs):
        if cfg.restore_file == "checkpoint_last.pt":  # fairseq's default: resume from the save directory
            repair_last_checkpoint(cfg.save_dir, trainer.checkpoint_suffix or "")
        return load_checkpoint(cfg, trainer, **kwargs)

    def load_checkpoint_to_cpu_naming_the_file(path, *args, **kwargs):
        try:
            return load_checkpoint_to_cpu(path, *args, **kwargs)
        except Exception as error:
            if os.path.isfile(path) and not readable_checkpoint(path):
                raise UsageError(
                    f"{path} is not a readable checkpoint ({type(error).__name__}: it is empty, truncated by an "
                    "interrupted save, or not a checkpoint): pass another one (checkpoint_best.pt, or a "
                    "checkpointEPOCH_UPDATES.pt of the same --save-dir)"
                ) from error
            raise

    module.load_checkpoint = load_checkpoint_resuming_from_an_intact_file
    module.load_checkpoint_to_cpu = load_checkpoint_to_cpu_naming_the_file


# --- a model that reads an option its task lacks ------------------------------------------------------------------
# ``convert_namespace_to_omegaconf`` resolves the model's ``II("task.X")`` options and fails with a bare omegaconf
# ``ConfigKeyError`` when ``--task`` has no option X (``--arch transformer_lm --task language_modeling_with_memory``).


def _name_the_task_a_model_does_not_fit(module):
    @_replaces(module, "convert_namespace_to_omegaconf")
    def convert_namespace_naming_the_task(original, args):
        try:
            return original(args)
        except Exception as error:
            missing = str(error).split("interpolation key 'task.", 1)
            if type(error).__name__ != "ConfigKeyError" or len(missing) < 2:
                raise
            raise UsageError(
                f"--arch {getattr(args, 'arch', None)} reads the task option '{missing[1].split(chr(39))[0]}', "
                f"which --task {getattr(args, 'task', None)} does not have: the model is not made for this task "
                "(pick an --arch of the task's own models)"
            ) from error


# --- console scripts: usage errors as one line ------------------------------------------------------------------
# fairseq prints every exception as a traceback, and its trainer wraps any error of loading weights into "please
# ensure that the architectures match". A :class:`UsageError` anywhere in the chain is printed as the one line it
# is. The process then ends with ``os._exit``: at that point data-loader and buffer threads may still run, and a
# normal interpreter exit can abort in their C++ destructors ("terminate called without an active exception").


def usage_error_in(error: BaseException):
    """The :class:`UsageError` that caused ``error`` (itself, its cause or its context), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UsageError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _one_line_usage_errors(module):
    @_replaces(module, "cli_main")
    def cli_main_with_one_line_usage_errors(original, *args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as error:
            usage = usage_error_in(error)
            if usage is None:
                raise
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.write(f"error: {usage}\n")
            sys.stderr.flush()
            os._exit(1)


# --- --user-dir pointing nowhere ---------------------------------------------------------------------------------------
# fairseq raises a bare ``FileNotFoundError: /abs/path`` from deep inside its argument parsing.


def _explain_missing_user_dir(module):
    @_replaces(module, "import_user_module")
    def import_user_module_naming_a_missing_dir(original, args):
        user_dir = getattr(args, "user_dir", None)
        try:
            return original(args)
        except FileNotFoundError as error:
            raise SystemExit(
                f"error: --user-dir {user_dir!r} does not exist (resolved to {os.path.abspath(user_dir)}). "
                "Pass the path of the plugin package directory, e.g. `--user-dir fairseq_expire` from the "
                "repository root or `--user-dir /path/to/fairseq-expire/fairseq_expire`."
            ) from error


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


# --- a resume at --max-update trains one update more ----------------------------------------------------------------
# fairseq's epoch loop checks ``num_updates >= max_update`` only after an update. A job killed (or preempted and
# requeued) after its final save resumes at the target and trains to target + 1, saving over the final checkpoint.


def _stop_at_max_update(module):
    @_replaces(module, "train")
    def train_unless_at_max_update(original, cfg, trainer, task, epoch_itr):
        max_update = cfg.optimization.max_update
        if max_update and trainer.get_num_updates() >= max_update:
            logging.getLogger("fairseq_cli.train").info(
                f"the checkpoint is at update {trainer.get_num_updates()}, --max-update {max_update}: nothing to train"
            )
            return [None], True
        return original(cfg, trainer, task, epoch_itr)


# --- the card's short command: fairseq-train DATA --user-dir fairseq_expire --arch expire_span_lm -------------------
# fairseq's default --task and --criterion (translation, cross_entropy) would train the wrong thing. The plugin
# completes the command line before fairseq parses it (``fairseq_expire.usage.complete_training_command``); this
# only wires it in. fairseq imports the --user-dir module first thing when parsing; it is imported here the same
# way (fairseq remembers it and does not import it twice), and the command completed only when it is this plugin.


def _complete_plugin_training_commands(module):
    @_replaces(module, "cli_main")
    def cli_main_completing_plugin_commands(original, *args, **kwargs):
        import argparse  # here, not at start-up: this module is imported by every Python process

        parser = argparse.ArgumentParser(
            add_help=False, allow_abbrev=False
        )  # fairseq's own --user-dir parser
        parser.add_argument("--user-dir", default=None)
        user_dir = parser.parse_known_args(sys.argv[1:])[0].user_dir
        if user_dir is not None:
            from fairseq import utils

            utils.import_user_module(argparse.Namespace(user_dir=user_dir))
            if "fairseq_expire" in sys.modules:
                from fairseq_expire.usage import complete_training_command

                sys.argv[1:] = complete_training_command(sys.argv[1:])
        return original(*args, **kwargs)


# --- --bf16 implies --tpu; --fp16 and --amp without CUDA; eval-lm ignores --bf16 ---------------------------------
# fairseq 0.12.2's ``parse_args_and_arch`` (options.py) sets ``--tpu`` whenever ``--bf16`` or
# ``--memory-efficient-bf16`` is given, so bf16 needs torch_xla and dies in ``xla_device`` on CPU and CUDA alike.
# Unless ``--tpu`` is on the command line, bf16 now runs on the device fairseq would otherwise pick: the trainer
# converts the model to bf16 with fp32 master weights (FP16Optimizer, no loss scaling), exactly its TPU recipe.
# ``--fp16`` asserts CUDA (FP16Optimizer's flat fp32 copy asks ``torch.cuda.current_device()``) and ``--amp`` is
# CUDA autocast, a silent fp32 run on CPU: without CUDA both stop in one line naming --bf16. ``fairseq-eval-lm``
# converts the model for ``--fp16`` but ignores ``--bf16``: it converts it to bf16 as well.


def _tpu_on_command_line(input_args) -> bool:
    """fairseq's parsers refuse abbreviations, so ``--tpu`` is given iff it is on the command line."""
    return "--tpu" in (sys.argv[1:] if input_args is None else input_args)


def _native_bf16(cuda: bool) -> bool:
    """Whether the device computes in bf16 (Ampere or newer; a CPU with AVX512-BF16 or AMX) or emulates it."""
    import torch

    return torch.cuda.is_bf16_supported() if cuda else torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _check_reduced_precision(args) -> None:
    """Refuse fp16 and amp without CUDA, before any data or model is loaded; warn where bf16 is emulated."""
    import torch

    if args.tpu:
        return
    cuda = torch.cuda.is_available() and not getattr(args, "cpu", False)
    for flag, why in (
        ("fp16", "is CUDA-only in fairseq"),
        ("amp", "is CUDA autocast: it would train in fp32"),
    ):
        if getattr(args, flag, False) and not cuda:
            raise UsageError(
                f"--{flag} {why}, and this run has no GPU ({'--cpu' if args.cpu else 'no CUDA device'}): "
                "use --bf16 on CPU"
            )
    if args.bf16 and not _native_bf16(cuda):
        logger.warning(
            f"--bf16: this {'GPU' if cuda else 'CPU'} has no native bf16 arithmetic "
            f"({'compute capability < 8.0' if cuda else 'no AVX512-BF16/AMX'}): bf16 is emulated and slower "
            "than fp32"
        )


def _bf16_without_tpu(module):
    @_replaces(module, "parse_args_and_arch")
    def parse_args_and_arch_bf16_without_tpu(original, parser, input_args=None, *args, **kwargs):
        parsed = original(parser, input_args, *args, **kwargs)
        result = parsed[0] if isinstance(parsed, tuple) else parsed
        if getattr(result, "bf16", False) and not _tpu_on_command_line(input_args):
            result.tpu = False
        if hasattr(result, "tpu"):
            _check_reduced_precision(result)
        return parsed


def _eval_lm_in_bf16(module):
    eval_lm = module.eval_lm

    def eval_lm_converting_to_bf16(models, *args, **kwargs):
        import torch

        for model in models:
            model.to(dtype=torch.bfloat16)
        return eval_lm(models, *args, **kwargs)

    @_replaces(module, "main")
    def main_in_bf16(main, cfg, **kwargs):
        if not (cfg.common.bf16 and not cfg.common.tpu):
            return main(cfg, **kwargs)
        module.eval_lm = eval_lm_converting_to_bf16  # main calls it with the loaded models on their device
        try:
            return main(cfg, **kwargs)
        finally:
            module.eval_lm = eval_lm


def _fix_eval_lm(module):
    _eval_lm_in_bf16(module)
    _one_line_usage_errors(module)


def _fix_train(module):
    _stop_at_max_update(module)
    _complete_plugin_training_commands(module)  # inside the one-line errors: a refusal is one line
    _one_line_usage_errors(module)


_POST_IMPORT_FIXES = {
    "fairseq.checkpoint_utils": _fix_checkpoint_utils,
    "fairseq.dataclass.utils": _name_the_task_a_model_does_not_fit,
    "fairseq.distributed.utils": _fix_distributed_utils,
    "fairseq.utils": _explain_missing_user_dir,
    "fairseq.options": _bf16_without_tpu,
    **{f"fairseq_cli.{name}": _one_line_usage_errors for name in ("validate", "generate", "interactive")},
    "fairseq_cli.eval_lm": _fix_eval_lm,
    "fairseq_cli.train": _fix_train,
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

    def __getattr__(self, name):  # get_code, get_source...: runpy (``python -m``) asks the loader for them
        return getattr(self.loader, name)

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
