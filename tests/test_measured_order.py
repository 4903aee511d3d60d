"""The committed GPU measurements "auto" orders by: tools/measured_order.py, which writes
fast_attn/measured_order.py from fast_attn.bench records, and dispatch.measured_key / auto_order,
which read it."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fast_attn
from fast_attn import bench, bench_report, dispatch, measured_order
from fast_attn.validation import build_problem

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("measured_order_tool", ROOT / "tools" / "measured_order.py")
tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tool)


def bench_record(
    implementation, median_ms, *, mode="fwd", seqlen=1024, head_dim=64, causal=False, bias="none", window=None,
    capability="sm_90",
):  # fmt: skip
    """One fast_attn.bench record of an H100 run, as bench_report.record writes it."""
    case = bench.Case(16384 // seqlen, 2048 // head_dim, seqlen, head_dim, causal, "bf16", mode, bias, window)
    error = None if median_ms is not None else "failed"
    result = bench.Result(case, implementation, median_ms, 1.0, error)
    return bench_report.record(result, "NVIDIA H100 80GB HBM3", "cuda", capability)


def pair(cuda_ms, triton_ms, **case):
    """The CUDA and Triton records of one case, and SDPA's (which the table ignores: it is faster)."""
    return [
        bench_record("fast_attn:cuda", cuda_ms, **case),
        bench_record("fast_attn:triton", triton_ms, **case),
        bench_record("sdpa:flash", 0.001, **case),
    ]


def test_a_key_is_listed_only_where_cuda_beat_triton_at_every_length():
    records = [
        # D 64, not causal, forward: CUDA faster at both lengths -> listed.
        *pair(1.0, 2.0, seqlen=1024),
        *pair(3.0, 4.0, seqlen=4096),
        # D 64, causal, forward: faster at one length only -> not listed.
        *pair(1.0, 2.0, seqlen=1024, causal=True),
        *pair(5.0, 4.0, seqlen=4096, causal=True),
        # D 128, not causal, forward: CUDA failed at one length -> not listed.
        *pair(1.0, 2.0, seqlen=1024, head_dim=128),
        *pair(None, 2.0, seqlen=4096, head_dim=128),
        # D 128, causal: only Triton measured -> not listed.
        bench_record("fast_attn:triton", 1.0, head_dim=128, causal=True),
        # A trainable bias or a window is not what the table is for.
        *pair(1.0, 2.0, head_dim=32, bias="t5"),
        *pair(1.0, 2.0, head_dim=96, causal=True, window=256),
    ]
    assert tool.cuda_faster_keys(tool.plain_records(records, None)) == [("sm_90", "bf16", 64, False, "fwd")]


def test_forward_and_backward_compare_the_sum_of_both_medians():
    records = [
        # Forward slower, backward faster by more: fwd not listed, fwd_bwd (3.0 + 4.0 < 2.0 + 6.0) listed.
        *pair(3.0, 2.0, seqlen=2048),
        *pair(4.0, 6.0, seqlen=2048, mode="bwd"),
        # A run that measured fwd_bwd itself is read as such (D 128): CUDA slower there.
        *pair(9.0, 8.0, seqlen=2048, head_dim=128, mode="fwd_bwd"),
    ]
    assert tool.cuda_faster_keys(tool.plain_records(records, None)) == [
        ("sm_90", "bf16", 64, False, "fwd_bwd")
    ]


def test_a_record_without_a_capability_needs_one_given(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"title": "t", "records": pair(1.0, 2.0, capability=None)}))
    with pytest.raises(ValueError, match="names no capability; pass --capability"):
        tool.load_records([results], None)
    assert [r["capability"] for r in tool.load_records([results], "sm_80")] == ["sm_80", "sm_80"]


def test_the_written_module_reads_back_its_keys_and_is_ruff_formatted(tmp_path):
    keys = [("sm_80", "fp16", 128, True, "fwd"), ("sm_90", "bf16", 64, False, "fwd_bwd")]
    text = tool.module_text(keys, "python tools/measured_order.py results.json")
    namespace: dict = {}
    exec(compile(text, "measured_order.py", "exec"), namespace)
    assert namespace["CUDA_FASTER"] == frozenset(keys)
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(ROOT / "fast_attn" / "x.py"), "-"],
        input=text, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert formatted.stdout == text


def test_the_committed_table_is_what_the_tool_makes_of_its_sources(tmp_path):
    command = shlex.split(measured_order.GENERATED_BY)
    assert command[:2] == ["python", "tools/measured_order.py"]
    arguments = [str(ROOT / a) if a.endswith(".json") else a for a in command[2:]]
    tool.main([*arguments, "--out", str(tmp_path / "measured_order.py")])
    assert (tmp_path / "measured_order.py").read_text() == (
        ROOT / "fast_attn" / "measured_order.py"
    ).read_text()


def _problem(dtype=torch.bfloat16, requires_grad=False, **options):
    q, k, v = (torch.randn(2, 4, 8, 64, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    return build_problem(q, k, v, **options)


@pytest.mark.parametrize(
    "options, key",
    [
        ({}, ("sm_90", "bf16", 64, False, "fwd")),
        ({"causal": True}, ("sm_90", "bf16", 64, True, "fwd")),
        ({"causal": "bottom_right"}, ("sm_90", "bf16", 64, True, "fwd")),
        ({"requires_grad": True}, ("sm_90", "bf16", 64, False, "fwd_bwd")),
        ({"dtype": torch.float16}, ("sm_90", "fp16", 64, False, "fwd")),
        ({"dtype": torch.float32}, None),
        ({"bias": torch.randn(1, 1, 8, 8)}, None),
        ({"key_mask": torch.ones(2, 8, dtype=torch.bool)}, None),
        ({"window_size": (4, 0)}, None),
        ({"softcap": 30.0}, None),
        ({"dropout_p": 0.1}, None),
        ({"alibi_slopes": torch.rand(4)}, None),
        ({"sinks": torch.randn(4)}, None),
    ],
)
def test_measured_key_of_a_problem(options, key):
    assert dispatch.measured_key(_problem(**options), (9, 0)) == key


class _OnGpu:
    """A problem as auto_order and the choice cache see it on a GPU (no GPU on this machine): its
    query tensor answers is_cuda, the rest is the real problem's."""

    def __init__(self, problem):
        self._problem = problem
        real_q = problem.q
        self.q = SimpleNamespace(
            is_cuda=True, device=torch.device("cuda", 0), dtype=real_q.dtype, shape=real_q.shape
        )
        self.device = self.q.device

    def __getattr__(self, name):
        return getattr(self._problem, name)


def test_auto_asks_the_cuda_kernels_first_where_the_committed_table_lists_the_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "CUDA_FASTER", frozenset({("sm_90", "bf16", 64, True, "fwd")}))
    listed = _OnGpu(_problem(causal=True))
    assert dispatch.auto_order(listed) == dispatch.CUDA_FIRST_ORDER
    for other in (_problem(), _problem(causal=True, requires_grad=True), _problem(causal=True, softcap=5.0)):
        assert dispatch.auto_order(_OnGpu(other)) == dispatch.AUTO_ORDER
    # On a CPU the table is never read.
    assert dispatch.auto_order(_problem(causal=True)) == dispatch.AUTO_ORDER
    # Another capability's key does not apply.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dispatch.auto_order(listed) == dispatch.AUTO_ORDER


def test_the_choice_cache_tells_apart_what_the_table_reads():
    keys = {
        dispatch._auto_choice_key(_OnGpu(problem))
        for problem in (
            _problem(),
            _problem(causal=True),
            _problem(requires_grad=True),
            _problem(key_mask=torch.ones(2, 8, dtype=torch.bool)),
        )
    }
    assert len(keys) == 4


@pytest.mark.gpu
def test_gpu_auto_follows_the_committed_table():
    if dispatch.UNAVAILABLE["cuda"] is not None or dispatch.UNAVAILABLE["triton"] is not None:
        pytest.skip("needs both GPU backends")
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        problem = build_problem(q, k, v, causal=causal)
        listed = (
            dispatch.measured_key(problem, torch.cuda.get_device_capability()) in measured_order.CUDA_FASTER
        )
        assert dispatch.select_backend(problem).name == ("cuda" if listed else "triton")
        torch.testing.assert_close(
            fast_attn.attention(q, k, v, causal=causal).float(),
            fast_attn.attention(q, k, v, causal=causal, backend="triton").float(),
            atol=2e-2,
            rtol=2e-2,
        )
