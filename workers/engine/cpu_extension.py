"""Builds one of our C++ CPU extensions for this machine and caches the result.

Each extension is compiled on first use with the machine's C++ compiler for its own instruction
set (`-march=native`) and cached under $PAGODA_KERNEL_CACHE (default ~/.cache/pagoda/kernels),
in a folder keyed by the CPU's feature flags (a cache shared between machines never hands one a
binary it cannot run) and by the source's content and flags (an edited source always builds
afresh; the headers beside it count as part of the source). The build compiles a copy of the
source kept in that folder, so checkouts at different paths share one binary instead of
rebuilding it in turn, and it holds an OS lock that dies with its process: a build killed halfway
never leaves the next process waiting on torch's lock file.
Where it cannot build (no compiler, no ninja), `try_build` returns None and callers keep
their PyTorch path.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
from types import ModuleType

import torch

log = logging.getLogger("pagoda.engine")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fopenmp-simd"]


def source_files(source: str) -> list[str]:
    """The source and the headers beside it: what a build compiles."""
    folder = os.path.dirname(os.path.abspath(source))
    return [source] + sorted(os.path.join(folder, n) for n in os.listdir(folder)
                             if n.endswith(".h"))


def build_directory(name: str, source: str, extra_flags: list[str] | None = None) -> str:
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    code = b""
    for path in source_files(source):
        with open(path, "rb") as f:
            code += f.read()
    build = f"{flags}{torch.__version__}{sys.version}{extra_flags or ''}"
    key = hashlib.sha256(build.encode() + code).hexdigest()
    root = os.environ.get("PAGODA_KERNEL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "pagoda", "kernels"))
    return os.path.join(root, f"{name}-{key[:12]}")


def build(name: str, source: str, extra_flags: list[str] | None = None) -> ModuleType:
    """Compiles (or reuses the cached build of) one C++ source as extension `name`."""
    from torch.utils import cpp_extension

    try:  # ninja from PyPI lives next to the venv's python, which may not be on PATH
        import ninja
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    directory = build_directory(name, source, extra_flags)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "build.lock"), "w") as baton:
        fcntl.flock(baton, fcntl.LOCK_EX)  # the kernel releases it if this process dies
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):  # torch's own lock: no build holds it while we hold ours
            os.remove(stale)
        return cpp_extension.load(name, [_copy_sources(source, directory)],
                                  extra_cflags=FLAGS + (extra_flags or []),
                                  extra_ldflags=["-fopenmp"], build_directory=directory,
                                  verbose=False)


def _copy_sources(source: str, directory: str) -> str:
    """Copies the source and its headers into the build folder, once; returns the copy's path."""
    copies = os.path.join(directory, "src")
    os.makedirs(copies, exist_ok=True)
    for path in source_files(source):
        copy = os.path.join(copies, os.path.basename(path))
        if not os.path.exists(copy):  # same folder, same content: rewriting would only bump mtime
            with open(path, "rb") as f, open(copy + ".tmp", "wb") as out:
                out.write(f.read())
            os.replace(copy + ".tmp", copy)
    return os.path.join(copies, os.path.basename(source))


def try_build(name: str, source: str, what: str, extra_flags: list[str] | None = None
              ) -> ModuleType | None:
    """`build`, or None (and a warning naming `what`) where the extension cannot be built."""
    try:
        return build(name, source, extra_flags)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        log.warning("%s unavailable, using the PyTorch path: %s", what,
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
