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
    assert dataclasses._get_field._fairseq_expire_compat


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
