"""fairseq_expire_compat: each fix on its own, and the installed start-up hook in fresh processes."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fairseq_expire_compat

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args, cwd=REPO):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_install_is_idempotent():
    fairseq_expire_compat.install()
    fairseq_expire_compat.install()
    fixers = [f for f in sys.meta_path if isinstance(f, fairseq_expire_compat._PostImportFixer)]
    assert len(fixers) == 1
    import fairseq_cli.train

    fairseq_expire_compat._fix_train(fairseq_cli.train)  # again: no layer is added
    layers, cli_main = 0, fairseq_cli.train.cli_main
    while hasattr(cli_main, "__wrapped__"):
        layers, cli_main = layers + 1, cli_main.__wrapped__
    assert layers == 2  # the command completion, inside the one-line usage errors
    assert dataclasses._get_field._fairseq_expire_get_field_allowing_dataclass_defaults


def test_dataclass_instance_defaults_are_allowed_as_on_python_3_10():
    @dataclasses.dataclass
    class Inner:
        x: int = 1

    @dataclasses.dataclass
    class Outer:
        inner: Inner = Inner()
        other: Inner = dataclasses.field(default=Inner(2))

    assert Outer().inner.x == 1 and Outer().other.x == 2
    assert Inner.__hash__ is None  # the class is left as it was
    with pytest.raises(ValueError, match="mutable default"):  # lists stay forbidden, as on 3.10

        @dataclasses.dataclass
        class WithList:
            items: list = []


def test_fairseq_checkpoints_unpickle_full_objects(tmp_path):
    import fairseq.checkpoint_utils

    path = tmp_path / "state.pt"
    torch.save({"args": argparse.Namespace(arch="expire_span_lm")}, path)
    with pytest.raises(Exception):
        torch.load(path)  # torch >= 2.6 refuses it by default: the breakage the fix undoes
    assert fairseq.checkpoint_utils.torch.load(path)["args"].arch == "expire_span_lm"
    assert torch.load is not fairseq.checkpoint_utils.torch.load  # torch itself is untouched


def test_fairseq_imports_in_a_fresh_interpreter_without_pythonpath():
    result = run(
        [sys.executable, "-c", "import fairseq, fairseq.checkpoint_utils; print(fairseq.__version__)"],
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.12.2"


def test_console_script_explains_a_wrong_user_dir():
    result = run([str(BIN / "fairseq-train"), "data-bin/x", "--user-dir", "no_such_plugin"])
    assert result.returncode != 0
    assert "--user-dir 'no_such_plugin' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugin_explains_missing_fairseq():
    code = "import sys; sys.modules['fairseq'] = None; import fairseq_expire"
    result = run([sys.executable, "-c", code])
    assert result.returncode != 0
    assert "fairseq_expire needs fairseq 0.12.2" in result.stderr


def test_distributed_main_destroys_its_process_group(tmp_path, monkeypatch):
    import pickle

    import fairseq.distributed.utils as distributed_utils
    import torch.distributed as dist

    assert distributed_utils.distributed_main is fairseq_expire_compat._distributed_main_then_destroy_group
    assert (
        pickle.loads(pickle.dumps(distributed_utils.distributed_main)) is distributed_utils.distributed_main
    )

    def fairseq_distributed_main(i, main, cfg, kwargs):  # what fairseq's does, without its config machinery
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        main(cfg, **kwargs)

    monkeypatch.setattr(
        distributed_utils, "_fairseq_expire_original_distributed_main", fairseq_distributed_main
    )
    seen = []
    distributed_utils.distributed_main(0, lambda cfg: seen.append(dist.is_initialized()), None, {})
    assert seen == [True] and not dist.is_initialized()
