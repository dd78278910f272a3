"""A node's slice bytes (streamed or loaded) -> the runtime's NodeWeights (dllama/runtime/model.py)."""
from __future__ import annotations

import numpy as np

from dllama.formats import FloatType, ModelHeader, tensor_plan
from dllama.runtime.model import NodeWeights, assemble_node_weights
from dllama.runtime.split import NodeShare
from dllama.runtime.tensors import Matrix


def node_weights(h: ModelHeader, slices: dict[str, np.ndarray], share: NodeShare) -> NodeWeights | None:
    """None for a node that holds no slices (a coordinator root). A q40 or q80 slice is taken out of `slices`:
    its copy in the kernels' layout (Matrix.for_kernels) replaces it, so the node does not hold both; the
    vectors are copied, so nothing keeps reading a file map's pages (load_local_slices)."""
    if not share.computes:
        return None
    specs = {s.name: s for s in tensor_plan(h)}

    def matrix(name: str) -> Matrix:
        spec = specs[name]
        shape = share.slice_shape(spec)
        raw = slices[name] if spec.float_type == FloatType.F32 else slices.pop(name)
        data = raw.view("<f4").reshape(shape) if spec.float_type == FloatType.F32 else raw.reshape(shape[0], -1)
        return Matrix(data, spec.float_type, shape)

    def vector(name: str) -> np.ndarray:
        return np.array(slices[name].view("<f4").reshape(specs[name].shape))

    return assemble_node_weights(h, matrix, vector)
