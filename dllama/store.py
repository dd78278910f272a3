"""The local model store: `dllama-run MODEL` for a hub id, a GGUF file, a checkpoint folder, a `.m` or a stored name.

    files = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")   # converted and validated once, then from the store
    files.model, files.tokenizer                               # the .m and .t to run
    entries(), remove("smollm2-135m-instruct")                 # dllama-run list / rm

The store lives in $DLLAMA_HOME, else $XDG_CACHE_HOME/dllama, else ~/.cache/dllama, under models/:
one folder per entry, models/<name>/<quant>/, holding the .m, the .t and entry.json (where it came
from, the source's fingerprint, the structural validation's verdict). An entry is converted and
validated in a staging folder and renamed into place whole, so a killed conversion never leaves a
half entry; conversions and removals hold models/.lock, so concurrent runs wait instead of
writing the same entry twice. Lookups take no lock: an entry folder is complete once it exists.

A source already stored (same hub id, or the same local file or folder, unchanged) is never
converted again; hub ids are not checked against the hub once stored (`dllama-run rm` then run
again to refresh). Heavy imports (the converter's numba, huggingface_hub, the validator) happen
only when something is converted.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dllama.errors import DllamaError
from dllama.formats import MODEL_MAGIC, OLD_MODEL_MAGICS
from dllama.formats.atomic import current_umask

ENTRY_FILE = "entry.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
GGUF_MAGIC = b"GGUF"
QUANTS = ("q40", "q80", "f32")  # what the runtime runs (f16 files it refuses)
VALIDATION_CORPUS = 64  # tokenizer fidelity on this many texts: a structural check, not a survey

Log = Callable[[str], None]


class StoreError(DllamaError, ValueError):
    """MODEL names nothing usable, or the store cannot hold it; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelFiles:
    """What to run: a .m and its .t (and the store entry they came from, if any)."""

    model: Path
    tokenizer: Path | None
    entry: "Entry | None" = None

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else self.model.stem


@dataclass(frozen=True)
class Entry:
    folder: Path
    info: dict

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def quant(self) -> str:
        return self.info["quant"]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.quant}"

    @property
    def files(self) -> ModelFiles:
        return ModelFiles(self.folder / self.info["model"], self.folder / self.info["tokenizer"], self)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.files.model, self.files.tokenizer))


def home() -> Path:
    """$DLLAMA_HOME, else $XDG_CACHE_HOME/dllama, else ~/.cache/dllama."""
    if os.environ.get("DLLAMA_HOME"):
        return Path(os.environ["DLLAMA_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dllama"


def models_dir() -> Path:
    return home() / "models"


# --------------------------------------------------------------------------------------------
# What MODEL is

def resolve(ref: str, quant: str | None = None, tokenizer: Path | None = None, log: Log = lambda m: None,
            convert: bool = True, with_tokenizer: bool = True) -> ModelFiles:
    """MODEL -> the .m and .t to run, converting a source into the store first if it is not there yet.

    convert=False (--model): only converted files or stored names; a source is named as such.
    with_tokenizer=False: a .m alone is enough (its .t, if any, is not looked for)."""
    path = Path(ref).expanduser()
    if path.is_file():
        kind = file_kind(path)
        if kind == "m":
            return ModelFiles(path, tokenizer or (tokenizer_beside(path) if with_tokenizer else None))
        if kind == "gguf":
            return _from_source(path, quant, log, convert, hint=f"this is a GGUF file: run `dllama-run {ref}` or "
                                                                 f"convert it with dllama-convert gguf")
        raise StoreError(f"{ref} is not a distributed-llama .m model nor a GGUF file: pass a .m, a GGUF file, a "
                         "checkpoint folder, a hub id or a stored model's name (dllama-run list)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StoreError(f"{ref} is a folder without config.json: pass a Hugging Face checkpoint folder, a .m or "
                             "GGUF file, a hub id or a stored model's name (dllama-run list)")
        return _from_source(path, quant, log, convert, hint=f"this is a checkpoint folder: run `dllama-run {ref}` or "
                                                             "convert it with dllama-convert hf")
    stored = find(ref, quant)
    if stored is not None:
        return stored.files
    from dllama.converter.hub import looks_like_repo_id

    if looks_like_repo_id(ref):
        return _from_source(ref, quant, log, convert, hint=f"this is a hub id: run `dllama-run {ref}` or convert it "
                                                            "with dllama-convert hf")
    raise StoreError(f"{ref} does not exist, and is not a stored model (dllama-run list) or a hub id (org/name)")


def file_kind(path: Path) -> str | None:
    """"m" (a distributed-llama model), "gguf", or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    if len(head) == 4 and int.from_bytes(head, "little", signed=True) in {MODEL_MAGIC, *OLD_MODEL_MAGICS}:
        return "m"
    return "m" if path.suffix == ".m" else None  # a broken .m: the runtime names what is wrong with it


def tokenizer_beside(model: Path) -> Path:
    """The .t in the .m's folder: the only one there, or the one named like the model (M.t, or the
    dllama_tokenizer_{name}.t dllama-convert writes beside dllama_model_{name}_{quant}.m)."""
    candidates = sorted(model.parent.glob("*.t"))
    if len(candidates) == 1:
        return candidates[0]
    name = model.stem.removeprefix("dllama_model_").rpartition("_")[0]
    for wanted in (model.with_suffix(".t"), model.parent / f"dllama_tokenizer_{name}.t"):
        if wanted in candidates:
            return wanted
    found = f"{len(candidates)} .t files" if candidates else "no .t file"
    raise StoreError(f"found {found} beside {model}: pass the model's tokenizer with --tokenizer")


# --------------------------------------------------------------------------------------------
# Entries

def entries() -> list[Entry]:
    out = []
    for info_file in sorted(models_dir().glob(f"*/*/{ENTRY_FILE}")):
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not an entry of ours, or damaged by hand
        out.append(Entry(info_file.parent, info))
    return out


def names() -> list[str]:
    """Every name MODEL may use for a stored entry: NAME:QUANT, and NAME alone (shell completion)."""
    found = entries()
    return sorted({e.ref for e in found} | {e.name for e in found})


def find(ref: str, quant: str | None = None) -> Entry | None:
    """The stored entry NAME or NAME:QUANT names (None if there is none; ambiguous names are refused)."""
    name, _, tag = ref.partition(":")
    quant = tag or quant
    matches = [e for e in entries() if e.name == name and (quant is None or e.quant == quant)]
    if len(matches) > 1:
        raise StoreError(f"{name} is stored as {', '.join(e.quant for e in matches)}: pass --quant or name one, "
                         f"e.g. {matches[0].ref}")
    return matches[0] if matches else None


def remove(ref: str) -> list[Entry]:
    """Remove NAME (every quant) or NAME:QUANT; returns what was removed."""
    name, _, tag = ref.partition(":")
    with locked():
        gone = [e for e in entries() if e.name == name and (not tag or e.quant == tag)]
        if not gone:
            raise StoreError(f"no stored model is named {ref} (dllama-run list shows them)")
        for e in gone:
            trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=models_dir()))
            e.folder.rename(trash / "removed")  # gone whole at once; a killed rm leaves staging, not half an entry
            shutil.rmtree(trash, ignore_errors=True)
            try:
                e.folder.parent.rmdir()  # the name's folder, once its last quant is gone
            except OSError:
                pass
    return gone


@contextmanager
def locked(log: Log = lambda message: None) -> Iterator[None]:
    """models/.lock held: one conversion or removal at a time. Staging folders left while nobody holds it
    belong to a killed conversion, and are removed."""
    folder = models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise StoreError(f"cannot use the model store {folder} ({e.strerror}): set DLLAMA_HOME to a writable "
                         "folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another dllama-run to finish its conversion ({folder / LOCK_FILE} is locked) ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in folder.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Converting a source into the store

def _source_key(source: str | Path) -> tuple[str, dict]:
    """How entry.json names a source, and what must not have changed for its entry to stand."""
    if isinstance(source, str):  # a hub id
        return source, {}
    path = source.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return str(path), {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def stored_source(source: str | Path, quant: str | None) -> Entry | None:
    key, fingerprint = _source_key(source)
    matches = [e for e in entries() if e.info.get("source") == key and e.info.get("fingerprint") == fingerprint
               and (quant is None or e.quant == quant)]
    if quant is None and len(matches) > 1:
        preferred = default_quant(_checkpoint_folder(source))
        matches = [e for e in matches if e.quant == preferred] or matches
    return matches[0] if matches else None


def _from_source(source: str | Path, quant: str | None, log: Log, convert: bool, hint: str) -> ModelFiles:
    if quant is not None and quant not in QUANTS:
        raise StoreError(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")
    entry = stored_source(source, quant)
    if entry is not None:
        return entry.files
    if not convert:
        raise StoreError(hint)
    with locked(log):
        entry = stored_source(source, quant)  # another run may have stored it while this one waited
        if entry is None:
            entry = _convert_into_store(source, quant, log)
    return entry.files


def _checkpoint_folder(source: str | Path) -> Path:
    if isinstance(source, Path):
        return source
    from dllama.converter.hub import resolve_source

    return resolve_source(source)


def default_quant(source: Path) -> str:
    """The blocks a GGUF already holds (all Q4_0 or all Q8_0 matrices: copied, no second rounding); else
    q80 for a small model, q40 for a big one (the validator's advice: logits.SMALL_MODEL_PARAMS); f32 when
    rows are not whole blocks."""
    from dllama.checkpoint import header_from_config
    from dllama.converter.convert import STORED_AS, open_checkpoint
    from dllama.formats import BLOCK_SIZE, FloatType, tensor_plan
    from dllama.validate.logits import SMALL_MODEL_PARAMS

    checkpoint = open_checkpoint(source)
    plan = tensor_plan(header_from_config(checkpoint.config, FloatType.Q40))
    matrices = [spec for spec in plan if spec.float_type == FloatType.Q40]
    if any(spec.shape[-1] % BLOCK_SIZE for spec in matrices):
        return "f32"
    stored = {STORED_AS.get(checkpoint.entries[s.hf_name].dtype) for s in matrices if s.hf_name in checkpoint.entries}
    if stored in ({FloatType.Q40}, {FloatType.Q80}):
        return stored.pop().name.lower()
    return "q80" if sum(math.prod(spec.shape) for spec in plan) < SMALL_MODEL_PARAMS else "q40"


def _convert_into_store(source: str | Path, quant: str | None, log: Log) -> Entry:
    from dllama.converter.convert import default_name, prepare_conversion, write_outputs

    folder = _checkpoint_folder(source)
    name = default_name(str(source.resolve()) if isinstance(source, Path) else source)
    key, fingerprint = _source_key(source)
    outdated = [e for e in entries() if e.info.get("source") == key and quant in (None, e.quant)]  # it changed
    quant = quant or (outdated[0].quant if outdated else default_quant(folder))  # an outdated entry keeps its quant
    outdated = [e for e in outdated if e.quant == quant]
    target = outdated[0].folder if outdated else _free_folder(name, quant)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=models_dir()))
    try:
        log(f"converting {source} to {quant} into the model store {models_dir()} (once) ...")
        job = prepare_conversion(folder, _float_type(quant), name, staging)
        for message in job.notes:
            log(f"note: {message}")
        started = time.perf_counter()
        write_outputs(job)
        log(f"converted in {time.perf_counter() - started:.1f} s; checking its structure (dllama-validate) ...")
        verdict = _validate(job.model_path, job.tokenizer_path)
        info = {"name": target.parent.name, "quant": quant, "source": key, "fingerprint": fingerprint,
                "model": job.model_path.name, "tokenizer": job.tokenizer_path.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "validation": verdict}
        (staging / ENTRY_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    entry = Entry(target, info)
    log(f"{'replaced' if outdated else 'stored as'} {entry.ref} (dllama-run list)")
    return entry


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished entry to its folder; an outdated entry there is renamed away first, then removed
    (an entry folder is always whole: old, or new)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=models_dir()))
        target.rename(old / "outdated")
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def _free_folder(name: str, quant: str) -> Path:
    """models/<name>/<quant>, or <name>-2, -3 ... when another source already has that name."""
    taken = {e.ref for e in entries()}
    candidate, n = name, 1
    while f"{candidate}:{quant}" in taken or (models_dir() / candidate / quant).exists():
        n += 1
        candidate = f"{name}-{n}"
    return models_dir() / candidate / quant


def _float_type(quant: str):
    from dllama.formats import FloatType

    return FloatType.parse(quant)


def _validate(model: Path, tokenizer: Path) -> dict:
    """The structural checks (no original at hand); a failure refuses the entry with the check's reason."""
    from dllama.validate.report import Status
    from dllama.validate.validator import Options, validate

    report = validate(model, tokenizer, options=Options(corpus_limit=VALIDATION_CORPUS))
    failures = [c for c in report.checks if c.status == Status.FAIL]
    if failures:
        first = failures[0]
        raise StoreError(f"the converted model fails {first.name}: {first.reason or first.measured}; it was not "
                         "stored")
    return {"verdict": report.verdict, "counts": report.to_json()["counts"]}
