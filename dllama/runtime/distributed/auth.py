"""The cluster key (docs/PROTOCOL.md "Authentication"): where it comes from, the proofs both sides
give in the handshake, and the per-connection keys that authenticate every frame after it.

The key never crosses the wire: the worker sends a random challenge, the root answers with its own
nonce and HMAC-SHA256(key, both nonces), the worker answers with its own HMAC over them, and both
derive one frame key per direction from the key and the two nonces. Each frame then carries a
16-byte HMAC of its sequence number, header and payload, so a frame cannot be forged, changed,
replayed or dropped by anyone without the key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from dllama.errors import DllamaError

KEY_ENV = "DLLAMA_CLUSTER_KEY"
NONCE_BYTES = 32
PROOF_BYTES = 32
TAG_BYTES = 16  # truncated HMAC-SHA256 per frame (RFC 2104 section 5)
MIN_KEY_BYTES = 16
NO_KEY_WARNING = ("this worker has no cluster key: anyone who reaches its port can use it; give it one with "
                  f"--cluster-key-file or {KEY_ENV} (the same on the root)")


class AuthError(DllamaError, RuntimeError):
    """A cluster key that cannot be read, or a peer that did not prove it holds the key."""


def load_cluster_key(key_file: str | os.PathLike | None = None) -> bytes | None:
    """The key from `key_file`, else from $DLLAMA_CLUSTER_KEY, else None (no authentication).
    Never from the command line, where `ps` shows it to every user of the machine."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise AuthError(f"cannot read the cluster key file {key_file}: {e.strerror or e}") from None
        where = f"the cluster key file {key_file}"
    elif os.environ.get(KEY_ENV):
        key, where = os.environ[KEY_ENV].strip().encode(), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(f"{where} holds {len(key)} bytes: use at least {MIN_KEY_BYTES} random bytes, e.g. "
                        "`openssl rand -hex 32 > cluster.key`, the same file on the root and every worker")
    return key


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, label + b"".join(parts), "sha256")


def root_proof(key: bytes, worker_nonce: bytes, root_nonce: bytes) -> bytes:
    return _mac(key, b"dllama root proof", worker_nonce, root_nonce)


def worker_proof(key: bytes, worker_nonce: bytes, root_nonce: bytes) -> bytes:
    return _mac(key, b"dllama worker proof", worker_nonce, root_nonce)


def proves(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)


class FrameMac:
    """One direction of one connection: HMAC-SHA256 over (sequence number, frame header, payload)."""

    def __init__(self, key: bytes):
        base = hmac.new(key, digestmod=hashlib.sha256)
        # copied per frame, so the key schedule is done once; OpenSSL's own HMAC object where the
        # hmac module wraps one (its Python wrapper's copy() doubled the cost of a 2 kB frame's tag)
        self.base = getattr(base, "_hmac", None) or base
        self.sequence = 0

    def start(self, header: bytes):
        h = self.base.copy()
        h.update(self.sequence.to_bytes(8, "little") + header)
        self.sequence += 1
        return h


def frame_macs(key: bytes, worker_nonce: bytes, root_nonce: bytes) -> tuple[FrameMac, FrameMac]:
    """(root -> worker, worker -> root) frame authenticators of one connection."""
    return (FrameMac(_mac(key, b"dllama frames root->worker", worker_nonce, root_nonce)),
            FrameMac(_mac(key, b"dllama frames worker->root", worker_nonce, root_nonce)))
