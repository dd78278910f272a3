"""Moving a node's weight slices (FORMAT.md §3) from the `.m` file to where they are used.

The root streams each worker exactly its slice bytes with `pread` into one reused chunk buffer,
so it never maps, let alone holds, another node's slice; the worker receives them into its own
buffers (`SliceReceiver`). A worker with its own copy of the file loads them with
`load_local_slices` instead. Row slices are contiguous in the file and stay memory-mapped;
column slices (wo, w2) interleave with other nodes' columns inside every row and page, so they
are copied out row block by row block.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from dllama.formats import ModelHeader, Split, tensor_layout
from dllama.runtime.distributed.node_memory import shard_tensors
from dllama.runtime.distributed.protocol import WEIGHT_CHUNK, WEIGHTS_HEAD, Channel, Frame, ProtocolError
from dllama.runtime.split import NodeShare, SliceGeometry


def _slice_chunks(fd: int, offset: int, geo: SliceGeometry, chunk: int) -> Iterator[tuple[int, memoryview]]:
    """(byte offset inside the slice, bytes) pieces of a slice, at most `chunk` bytes each."""
    if geo.n_rows == 1 or geo.run_bytes == geo.stride:
        start = offset + geo.first_byte
        buf = bytearray(min(chunk, geo.nbytes))
        done = 0
        while done < geo.nbytes:
            n = min(len(buf), geo.nbytes - done)
            view = memoryview(buf)[:n]
            _pread_into(fd, view, start + done)
            yield done, view
            done += n
        return
    rows_per_chunk = chunk_rows(geo, chunk)
    whole = np.empty(rows_per_chunk * geo.stride, dtype=np.uint8)
    part = np.empty(rows_per_chunk * geo.run_bytes, dtype=np.uint8)
    for r0 in range(0, geo.n_rows, rows_per_chunk):
        n = min(rows_per_chunk, geo.n_rows - r0)
        _pread_into(fd, memoryview(whole)[:n * geo.stride], offset + r0 * geo.stride)
        cols = whole[:n * geo.stride].reshape(n, geo.stride)[:, geo.first_byte:geo.first_byte + geo.run_bytes]
        out = part[:n * geo.run_bytes].reshape(n, geo.run_bytes)
        out[...] = cols
        yield r0 * geo.run_bytes, memoryview(part)[:n * geo.run_bytes]


def chunk_rows(geo: SliceGeometry, chunk: int = WEIGHT_CHUNK) -> int:
    """Rows of a column slice read per pread: as many whole rows as fit `chunk`, at most all of them."""
    return min(geo.n_rows, max(1, chunk // geo.stride))


def stream_buffer_bytes(geo: SliceGeometry, chunk: int = WEIGHT_CHUNK) -> int:
    """What `_slice_chunks` allocates to move one slice: one run buffer, or a row block and its columns."""
    if geo.n_rows == 1 or geo.run_bytes == geo.stride:
        return min(chunk, geo.nbytes)
    return chunk_rows(geo, chunk) * (geo.stride + geo.run_bytes)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise ProtocolError("model file ended while reading a slice: it changed or is truncated")
        got += n


def _drop_cache(fd: int, offset: int, length: int) -> None:
    # a board's RAM is mostly the model: let the kernel forget pages only a worker needs
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def stream_slices(chan: Channel, model_path: str | os.PathLike, header: ModelHeader, share: NodeShare,
                  chunk: int = WEIGHT_CHUNK) -> int:
    """Send node `share.node` every slice it holds (WEIGHTS frames, then WEIGHTS_DONE). Returns bytes sent."""
    sent = 0
    for index, at, data in read_slice_chunks(model_path, header, share, chunk):
        sent += chan.send_frame(Frame.WEIGHTS, WEIGHTS_HEAD.pack(index, at), data)
    return sent + chan.send_frame(Frame.WEIGHTS_DONE)


def read_slice_chunks(model_path: str | os.PathLike, header: ModelHeader, share: NodeShare,
                      chunk: int = WEIGHT_CHUNK) -> Iterator[tuple[int, int, memoryview]]:
    """(tensor index, offset in its slice, bytes) for every slice node `share.node` holds, in
    shard_tensors order, read with pread into one reused buffer (use each chunk before the next)."""
    offsets = [t.offset for t in tensor_layout(header)]
    fd = os.open(model_path, os.O_RDONLY)
    try:
        for index, spec in shard_tensors(header, share):
            for at, data in _slice_chunks(fd, offsets[index], share.geometry(spec), chunk):
                yield index, at, data
            if spec.split != Split.WHOLE:
                _drop_cache(fd, offsets[index], spec.nbytes)
    finally:
        os.close(fd)


class SliceReceiver:
    """Worker side of `stream_slices`: one buffer per tensor, every chunk bounds-checked."""

    def __init__(self, header: ModelHeader, share: NodeShare):
        self.specs = dict(shard_tensors(header, share))
        self.buffers = {i: np.empty(share.geometry(s).nbytes, dtype=np.uint8) for i, s in self.specs.items()}
        self.received = {i: 0 for i in self.specs}

    def receive(self, chan: Channel, length: int) -> None:
        """The rest of a WEIGHTS frame of `length` bytes, read straight into its slice buffer (a chunk
        that fails its MAC ends the session, so its bytes are never used)."""
        if length < WEIGHTS_HEAD.size:
            raise ProtocolError("WEIGHTS frame too short")
        index, at = WEIGHTS_HEAD.unpack(chan.recv_exact(WEIGHTS_HEAD.size))
        n = length - WEIGHTS_HEAD.size
        buf = self.buffers.get(index)
        if buf is None:
            raise ProtocolError(f"WEIGHTS for tensor {index}, which this worker does not hold")
        if at + n > len(buf):
            raise ProtocolError(f"WEIGHTS chunk [{at}, {at + n}) overruns tensor {index} slice of {len(buf)} bytes")
        if at != self.received[index]:  # in order, so that complete means every byte arrived once
            raise ProtocolError(f"WEIGHTS chunk at {at} of tensor {index}, expected {self.received[index]}")
        chan.recv_exact(n, into=memoryview(buf)[at:at + n])
        chan.end_frame()
        self.received[index] += n

    def slices(self) -> dict[str, np.ndarray]:
        missing = [self.specs[i].name for i, n in self.received.items() if n != len(self.buffers[i])]
        if missing:
            raise ProtocolError(f"root finished streaming but {len(missing)} slices are incomplete ({missing[0]}, ...)")
        return {self.specs[i].name: buf for i, buf in self.buffers.items()}


def load_local_slices(model_path: str | os.PathLike, header: ModelHeader, share: NodeShare) -> dict[str, np.ndarray]:
    """A node's slice bytes (all but the embedding) from its own copy of the file: views into the map
    for whole tensors and row slices, copies for column slices (whose file pages are shared with
    other nodes' columns)."""
    out: dict[str, np.ndarray] = {}
    names = {s.name for _, s in shard_tensors(header, share)}
    if not names:
        return out
    fd = os.open(Path(model_path), os.O_RDONLY)
    try:
        file_map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        # A page fault also maps the neighbouring pages already cached (fault-around, 64 kB): at
        # every slice edge other nodes' rows, ~8 MiB on the TinyLlama-shaped root. MADV_RANDOM
        # turns that (and fault readahead) off; MADV_WILLNEED reads the node's own rows ahead instead.
        file_map.madvise(mmap.MADV_RANDOM)
        data = np.frombuffer(file_map, dtype=np.uint8)
        for t in tensor_layout(header):
            spec = t.spec
            if spec.name not in names:
                continue
            geo = share.geometry(spec)
            if geo.n_rows == 1:
                start = t.offset + geo.first_byte
                out[spec.name] = data[start:start + geo.nbytes]
                page = start - start % mmap.PAGESIZE
                file_map.madvise(mmap.MADV_WILLNEED, page, start + geo.nbytes - page)
            else:
                buf = np.empty(geo.nbytes, dtype=np.uint8)
                for at, piece in _slice_chunks(fd, t.offset, geo, WEIGHT_CHUNK):
                    buf[at:at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                out[spec.name] = buf
    finally:
        os.close(fd)
    return out

