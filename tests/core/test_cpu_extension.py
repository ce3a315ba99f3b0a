"""The C++ extension cache: a build killed halfway and a second checkout both leave it usable."""
import os
import shutil
import subprocess
import sys

import pytest

from workers.engine import cpu_attention, cpu_extension

needs_compiler = pytest.mark.skipif(cpu_attention.load() is None,
                                    reason="C++ extensions do not build on this machine")
# A module with one function, built through the same path as the kernels (Python.h only: seconds).
SOURCE = """#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""},
                                {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "tiny_ext", "", -1, methods};
PyMODINIT_FUNC PyInit_tiny_ext() { return PyModule_Create(&module); }
"""
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = ("import sys; from workers.engine import cpu_extension; "
         "print(cpu_extension.build('tiny_ext', sys.argv[1]).answer())")


def build_elsewhere(source: str, cache: str) -> str:
    """Builds in a fresh process, as a new replica would; fails rather than hangs."""
    env = dict(os.environ, PAGODA_KERNEL_CACHE=cache)
    done = subprocess.run([sys.executable, "-c", BUILD, source], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def binary(directory: str) -> str:
    return next(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".so"))


@needs_compiler
def test_a_build_killed_halfway_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's lock file, left by a process killed while building, is cleared, not awaited."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("PAGODA_KERNEL_CACHE", cache)
    source = tmp_path / "tiny_ext.cpp"
    source.write_text(SOURCE)
    directory = cpu_extension.build_directory("tiny_ext", str(source))
    os.makedirs(directory)
    with open(os.path.join(directory, "lock"), "w"):
        pass
    assert build_elsewhere(str(source), cache) == "42"
    assert not os.path.exists(os.path.join(directory, "lock"))


@needs_compiler
def test_checkouts_at_other_paths_share_one_binary(tmp_path, monkeypatch):
    """The same source in a second checkout loads the cached binary instead of rebuilding it."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("PAGODA_KERNEL_CACHE", cache)
    first = tmp_path / "one" / "tiny_ext.cpp"
    first.parent.mkdir()
    first.write_text(SOURCE)
    assert build_elsewhere(str(first), cache) == "42"
    directory = cpu_extension.build_directory("tiny_ext", str(first))
    built = os.stat(binary(directory)).st_mtime_ns
    second = tmp_path / "two" / "tiny_ext.cpp"
    shutil.copytree(first.parent, second.parent)
    assert cpu_extension.build_directory("tiny_ext", str(second)) == directory
    assert build_elsewhere(str(second), cache) == "42"
    assert os.stat(binary(directory)).st_mtime_ns == built
