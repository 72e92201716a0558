"""Tests for .ci/patch_jittor.py (the per-kernel compile lock `make setup` puts into Jittor) and for the package's
fallback when Jittor is not patched (one kernel compiled at a time)."""

import importlib.util
import os
import types

import pytest

import guided_diffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patcher():
    spec = importlib.util.spec_from_file_location("patch_jittor", os.path.join(REPO, ".ci", "patch_jittor.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_source() -> str:
    return _patcher().jittor_source(os.path.join("src", "jit_compiler.cc"))


def test_the_installed_jittor_carries_the_compile_lock():
    pj = _patcher()
    assert pj.is_patched(_installed_source()), "run `make setup` (it applies .ci/patch_jittor.py)"
    assert guided_diffusion._COMPILE_LOCK_MARKER == pj.MARKER


def test_the_patch_applies_to_jittor_1_3_11_source_once(tmp_path):
    pj = _patcher()
    with open(_installed_source()) as f:
        patched = f.read()
    original = patched.replace(pj.HELPERS, pj.HELPERS_ANCHOR).replace(pj.COMPILE_PATCHED, pj.COMPILE_ANCHOR)
    assert pj.MARKER not in original
    target = tmp_path / "jit_compiler.cc"
    target.write_text(original)
    assert pj.patch(str(target)) is True
    assert target.read_text() == patched
    assert "KernelCompileLock kernel_compile_lock(jit_lib_path + \".lock\");" in patched
    assert pj.patch(str(target)) is False  # idempotent
    assert target.read_text() == patched
    assert not [p for p in os.listdir(str(tmp_path)) if p != "jit_compiler.cc"]  # no temporary file left


def test_the_patch_refuses_another_jittor_source(tmp_path):
    pj = _patcher()
    target = tmp_path / "jit_compiler.cc"
    target.write_text("// some other version\n")
    with pytest.raises(SystemExit, match="1.3.11"):
        pj.patch(str(target))
    assert target.read_text() == "// some other version\n"


def test_an_unpatched_jittor_compiles_one_kernel_at_a_time_and_says_how_to_fix_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "jit_compiler.cc").write_text("// unpatched\n")
    fake = types.SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake)
    monkeypatch.delenv("use_parallel_op_compiler", raising=False)
    guided_diffusion._guard_kernel_compiles()
    try:
        assert os.environ.get("use_parallel_op_compiler") == "0"
        assert "make setup" in capsys.readouterr().err
    finally:
        monkeypatch.delenv("use_parallel_op_compiler", raising=False)
    # a patched one, or a user's own setting, is left alone
    (tmp_path / "src" / "jit_compiler.cc").write_text("// %s\n" % guided_diffusion._COMPILE_LOCK_MARKER)
    guided_diffusion._guard_kernel_compiles()
    assert "use_parallel_op_compiler" not in os.environ
    monkeypatch.setenv("use_parallel_op_compiler", "4")
    (tmp_path / "src" / "jit_compiler.cc").write_text("// unpatched\n")
    guided_diffusion._guard_kernel_compiles()
    assert os.environ["use_parallel_op_compiler"] == "4"


def test_the_first_version_of_the_patch_is_replaced(tmp_path):
    pj = _patcher()
    with open(_installed_source()) as f:
        patched = f.read()
    original = patched.replace(pj.HELPERS, pj.HELPERS_ANCHOR).replace(pj.COMPILE_PATCHED, pj.COMPILE_ANCHOR)
    first_version = (pj.HELPERS_ANCHOR + "\n// guided-diffusion-jittor: per-kernel compile lock (.ci/patch_jittor.py): "
                     "...\n#ifndef _WIN32\nstruct KernelCompileLock { /* flock */ };\n#endif\n")
    old = original.replace(pj.HELPERS_ANCHOR, first_version).replace(pj.COMPILE_ANCHOR, pj.COMPILE_PATCHED)
    target = tmp_path / "jit_compiler.cc"
    target.write_text(old)
    assert pj.patch(str(target)) is True
    assert target.read_text() == patched
