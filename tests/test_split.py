"""The tensor-parallel split on its own (dllama/runtime/split.py): the bytes each node reads, against
the reference's rule (node i of n owns rows or columns [i * d/n, (i+1) * d/n)), and the refusals.
The cluster tests (test_distributed*.py) run the same split end to end (docs/TESTING.md)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures

from dllama.formats import FloatType, ModelFile, Split, decode_tensor, read_model_header
from dllama.runtime.split import ClusterSplit, SplitError, Units, check_weights, works_text


def conformance_model(name: str, quant: str) -> ModelFile:
    return ModelFile(require_fixtures(CONFORMANCE / name) / f"expected_{quant}.m")


def node_bytes(mf: ModelFile, share, name: str) -> np.ndarray:
    """What a worker is sent of tensor `name`: its runs, concatenated (as weights.py streams them)."""
    raw = mf.raw(name).reshape(-1)
    g = share.geometry(mf.layout[name].spec)
    assert g.first_byte + (g.n_rows - 1) * g.stride + g.run_bytes <= raw.size, "a run beyond the tensor"
    runs = [raw[g.first_byte + r * g.stride:g.first_byte + r * g.stride + g.run_bytes] for r in range(g.n_rows)]
    assert sum(len(run) for run in runs) == g.nbytes
    return np.concatenate(runs)


@pytest.mark.parametrize("model, quant, n_nodes", [   # where the reference runs: every count divides evenly
    ("tiny-llama", "q40", 2), ("tiny-llama", "q80", 2), ("tiny-llama", "f32", 2), ("tiny-qwen3", "f32", 2),
])
def test_each_node_reads_the_reference_splits_rows_and_columns(model, quant, n_nodes):
    mf = conformance_model(model, quant)
    split = ClusterSplit.plan(mf.header, n_nodes)
    for name, t in mf.layout.items():
        spec = t.spec
        whole = mf.tensor(name)
        for i, share in enumerate(split.nodes):
            if not share.holds(spec):
                assert name == "embedding" and i > 0
                continue
            got = decode_tensor(node_bytes(mf, share, name), spec.float_type, share.slice_shape(spec))
            if spec.split == Split.ROWS:
                d = spec.shape[0] // n_nodes
                expected = whole[i * d:(i + 1) * d]
            elif spec.split == Split.COLUMNS:
                d = spec.shape[1] // n_nodes
                expected = whole[:, i * d:(i + 1) * d]
            else:
                expected = whole
            assert np.array_equal(got, expected), (name, i)


def test_a_node_describes_its_share_as_a_person_reads_it():
    h = conformance_model("tiny-llama", "q40").header
    root, worker = ClusterSplit.plan(h, 2).nodes
    assert root.describe() == "heads 0-1 (kv 0-0), ffn rows 0-95, vocab rows 0-191"
    assert worker.describe() == "heads 2-3 (kv 1-1), ffn rows 96-191, vocab rows 192-383"
    coordinator, only = ClusterSplit.plan(h, 2, weights=(0, 1)).nodes
    assert coordinator.describe() == "coordinates only (no layer slices)" and not coordinator.computes
    assert only.describe() == "heads 0-3 (kv 0-1), ffn rows 0-191, vocab rows 0-383"
    assert ClusterSplit.plan(h, 2, weights=(0, 1)).computing == [1]


def test_a_coordinator_holds_nothing_but_the_embedding():
    mf = conformance_model("tiny-llama", "f32")
    coordinator, worker = ClusterSplit.plan(mf.header, 2, weights=(0, 1)).nodes
    held = [name for name, t in mf.layout.items() if coordinator.holds(t.spec)]
    assert held == ["embedding"]
    assert all(worker.holds(t.spec) for name, t in mf.layout.items() if name != "embedding")


def test_a_single_kv_head_needs_no_padding_and_a_cut_group_is_padded():
    h = conformance_model("tiny-llama", "f32").header   # 4 heads, 2 kv heads: groups of 2
    nodes = ClusterSplit.plan(h, 4).nodes
    assert [s.attention_layout for s in nodes] == [(0, 1)] * 4   # one kv head each: no padding
    three = ClusterSplit.plan(h, 3).nodes                         # heads 0-1, 2, 3
    assert [(s.heads, s.kv_heads) for s in three] == [((0, 2), (0, 1)), ((2, 3), (1, 2)), ((3, 4), (1, 2))]
    one = ClusterSplit.plan(h, 1).nodes[0]
    assert one.attention_layout == (0, 4)
    wide = ClusterSplit.plan(h, 3, weights=(1, 2, 1)).nodes      # heads 0, 1-2, 3: node 1 cuts both groups
    assert wide[1].heads == (1, 3) and wide[1].attention_layout == (1, 4)


def test_quantized_units_keep_whole_blocks_of_wo_and_w2():
    h = conformance_model("tiny-llama", "q40").header           # head_dim 16: 2 heads fill a 32-value block
    assert Units.of(h) == Units(head=2, ffn=32, n_heads=2, n_ffn=6, n_vocab=384)
    assert Units.of(dataclasses.replace(h, weights_float_type=FloatType.F32)) == Units(1, 1, 4, 192, 384)
    assert Units.of(dataclasses.replace(h, head_dim_value=48, n_heads=2, n_kv_heads=1)).head == 2
    assert works_text(h) == "1 to 2 nodes" and works_text(h, coordinator=True) == "2 to 3 nodes"
    lone = dataclasses.replace(h, vocab_size=1)
    assert works_text(lone) == "1 node" and works_text(lone, coordinator=True) == "2 nodes"


def test_a_column_slice_off_the_block_boundaries_is_refused():
    mf = conformance_model("tiny-llama", "q40")
    share = dataclasses.replace(ClusterSplit.plan(mf.header, 2).nodes[1], heads=(1, 4))   # columns 16..63
    with pytest.raises(SplitError, match=r"layers.0.wo columns \[16, 64\) do not fall on 32-value block"):
        share.geometry(mf.layout["layers.0.wo"].spec)


@pytest.mark.parametrize("n_nodes, weights, message", [
    (0, (), "0 nodes: a cluster has at least the root"),
    (2, (1.0,), "1 weights for 2 nodes: give one weight per node"),
    (2, (1.0, 0.0), r"^weights 1,0: every worker needs a positive weight \(only the root may compute nothing, with "
                    r"--root-compute none\)$"),
    (2, (-1.0, 1.0), "every worker needs a positive weight"),
    (2, (float("nan"), 1.0), "every worker needs a positive weight"),
    (2, (float("inf"), 1.0), "every worker needs a positive weight"),
    (1, (0.0,), "^a root that computes nothing needs at least one worker: add --workers$"),
])
def test_impossible_weights_are_refused_with_the_fix(n_nodes, weights, message):
    h = conformance_model("tiny-llama", "f32").header
    with pytest.raises(SplitError, match=message):
        check_weights(h, n_nodes, weights)


def test_a_split_keeps_the_weights_it_was_planned_with():
    h = conformance_model("tiny-llama", "f32").header
    assert (ClusterSplit.plan(h, 3).n_nodes, ClusterSplit.plan(h, 3).weights) == (3, (1.0, 1.0, 1.0))
    assert ClusterSplit.plan(h, 2, weights=[3, 1]).weights == (3.0, 1.0)   # sent to the workers, printed by plan


def test_one_kv_head_for_every_query_head_splits():
    h = dataclasses.replace(conformance_model("tiny-llama", "f32").header, n_kv_heads=1)   # multi-query attention
    nodes = ClusterSplit.plan(h, 2).nodes
    assert [(s.heads, s.kv_heads, s.attention_layout) for s in nodes] == [((0, 2), (0, 1), (0, 2)),
                                                                           ((2, 4), (0, 1), (0, 2))]


def test_heads_that_are_not_a_multiple_of_the_kv_heads_are_refused():
    h = dataclasses.replace(conformance_model("tiny-llama", "f32").header, n_kv_heads=3)
    with pytest.raises(SplitError, match="the model's 4 heads are not a multiple of its 3 kv heads"):
        ClusterSplit.plan(h, 1)


def test_too_many_nodes_name_what_limits_them():
    h = conformance_model("tiny-llama", "f32").header   # f32: 4 heads, 192 FFN rows, 384 vocabulary rows
    with pytest.raises(SplitError, match=r"5 nodes \(5 computing\) is more than this model's 4 heads allow: "
                                         "it runs on 1 to 4 nodes$"):
        ClusterSplit.plan(h, 5)
    few_rows = dataclasses.replace(h, hidden_dim=3)
    with pytest.raises(SplitError, match="model's 3 FFN rows allow: it runs on 1 to 3 nodes"):
        ClusterSplit.plan(few_rows, 4)
    q = dataclasses.replace(h, weights_float_type=FloatType.Q40, n_heads=8, n_kv_heads=8, head_dim_value=32)
    with pytest.raises(SplitError, match="192 FFN rows in blocks of 32 allow"):
        ClusterSplit.plan(q, 7)
    small_vocab = dataclasses.replace(h, vocab_size=2)
    with pytest.raises(SplitError, match="model's 2 vocabulary rows allow: it runs on 2 to 3 nodes with a "
                                         "coordinator root"):
        ClusterSplit.plan(small_vocab, 4, weights=(0, 1, 1, 1))


def test_a_heavier_node_gets_more_and_every_node_at_least_one_unit():
    h = read_model_header(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m")
    nodes = ClusterSplit.plan(h, 3, weights=(100, 1, 1)).nodes
    assert [s.n_heads for s in nodes] == [2, 1, 1]   # largest remainder would give 4, 0, 0
    assert [s.ffn[1] - s.ffn[0] for s in nodes] == [188, 2, 2]
