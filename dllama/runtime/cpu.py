"""What this CPU can execute, as the kernels' build needs it: the ARM dot-product extensions.

LLVM's own view of the host (llvmlite's get_host_cpu_name / get_host_cpu_features) comes from
/proc/cpuinfo; under emulation, and on a CPU newer than the LLVM build, it is "generic" with no
features, and kernels compiled for that leave a Pi 5's dot products unused. The kernel's answer
is what counts: on Linux aarch64, the HWCAP bits of the process's auxiliary vector, which also
holds under qemu-user (QEMU_CPU=cortex-a76 reports asimddp). No numba or LLVM here: runtime
processes import this.
"""
from __future__ import annotations

import os
import platform
import struct

# the kernels' int8 dot products (kernels.KERNEL_PATH): generic LLVM vectors, x86 AVX512-VNNI, aarch64 sdot
KERNEL_PATHS = ("portable", "vnni512", "sdot")
AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_ASIMDDP = 1 << 20  # sdot/udot: 4 int8 products summed into each int32 lane (ARMv8.2 dotprod)
HWCAP2_I8MM = 1 << 13    # smmla/usdot (ARMv8.6 i8mm)


def is_aarch64() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def hwcaps(auxv: str = "/proc/self/auxv") -> tuple[int, int]:
    """(AT_HWCAP, AT_HWCAP2) of this process; (0, 0) where there is no auxiliary vector."""
    try:
        data = open(auxv, "rb").read()
    except OSError:
        return 0, 0
    words = struct.unpack(f"{len(data) // 8}Q", data[: len(data) // 8 * 8])
    entries = dict(zip(words[::2], words[1::2]))
    return entries.get(AT_HWCAP, 0), entries.get(AT_HWCAP2, 0)


def arm_target_features(auxv: str = "/proc/self/auxv") -> str:
    """LLVM target features for this aarch64 CPU's kernels, from HWCAP ("" elsewhere).

    DLLAMA_NO_DOTPROD=1 leaves the dot products out (tests compare both paths on one board)."""
    if not is_aarch64():
        return ""
    hwcap, hwcap2 = hwcaps(auxv)
    features = ["+neon"]
    if hwcap & HWCAP_ASIMDDP and not os.environ.get("DLLAMA_NO_DOTPROD"):
        features.append("+dotprod")
        if hwcap2 & HWCAP2_I8MM:
            features.append("+i8mm")
    return ",".join(features)
