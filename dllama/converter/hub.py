"""SOURCE arguments: a local checkpoint folder, or a Hugging Face hub repo id fetched with huggingface_hub.

Only the files a conversion reads are downloaded; huggingface_hub's cache and offline mode
(HF_HUB_OFFLINE=1, HF_HOME) are honoured as its own CLI honours them.
"""
from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from dllama.errors import DllamaError

# config/index/tokenizer json, sentencepiece model, transformers-5 chat template, then the weights
METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.jinja"]
# only the top level is read; hub patterns match across "/", so skip subfolders (onnx/, original/...),
# and Mistral's consolidated*.safetensors (its own tensor names, a second copy of the weights)
IGNORE_PATTERNS = ["*/*", "consolidated*.safetensors"]
INDEX_FILE = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SourceError(DllamaError, ValueError):
    """SOURCE is neither a usable local folder nor a reachable hub repository."""


def resolve_source(source: str, revision: str | None = None) -> Path:
    """The local folder holding SOURCE's files, downloading them from the hub if needed."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{source} is a file; SOURCE must be a checkpoint folder or a hub repo id like "
                          "TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    if not looks_like_repo_id(source):
        raise SourceError(f"{source} does not exist; SOURCE must be a checkpoint folder or a hub repo id like org/name")
    return _download(source, revision)


def looks_like_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and bool(_REPO_ID.match(source))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import errors, snapshot_download

    offline = _offline_mode()

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=IGNORE_PATTERNS, local_files_only=offline))

    try:
        folder = fetch(METADATA_PATTERNS)
        folder = fetch(_weight_patterns(folder) + METADATA_PATTERNS)
    except errors.LocalEntryNotFoundError:
        if offline:
            raise SourceError(f"{repo_id} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE); "
                              f"download it once with network access, or pass a local folder") from None
        raise SourceError(f"cannot reach the Hugging Face hub to download {repo_id} and it is not cached; "
                          f"check the network, or pass a local folder") from None
    except errors.GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its licence on huggingface.co and log in with "
                          "`hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise SourceError(f"{repo_id} is not a folder here and not a repository on the Hugging Face hub "
                          f"(or it is private: log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} does not exist in {repo_id}") from None
    except errors.HfHubHTTPError as e:
        raise SourceError(f"downloading {repo_id} failed: {str(e).splitlines()[0]}") from None
    return folder


def _weight_patterns(folder: Path) -> list[str]:
    """The shards the index names (exactly those), or every top-level safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SourceError(f"{INDEX_FILE} of this repository is not a valid safetensors index") from None
        return [glob.escape(shard) for shard in shards]
    return ["*.safetensors"]


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
