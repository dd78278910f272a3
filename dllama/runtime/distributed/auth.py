"""The cluster key (docs/PROTOCOL.md "Authentication"): where it comes from, the proofs both sides
give in the handshake, and the per-connection keys that authenticate every frame after it.

The key never crosses the wire: the worker sends a random challenge, the root answers with its own
nonce and HMAC-SHA256(key, both nonces), the worker answers with its own HMAC over them, and both
derive one frame key per direction from the key and the two nonces. Each frame then carries a
16-byte Poly1305 tag of its header and payload under a one-time key bound to its sequence number, so a
frame cannot be forged, changed, replayed or dropped by anyone without the key.
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from dllama.errors import DllamaError

KEY_ENV = "DLLAMA_CLUSTER_KEY"
NONCE_BYTES = 32
PROOF_BYTES = 32
TAG_BYTES = 16  # a Poly1305 tag per frame
SMALL_FRAME = 256 * 1024  # frames up to this size are tagged in one call (and sent in one send)
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
    """One direction of one connection: a 16-byte Poly1305 tag over (frame header, payload) under a one-time
    key per frame, ChaCha20 of the direction's frame key at nonce = the frame's sequence number (RFC 8439).
    Frames up to SMALL_FRAME go through the ChaCha20-Poly1305 AEAD in one call (header and payload as its
    associated data, no plaintext); larger ones (weight chunks, read in pieces) are streamed through
    Poly1305 under the same one-time key. Both run from OpenSSL's vector code, on a board without SHA
    instructions (a Pi 3B+) several times faster than HMAC-SHA256, and in one call per frame here."""

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.key = key
        self.aead = ChaCha20Poly1305(key)
        self.sequence = 0

    def _nonce(self) -> bytes:
        nonce = self.sequence.to_bytes(12, "little")
        self.sequence += 1
        return nonce

    def tag(self, header: bytes, parts, length: int) -> bytes:
        """The next frame's tag, its payload `parts` (`length` bytes in all) at hand."""
        if length <= SMALL_FRAME:
            return self.aead.encrypt(self._nonce(), b"", b"".join((header, *parts)))
        running = self.start(header, length)
        for part in parts:
            running.update(part)
        return running.digest()

    def start(self, header: bytes, length: int):
        """The next frame's running tag, for a payload of `length` bytes received in pieces: update(piece)...,
        then digest()."""
        if length <= SMALL_FRAME:
            return _Collected(self, header)
        return _Streamed(self.key, self._nonce(), header)


class _Streamed:
    """A large frame's running Poly1305 tag, under the one-time key the AEAD would use at this nonce."""

    def __init__(self, key: bytes, nonce: bytes, header: bytes):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        one_time_key = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), None).encryptor().update(bytes(32))
        self.running = Poly1305(one_time_key)
        self.running.update(header)

    def update(self, piece) -> None:
        self.running.update(piece)

    def digest(self) -> bytes:
        return self.running.finalize()


class _Collected:
    """A small frame's pieces, tagged in one AEAD call once the last has come."""

    def __init__(self, mac: FrameMac, header: bytes):
        self.mac, self.parts = mac, [header]
        self.nonce = mac._nonce()

    def update(self, piece) -> None:
        self.parts.append(bytes(piece))

    def digest(self) -> bytes:
        return self.mac.aead.encrypt(self.nonce, b"", b"".join(self.parts))


def frame_macs(key: bytes, worker_nonce: bytes, root_nonce: bytes) -> tuple[FrameMac, FrameMac]:
    """(root -> worker, worker -> root) frame authenticators of one connection."""
    return (FrameMac(_mac(key, b"dllama frames root->worker", worker_nonce, root_nonce)),
            FrameMac(_mac(key, b"dllama frames worker->root", worker_nonce, root_nonce)))
