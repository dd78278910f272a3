"""A node's slice bytes (streamed or loaded) -> the runtime's NodeWeights (dllama/runtime/model.py)."""
from __future__ import annotations

import numpy as np

from dllama.formats import FloatType, ModelHeader, tensor_plan
from dllama.runtime.distributed.plan import slice_shape
from dllama.runtime.model import Expert, LayerWeights, NodeWeights
from dllama.runtime.tensors import Matrix


def node_weights(h: ModelHeader, slices: dict[str, np.ndarray], n_nodes: int,
                 embedding: np.ndarray | None = None) -> NodeWeights:
    specs = {s.name: s for s in tensor_plan(h)}

    def matrix(name: str) -> Matrix:
        spec = specs[name]
        shape = slice_shape(spec, n_nodes)
        raw = slices[name]
        data = raw.view("<f4").reshape(shape) if spec.float_type == FloatType.F32 else raw.reshape(shape[0], -1)
        return Matrix(data, spec.float_type, shape)

    def vector(name: str) -> np.ndarray:
        return slices[name].view("<f4").reshape(specs[name].shape)

    layers = []
    for l in range(h.n_layers):
        p = f"layers.{l}."
        lw = LayerWeights(q=matrix(p + "q"), k=matrix(p + "k"), v=matrix(p + "v"), wo=matrix(p + "wo"),
                          attn_norm=vector(p + "attn_norm"), ffn_norm=vector(p + "ffn_norm"))
        if h.is_moe:
            lw.gate = vector(p + "gate")
            lw.experts = [Expert(matrix(f"{p}experts.{e}.w1"), matrix(f"{p}experts.{e}.w2"), matrix(f"{p}experts.{e}.w3"))
                          for e in range(h.n_experts)]
        else:
            lw.w1, lw.w2, lw.w3 = matrix(p + "w1"), matrix(p + "w2"), matrix(p + "w3")
        if h.has_qk_norm:
            lw.q_norm, lw.k_norm = vector(p + "q_norm"), vector(p + "k_norm")
        layers.append(lw)
    return NodeWeights(layers=layers, norm=vector("norm"), lm_head=matrix("lm_head"), embedding=embedding)
