"""The kernels of the kernels package compiled ahead of time, once per machine, into an extension module.

    module = aot_kernels.load()    # built on first use; None where it cannot be built (the JIT runs then)

A runtime process that imports numba carries the compiler with it: numba's Python modules and
LLVM's code, about 120 MiB of a 160 MiB process, on every node (docs/BENCHMARKS.md). On a 1 GB
board that is an eighth of the memory, and it is most of what keeps the root from holding just
its share of the model. So the runtime runs the same kernels from a module that numba's
ahead-of-time compiler (numba.pycc) builds: the serial `*_rows` / `*_tasks` kernels, compiled
for this CPU, releasing the GIL so dispatch.py can run them on several threads at once. Only the
build, in a child process (`python -m dllama.runtime.aot_kernels DIR`), imports numba.

The module is cached under $DLLAMA_CACHE (default ~/.cache/dllama) in kernels/<key>/, keyed by
the kernel sources, numba, Python and the CPU, and written to a temp folder then renamed. On ARM
the CPU is what its HWCAP bits say (cpu.py), not LLVM's name for it: a Cortex-A76/A55 (Pi 5)
gets the dot-product kernels, a Cortex-A53/A72 (Pi 3B+, Pi 4) the portable NEON ones;
`kernel_path()` tells which the module holds. A
build needs a C compiler and Python's headers (pycc links numba's small C runtime in); without
them `load` says so once and returns None.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.runtime import cpu

MODULE = "dllama_kernels"
_W = "u1[:, ::1]"  # quantized weights: rows of packed blocks (an "A" layout here runs 1.7x slower)
EXPORTS = {  # kernel in the kernels package -> its one signature in the compiled module
    "quantize_q80_tasks": "void(f4[:, ::1], i1[:, ::1], f4[:, ::1], i4[:, ::1], i8, i8)",
    "q80_roundtrip": "void(f4[:, ::1])",
    "q80_encode": "void(f4[:, ::1], u1[::1])",
    "q80_decode": "void(u1[::1], f4[:, ::1])",
    "interleave_q40": "void(u1[:, :], u1[:, ::1])",
    "interleave_q80": "void(u1[:, :], u1[:, ::1])",
    "matvec_q40_rows": f"void({_W}, i1[::1], f4[::1], i4[::1], f4[::1], f4[::1], i8, i8)",
    "matmul_q40_rows": f"void({_W}, i1[:, ::1], f4[:, ::1], i4[:, ::1], f4[::1], f4[:, ::1], i8, i8)",
    "matmul_q80_rows": f"void({_W}, i1[:, ::1], f4[:, ::1], i4[:, ::1], f4[::1], f4[:, ::1], i8, i8)",
    "matmul_f32_rows": "void(f4[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)",
    "silu_gate_rows": "void(f4[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)",
    "attention_tasks": "void(f4[:, :, ::1], f4[:, :, ::1], f4[:, :, ::1], i8, f4[:, ::1], i8, i8)",
    # the thread team (dispatch.Team): job table rows, publishing, the helpers' loop
    "job_quantize": "void(i8[::1], f4[:, ::1], i1[:, ::1], f4[:, ::1], i4[:, ::1], i8, i8)",
    "job_matvec_q40": f"void(i8[::1], {_W}, i1[::1], f4[::1], i4[::1], f4[::1], f4[::1], i8, i8)",
    "job_matmul_q40": f"void(i8[::1], {_W}, i1[:, ::1], f4[:, ::1], i4[:, ::1], f4[::1], f4[:, ::1], i8, i8)",
    "job_matmul_q80": f"void(i8[::1], {_W}, i1[:, ::1], f4[:, ::1], i4[:, ::1], f4[::1], f4[:, ::1], i8, i8)",
    "job_matmul_f32": "void(i8[::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)",
    "job_silu_gate": "void(i8[::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)",
    "job_attention": "void(i8[::1], f4[:, :, ::1], f4[:, :, ::1], f4[:, :, ::1], i8, f4[:, ::1], i8, i8)",
    "job_program": "void(i8[::1], i8[:, ::1], i8[::1], i8[::1], i8, i8, i8, i8, i8)",
    "run_program": "void(i8[:, ::1], i8, i8, i8[::1], i8[::1], i8, i8, i8)",
    "publish": "void(i8[::1], i8)",
    "spin_until_all_equal": "b1(i8[::1], i8, i8, i8)",
    "team_helper": "i8(i8[::1], i8[::1], i8[:, ::1], i8, i8, i8)",
    "kernel_path_code": "i8()",
}
_SOURCES = ("runtime/kernels/__init__.py", "runtime/kernels/ir.py", "runtime/kernels/math.py",
            "runtime/kernels/program.py", "runtime/kernels/team.py", "runtime/aot_kernels.py", "runtime/cpu.py",
            "formats/codecs.py", "f16bits.py")


def cache_root() -> Path:
    return Path(os.environ.get("DLLAMA_CACHE") or Path.home() / ".cache" / "dllama")


def _cpu_key() -> str:
    """The CPU as the kernels see it: model name and flags (x86 VNNI, ARM dot products)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in cpuinfo.splitlines() if line.split(":")[0].strip() in wanted]
    return (platform.machine() + "\n" + "\n".join(sorted(set(lines))) + os.environ.get("DLLAMA_NO_VNNI", "")
            + cpu.arm_target_features())  # under emulation /proc/cpuinfo is the host's: HWCAP tells


def build_key() -> str:
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((package / name).read_bytes())
    h.update(_numba_fingerprint())
    for part in (np.__version__, sys.version, _cpu_key()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _numba_fingerprint() -> bytes:
    """numba's version, without importing numba (that is what the compiled module saves)."""
    package = Path(importlib.util.find_spec("numba").origin).parent
    version_file = package / "_version.py"
    if version_file.exists():
        return version_file.read_bytes()
    stat = (package / "__init__.py").stat()
    return f"{stat.st_size} {stat.st_mtime_ns}".encode()


def module_dir() -> Path:
    return cache_root() / "kernels" / build_key()


def _import(folder: Path):
    for path in folder.glob(MODULE + ".*"):
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return None


_loaded: dict[str, object] = {}


def load(log=lambda message: print(message, file=sys.stderr)):
    """The compiled kernels for this machine, building them once if needed; None where that fails (one message)."""
    if "module" in _loaded:
        return _loaded["module"]
    folder = module_dir()
    try:
        module = _import(folder) if folder.is_dir() else None
    except (ImportError, OSError) as e:  # damaged by hand or by a disk error: built modules are renamed in whole
        log(f"dllama: cannot load the compiled kernels in {folder} ({e}); running numba's JIT kernels instead: "
            "delete that folder to rebuild them")
        _loaded["module"] = None
        return None
    if module is None:
        log(f"dllama: compiling the kernels for this CPU into {folder} (once: about a minute on a PC, several on a "
            "small board) ...")
        try:
            error = build(folder, log)
            fix = _fix_for(error or "")
        except OSError as e:  # an unwritable cache folder, a full disk
            error, fix = f"{e.strerror or e}: {e.filename or folder}", "set DLLAMA_CACHE to a writable folder"
        module = None if error else _import(folder)
        if module is None:
            log(f"dllama: cannot build the compiled kernels ({error or 'no module'}); running numba's JIT kernels "
                f"instead (same results, ~120 MiB more per process): {fix}")
    _loaded["module"] = module
    return module


def _fix_for(error: str) -> str:
    if "numba.pycc" in error:
        return "this numba has no ahead-of-time compiler (numba.pycc); install numba<=0.68 to get them"
    if "setuptools" in error:
        return "pip install setuptools (numba.pycc drives the C compiler through it) to get them"
    return ("install a C compiler (and C++, which numba.pycc checks for) and Python's headers "
            "(e.g. apt install gcc g++ python3-dev) to get them")


PROGRESS = "dllama-build: "  # the child's progress lines start with this; anything else is kept for the error


def build(folder: Path, log: Callable[[str], None] = lambda message: None) -> str | None:
    """Build the module into `folder` in a child process, logging its stages; None on success, else the error's
    last line."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "dllama.runtime.aot_kernels", str(staging)], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=_child_env(staging / "numba-cache"))
        other: list[str] = []
        for line in child.stdout:
            if line.startswith(PROGRESS):
                log(f"dllama:   {line[len(PROGRESS):].strip()} ({time.monotonic() - started:.0f} s)")
            elif line.strip():
                other.append(line.strip())
        if child.wait():
            return other[-1] if other else f"exit status {child.returncode}"
        log(f"dllama: kernels built in {time.monotonic() - started:.0f} s")
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # another process may have built it at the same time: theirs is as good
                raise
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _child_env(numba_cache: Path) -> dict:
    """The build's environment. An empty numba cache of its own: numba checks a cached function against its
    own file only, so a team_helper cached before program.py changed would bring the old layer programs
    into the module (the helper threads then ran other code than the calling thread)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(numba_cache))
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    if features := cpu.arm_target_features():
        env["NUMBA_CPU_FEATURES"] = features  # the kernels package and the compiler both read it (see _compile)
    return env


def kernel_path() -> str | None:
    """The int8 dot-product path of this machine's compiled kernels (cpu.KERNEL_PATHS), None without them."""
    module = load()
    return None if module is None else cpu.KERNEL_PATHS[module.kernel_path_code()]


def _compile(output_dir: str) -> None:
    """In the child: compile EXPORTS with numba.pycc, GIL released, for this CPU."""
    import numba.pycc.compiler as pycc_compiler
    from numba.core import codegen, config
    from numba.core.compiler import Flags
    from numba.pycc import CC

    from dllama.runtime import kernels

    _progress(f"numba loaded; typing and lowering {len(EXPORTS)} kernels")

    class ThreadFriendlyFlags(Flags):
        # pycc's wrappers keep the GIL and check integer division for zero; dispatch.py runs the
        # kernels on several threads, and their divisors are shapes (never zero)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.release_gil = True
            self.error_model = "numpy"

    pycc_compiler.Flags = ThreadFriendlyFlags
    _report_stages(pycc_compiler, len(EXPORTS))
    if config.CPU_FEATURES:  # ARM: the HWCAP's features (_child_env); pycc would take only the CPU name's
        codegen.AOTCPUCodegen._customize_tm_features = lambda self: config.CPU_FEATURES
    cc = CC(MODULE)
    cc.output_dir = output_dir
    cc.target_cpu = "host"
    for name, signature in EXPORTS.items():
        cc.export(name, signature)(_calling(getattr(kernels, name)))
    compile_mixins = cc._compile_mixins

    def compile_c_runtime(*args, **kwargs):  # after LLVM's machine code: numba's C helpers, then the link
        _progress("machine code generated (LLVM); compiling numba's C runtime and linking (C compiler)")
        return compile_mixins(*args, **kwargs)

    cc._compile_mixins = compile_c_runtime
    cc.compile()


def _progress(message: str) -> None:
    print(PROGRESS + message, flush=True)


def _report_stages(pycc_compiler, n_kernels: int) -> None:
    """In the child: a line per kernel typed and lowered (the layer programs and the thread team take longest),
    and one when LLVM starts on the whole module."""
    compile_extra = pycc_compiler.compile_extra
    done = [0]

    def counted(typing_context, target_context, function, *args, **kwargs):
        result = compile_extra(typing_context, target_context, function, *args, **kwargs)
        done[0] += 1
        _progress(f"kernel {done[0]}/{n_kernels} typed and lowered: {getattr(function, 'kernel', '?')}")
        if done[0] == n_kernels:
            _progress("optimizing and generating machine code (LLVM)")
        return result

    pycc_compiler.compile_extra = counted


def _calling(kernel):
    """A plain function that calls the jitted kernel, so the kernel keeps its own options (fastmath)."""
    args = ", ".join(f"a{i}" for i in range(kernel.py_func.__code__.co_argcount))
    namespace = {"kernel": kernel}
    # pycc compiles Python functions, not dispatchers
    exec(f"def call({args}):\n    return kernel({args})\n", namespace)
    namespace["call"].kernel = kernel.py_func.__name__  # for the build's progress lines
    return namespace["call"]


if __name__ == "__main__":
    _progress("loading numba")
    _compile(sys.argv[1])
