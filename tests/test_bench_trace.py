"""The step-trace summary against hand-counted intervals."""

import gzip
import json

import pytest

from ivl.bench.trace import format_summary, kind_of, summarise


def _kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_busy_idle_and_overlap_are_the_hand_counted_intervals(tmp_path):
    # compute on two streams: [0, 10) and [5, 20) overlap -> busy 20; then [30, 40) -> busy 30 over a 50 us span
    # communication [15, 50): 5 us under [5, 20), 10 us under [30, 40) -> 15 overlapped
    events = [
        _kernel("sm90_xmma_gemm_bf16", 0, 10),
        _kernel("chunk_gated_delta_rule_fwd_kernel_h", 5, 15, 8),
        _kernel("triton_poi_fused_mul_0", 30, 10),
        _kernel("ncclDevKernel_AllGather_RING_LL", 15, 35, 9),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarise(path)
    assert s["kernels"] == 4
    assert s["step_ms"] == pytest.approx(50e-3)
    assert s["compute_busy_ms"] == pytest.approx(30e-3)
    assert s["compute_idle_ms"] == pytest.approx(20e-3)
    assert s["communication_ms"] == pytest.approx(35e-3)
    assert s["communication_overlapped_ms"] == pytest.approx(15e-3)
    assert s["by_kind_ms"] == pytest.approx(
        {"communication": 35e-3, "matrix products": 10e-3, "gated delta rule (fla)": 15e-3, "other": 10e-3}
    )
    assert [k["name"] for k in s["by_kernel"]][:2] == [
        "ncclDevKernel_AllGather_RING_LL",
        "chunk_gated_delta_rule_fwd_kernel_h",
    ]
    assert {k["name"]: k["ms"] for k in s["by_kernel"]} == pytest.approx(
        {
            "ncclDevKernel_AllGather_RING_LL": 35e-3,
            "chunk_gated_delta_rule_fwd_kernel_h": 15e-3,
            "sm90_xmma_gemm_bf16": 10e-3,
            "triton_poi_fused_mul_0": 10e-3,
        }
    )
    assert "triton_poi_fused_mul_0" in format_summary(s).split('kind "other"')[1]


def test_kernel_names_fall_into_kinds():
    assert kind_of("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL") == "communication"
    assert kind_of("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "matrix products"
    assert kind_of("triton_tem_fused_flex_attention_0") == "attention"
    assert kind_of("prepare_wy_repr_bwd_kernel") == "gated delta rule (fla)"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_a_trace_without_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        summarise({"traceEvents": [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}]})
