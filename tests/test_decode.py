"""Decoding against a KV cache (fast_attn.decode_attention, flash_attn_with_kvcache): the reference
against the attention of the cache's logical view, every backend that decodes against the
reference (out, lse, and the caches to the bit), rotary embeddings, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fast_attn
from fast_attn import dispatch
from fast_attn.flash_attn_interface import flash_attn_with_kvcache
from fast_attn.ops import cpp_ops
from fast_attn.reference import reference_attention, reference_decode_attention
from fast_attn.testing import (
    DECODE_TENSORS,
    DecodeCase,
    backend_device,
    check_decode_against_reference,
    decode_runner,
)


@pytest.mark.parametrize("page_size", [None, 8, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_attention_over_the_logical_cache(page_size, causal):
    # Each sequence's keys live in a logical (B, L, Hkv, D) view, scattered into the cache by hand;
    # decoding must equal attention over the logical view's first cache_seqlens + S_new keys.
    lengths, new_rows, heads_q, heads_kv, head_dim = (6, 0, 13), 2, 4, 2, 8
    batch, longest = len(lengths), max(lengths) + new_rows
    logical_k = torch.randn(batch, longest, heads_kv, head_dim, dtype=torch.float64)
    logical_v = torch.randn(batch, longest, heads_kv, head_dim, dtype=torch.float64)
    block_table = None
    if page_size is None:
        k_cache = torch.randn(batch, longest + 2, heads_kv, head_dim, dtype=torch.float64)
    else:
        pages = math.ceil(longest / page_size)
        block_table = torch.randperm(batch * pages).reshape(batch, pages).to(torch.int32)
        k_cache = torch.randn(batch * pages, page_size, heads_kv, head_dim, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    for b, length in enumerate(lengths):
        for position in range(length):
            if block_table is None:
                row, slot = b, position
            else:
                row, slot = int(block_table[b, position // page_size]), position % page_size
            k_cache[row, slot], v_cache[row, slot] = logical_k[b, position], logical_v[b, position]
    q = torch.randn(batch, new_rows, heads_q, head_dim, dtype=torch.float64)
    new_k = torch.stack([logical_k[b, n : n + new_rows] for b, n in enumerate(lengths)])
    new_v = torch.stack([logical_v[b, n : n + new_rows] for b, n in enumerate(lengths)])
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = reference_decode_attention(
        q, k_cache, v_cache, seqlens, k=new_k, v=new_v, block_table=block_table, causal=causal
    )
    for b, length in enumerate(lengths):
        keys, values = logical_k[b, : length + new_rows], logical_v[b, : length + new_rows]
        expected, expected_lse = reference_attention(
            q[b].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            causal="bottom_right" if causal else False,
        )
        torch.testing.assert_close(out[b], expected[0].transpose(0, 1))
        torch.testing.assert_close(lse[b], expected_lse[0])


DECODE_CASES = [
    DecodeCase((5, 9)),
    DecodeCase((0, 17, 3), page_size=8, causal=True),
    DecodeCase((40, 7), page_size=16, interleaved=True, heads_q=8, heads_kv=1),
    DecodeCase((12, 30), new_rows=2, leftpad=True, causal=True, window_size=(5, 0)),
    DecodeCase((20, 4), batch_idx=True, softcap=1.5, alibi="h", heads_q=2, heads_kv=2),
    DecodeCase((33, 2), new_rows=0, query_rows=3, page_size=64, alibi="bh", sinks=True, causal=True),
    DecodeCase((100,), num_splits=3, heads_q=8, heads_kv=2, window_size=(10, -1)),
    DecodeCase((70, 0), page_size=8, num_splits=4, new_rows=0, interleaved=True),
    DecodeCase((9, 25), head_dim=40, dtype=torch.float64, causal=True, new_rows=3, query_rows=2),
    DecodeCase((64, 3), page_size=16, dtype=torch.bfloat16, causal=True, sinks=True),
    DecodeCase((31,), dtype=torch.float16, new_rows=2, softcap=3.0, window_size=(4, 2)),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_attention_matches_the_reference(decode_backend, case):
    device = backend_device(decode_backend)
    if case.dtype not in dispatch.BACKENDS[decode_backend].dtypes:
        with pytest.raises(fast_attn.BackendNotSupportedError, match="supports dtypes"):
            decode_runner(case, decode_backend)(case.make_inputs(device))
        return
    check_decode_against_reference(decode_runner(case, decode_backend), case, device)


def test_decoding_step_by_step_equals_causal_attention_over_the_whole_sequence(decode_backend):
    # Prefill nothing, then append one token at a time: each step's output is the last row of
    # bottom-right causal attention over the tokens so far.
    device = backend_device(decode_backend)
    steps, heads_q, heads_kv, head_dim, page_size = 11, 4, 2, 16, 8
    q = torch.randn(2, steps, heads_q, head_dim, device=device)
    k = torch.randn(2, steps, heads_kv, head_dim, device=device)
    v = torch.randn(2, steps, heads_kv, head_dim, device=device)
    block_table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32, device=device)
    k_cache = torch.randn(4, page_size, heads_kv, head_dim, device=device)
    v_cache = torch.randn_like(k_cache)
    expected = fast_attn.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, backend="reference"
    ).transpose(1, 2)
    for step in range(steps):
        seqlens = torch.full((2,), step, dtype=torch.int32, device=device)
        out = fast_attn.decode_attention(
            q[:, step : step + 1], k_cache, v_cache, seqlens, k=k[:, step : step + 1], v=v[:, step : step + 1],
            block_table=block_table, causal=True, backend=decode_backend,
        )  # fmt: skip
        torch.testing.assert_close(out[:, 0], expected[:, step], atol=2e-5, rtol=1e-4)


def rotate_by_complex(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, S, H, D) with its first 2 * angles.shape[-1] dims rotated by `angles` (B, S, rd/2),
    written independently of fast_attn.rotary: pairs of dims as complex numbers times e^(i angle)."""
    half = angles.shape[-1]
    rotary = x[..., : 2 * half].double()
    if interleaved:
        pairs = torch.view_as_complex(rotary.reshape(*rotary.shape[:-1], half, 2).contiguous())
    else:
        pairs = torch.complex(rotary[..., :half], rotary[..., half:])
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    if interleaved:
        rotated = torch.view_as_real(turned).flatten(-2)
    else:
        rotated = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_with_kvcache_rotates_q_and_the_new_keys_as_flash_attn(interleaved, causal):
    batch, new_rows, heads, head_dim, rotary_dim, capacity = 2, 3, 2, 16, 8, 24
    q = torch.randn(batch, new_rows, heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, new_rows, heads, head_dim, dtype=torch.float64)
    v = torch.randn(batch, new_rows, heads, head_dim, dtype=torch.float64)
    k_cache = torch.randn(batch, capacity, heads, head_dim, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor([4, 11], dtype=torch.int32)
    angles = torch.rand(capacity, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    key_positions = seqlens.long()[:, None] + torch.arange(new_rows)  # (B, S_new)
    query_positions = key_positions if causal else seqlens.long()[:, None].expand(batch, new_rows)
    expected_caches = (k_cache.clone(), v_cache.clone())
    expected, expected_lse = reference_decode_attention(
        rotate_by_complex(q, angles[query_positions], interleaved),
        *expected_caches,
        seqlens,
        k=rotate_by_complex(k, angles[key_positions], interleaved),
        v=v,
        causal=causal,
    )
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(), cache_seqlens=seqlens,
        causal=causal, rotary_interleaved=interleaved, return_softmax_lse=True,
    )  # fmt: skip
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(k_cache, expected_caches[0])
    assert torch.equal(v_cache, expected_caches[1])


def test_flash_attn_with_kvcache_takes_cache_seqlens_as_int_tensor_or_none():
    q = torch.randn(2, 1, 4, 8)
    k_cache, v_cache = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    full = fast_attn.decode_attention(q, k_cache, v_cache, torch.full((2,), 10, dtype=torch.int32))
    torch.testing.assert_close(flash_attn_with_kvcache(q, k_cache, v_cache), full)
    torch.testing.assert_close(flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10), full)
    six = fast_attn.decode_attention(q, k_cache, v_cache, torch.full((2,), 6, dtype=torch.int32), causal=True)
    torch.testing.assert_close(
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True), six
    )


def bad_decode_inputs() -> dict:
    return DecodeCase((5, 9), page_size=8).make_inputs()


BAD_DECODE_INPUTS = [
    ("block_table", lambda i: i["block_table"].fill_(99), r"block_table\[0\] names pages outside 0\.\.\d+"),
    (
        "too_short",
        lambda i: i["cache_seqlens"].fill_(24),
        r"the cache is too short: cache_seqlens \[24, 24\] \+ 1 new keys exceed max_pages \* page_size = 24",
    ),
    ("negative_seqlens", lambda i: i["cache_seqlens"].fill_(-1), r"cache_seqlens must be >= 0"),
    (
        "seqlens_dtype",
        lambda i: i.update(cache_seqlens=i["cache_seqlens"].long()),
        r"cache_seqlens must be an int32",
    ),
    (
        "seqlens_shape",
        lambda i: i.update(cache_seqlens=i["cache_seqlens"][:1]),
        r"cache_seqlens must have shape \(B,\)",
    ),
    (
        "k_dtype",
        lambda i: i.update(k=i["k"].double()),
        r"k must have q's dtype torch.float32, got torch.float64",
    ),
    ("k_without_v", lambda i: i.update(v=None), r"k and v must be given together"),
    (
        "k_shape",
        lambda i: i.update(k=i["k"][:, :, :1], v=i["v"][:, :, :1]),
        r"k must have shape \(B, S_new, Hkv, D\)",
    ),
    (
        "cache_shape",
        lambda i: i.update(v_cache=i["v_cache"][:-1]),
        r"k_cache and v_cache must have the same shape",
    ),
    ("heads", lambda i: i.update(q=i["q"][:, :, :3]), r"Hq % Hkv == 0"),
    (
        "cache_rows",
        lambda i: i.update(block_table=None, k_cache=i["k_cache"][:1], v_cache=i["v_cache"][:1]),
        r"k_cache has 1 rows for B = 2 sequences",
    ),
    (
        "batch_idx_paged",
        lambda i: i.update(cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
        r"cache_batch_idx cannot be combined with a paged cache",
    ),
    (
        "leftpad",
        lambda i: i.update(cache_leftpad=torch.tensor([6, 0], dtype=torch.int32)),
        r"cache_leftpad must be in 0\.\.cache_seqlens = \[5, 9\]",
    ),
    (
        "table_dtype",
        lambda i: i.update(block_table=i["block_table"].long()),
        r"block_table must be an int32 \(B, max_pages\)",
    ),
]


@pytest.mark.parametrize("name, corrupt, message", BAD_DECODE_INPUTS, ids=[b[0] for b in BAD_DECODE_INPUTS])
def test_bad_decode_input_raises_before_anything_is_written(name, corrupt, message):
    inputs = bad_decode_inputs()
    corrupt(inputs)
    caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())
    with pytest.raises((ValueError, TypeError), match=message):
        fast_attn.decode_attention(
            *(inputs[n] for n in DECODE_TENSORS[:4]), **{n: inputs[n] for n in DECODE_TENSORS[4:]}
        )
    assert torch.equal(inputs["k_cache"], caches[0]) and torch.equal(inputs["v_cache"], caches[1])


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(causal="bottom_right"), r"causal must be a bool"),
        (dict(num_splits=-1), r"num_splits must be in 0\.\.128"),
        (dict(num_splits=129), r"num_splits must be in 0\.\.128"),
        (dict(window_size=(3,)), r"window_size must be None or two ints"),
        (dict(softcap=0.0), r"softcap must be a finite number > 0"),
        (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(Hq,\) = \(4,\)"),
        (dict(sinks=torch.ones(2)), r"sinks must have shape \(Hq,\) = \(4,\)"),
        (dict(sinks=torch.ones(2, 4, 1)), r"sinks must have shape \(Hq,\) = \(4,\), got \(2, 4, 1\)"),
        (dict(backend="fastest"), r"backend must be one of"),
        (dict(q=torch.randn(2, 1, 4, 16, requires_grad=True)), r"decode_attention is forward only"),
    ],
)
def test_bad_decode_options_raise_naming_the_argument(keywords, message):
    inputs = bad_decode_inputs()
    inputs.update((name, keywords.pop(name)) for name in list(keywords) if name in DECODE_TENSORS)
    with pytest.raises((ValueError, TypeError), match=message):
        fast_attn.decode_attention(
            *(inputs[n] for n in DECODE_TENSORS[:4]), **{n: inputs[n] for n in DECODE_TENSORS[4:]}, **keywords
        )


def test_flash_attn_with_kvcache_refuses_rotary_without_new_keys_or_too_wide():
    q, k_cache = torch.randn(1, 1, 2, 8), torch.randn(1, 6, 2, 8)
    cos = sin = torch.ones(6, 2)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin rotate the new keys: pass k and v"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), rotary_cos=cos, rotary_sin=sin, cache_seqlens=2)
    new = torch.randn(1, 1, 2, 8)
    with pytest.raises(
        ValueError, match=r"rotary_dim = 2 \* rotary_cos.shape\[1\] = 10 exceeds the head dim 8"
    ):
        flash_attn_with_kvcache(
            q, k_cache, k_cache.clone(), new, new, torch.ones(6, 5), torch.ones(6, 5), cache_seqlens=2
        )
    with pytest.raises(ValueError, match="rotary_cos has 6 positions, but k is rotated up to position 6"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, new, cos, sin, cache_seqlens=6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decoding_steps_replay_from_one_cuda_graph(backend):
    # One decoding step captured once, replayed for each token: the step reads cache_seqlens from
    # the device (no host copy, no sync), so advancing it in place moves the step along the cache.
    case = DecodeCase(
        (7, 30), page_size=16, heads_q=8, heads_kv=2, head_dim=64, dtype=torch.bfloat16, causal=True
    )
    inputs = case.make_inputs("cuda")
    static = {n: inputs[n] for n in DECODE_TENSORS}
    expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())

    def step():
        return fast_attn.decode_attention(
            *(static[n] for n in DECODE_TENSORS[:4]), **{n: static[n] for n in DECODE_TENSORS[4:]},
            causal=True, backend=backend,
        )  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles and caches what the first call needs
    torch.cuda.current_stream().wait_stream(side)
    inputs["k_cache"].copy_(expected_caches[0])
    inputs["v_cache"].copy_(expected_caches[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        fresh = case.make_inputs("cuda")
        for name in ("q", "k", "v"):
            static[name].copy_(fresh[name])
        graph.replay()
        expected, _ = reference_decode_attention(
            *(static[n].cpu() for n in ("q",)), expected_caches[0].cpu(), expected_caches[1].cpu(),
            static["cache_seqlens"].cpu(), k=static["k"].cpu(), v=static["v"].cpu(),
            block_table=static["block_table"].cpu(), causal=True, compute_dtype=torch.float64,
        )  # fmt: skip
        torch.testing.assert_close(out.cpu().double(), expected.double(), atol=2e-2, rtol=2e-2)
        expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())
        static["cache_seqlens"].add_(1)


ROUTED_SHAPES = [  # (B, Hq, Hkv, Sq, Sk, D): few query rows with GQA, or many keys
    (2, 8, 2, 1, 70, 64),
    (1, 4, 1, 4, 300, 40),
    (3, 6, 6, 2, 2100, 16),
    (1, 4, 2, 3, 3, 32),
]


@pytest.mark.parametrize("shape", ROUTED_SHAPES, ids=lambda s: "B{}-H{}/{}-Sq{}-Sk{}-D{}".format(*s))
@pytest.mark.parametrize(
    "options",
    [
        dict(causal="bottom_right"),
        dict(causal=True),
        dict(window_size=(20, 3), softcap=2.0),
        dict(causal="bottom_right", alibi_slopes="h", sinks=True),
    ],
    ids=["bottom_right", "top_left", "window_softcap", "alibi_sinks"],
)
def test_cpu_attention_on_few_query_rows_runs_as_a_decoding_step(shape, options, monkeypatch):
    # fast_attn.attention without gradient on few query rows takes the CPU decode kernel, not the
    # forward kernel (counted); its result is the reference's, and the same whatever the thread count.
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    q = torch.randn(batch, heads_q, seqlen_q, head_dim)
    k, v = (torch.randn(batch, heads_kv, seqlen_k, head_dim) for _ in range(2))
    options = dict(options)
    if options.pop("alibi_slopes", None):
        options["alibi_slopes"] = torch.rand(heads_q)
    if options.pop("sinks", None):
        options["sinks"] = torch.randn(heads_q)
    routed = options.get("causal") is not True or seqlen_q == seqlen_k
    forward_kernel_calls = []
    forward_kernel = cpp_ops.attention_forward

    def counted(problem, seed):
        forward_kernel_calls.append(problem.q.shape)
        return forward_kernel(problem, seed)

    monkeypatch.setattr(cpp_ops, "attention_forward", counted)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            out, lse = fast_attn.attention(q, k, v, **options, return_lse=True, backend="cpu")
            torch.set_num_threads(1)
            single = fast_attn.attention(q, k, v, **options, return_lse=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert len(forward_kernel_calls) == (0 if routed else 2)
    expected, expected_lse = reference_attention(q.double(), k.double(), v.double(), **options)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=2e-5)
    assert torch.equal(out, single[0]) and torch.equal(lse, single[1])


@pytest.mark.parametrize("on_gpu", [True, False])
@pytest.mark.parametrize("seqlen_q", [1, dispatch.MAX_DECODING_ROWS, dispatch.MAX_DECODING_ROWS + 1])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_auto_asks_the_cuda_kernels_first_for_a_gpu_decoding_step(on_gpu, seqlen_q, needs_grad, monkeypatch):
    # A decoding step is host-bound: "auto" asks the C++ CUDA kernels before Triton for attention
    # calls on a GPU with few query rows and no gradient, as for every decode_attention step.
    # auto_order reads only these facts of the problem (a stand-in here: no GPU on this machine), and
    # the measured table, which lists no problem here (tests/test_measured_order.py tests it).
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "measured_key", lambda problem, capability: None)
    problem = SimpleNamespace(
        q=SimpleNamespace(is_cuda=on_gpu), seqlen_q=seqlen_q, needs_grad=needs_grad, device=None
    )
    decoding = on_gpu and seqlen_q <= dispatch.MAX_DECODING_ROWS and not needs_grad
    assert dispatch.auto_order(problem) == (dispatch.CUDA_FIRST_ORDER if decoding else dispatch.AUTO_ORDER)


def test_auto_asks_the_cuda_kernels_first_for_every_decode_attention_step():
    case = DecodeCase((5, 9), page_size=8)
    inputs = case.make_inputs()
    problem = fast_attn.validation.build_decode_problem(
        *(inputs[n] for n in DECODE_TENSORS[:4]), **{n: inputs[n] for n in DECODE_TENSORS[4:]}
    )
    assert dispatch.auto_order(problem) == dispatch.CUDA_FIRST_ORDER


@pytest.mark.gpu
def test_gpu_attention_decoding_steps_run_on_the_cuda_kernels():
    if dispatch.UNAVAILABLE["cuda"] is not None:
        pytest.skip(f"backend cuda: {dispatch.UNAVAILABLE['cuda']}")
    q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        step = fast_attn.validation.build_problem(q, k, v, causal="bottom_right")
        assert dispatch.select_backend(step).name == "cuda"
        out = fast_attn.attention(q, k, v, causal="bottom_right")
    expected, _ = reference_attention(q.double(), k.double(), v.double(), causal="bottom_right")
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    training = fast_attn.validation.build_problem(q.requires_grad_(), k, v, causal="bottom_right")
    assert dispatch.auto_order(training) == dispatch.AUTO_ORDER


def test_decode_attention_compiles_whole_with_the_cache_written_in_place():
    # torch.compile(fullgraph=True) of a decoding step on the CPU kernels: the op's in-place writes
    # reach the caches passed in, and out and lse are eager's.
    case = DecodeCase((5, 9), page_size=8, causal=True, sinks=True)
    inputs = case.make_inputs()
    expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())
    names = ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v", "block_table", "sinks")

    def step(q, k_cache, v_cache, cache_seqlens, k, v, block_table, sinks):
        return fast_attn.decode_attention(
            q, k_cache, v_cache, cache_seqlens, k=k, v=v, block_table=block_table, causal=True, sinks=sinks,
            return_lse=True, backend="cpu",
        )  # fmt: skip

    with torch.no_grad():
        out, lse = torch.compile(step, fullgraph=True)(*(inputs[n] for n in names))
        expected, expected_lse = reference_decode_attention(
            inputs["q"], *expected_caches, inputs["cache_seqlens"], k=inputs["k"], v=inputs["v"],
            block_table=inputs["block_table"], causal=True, sinks=inputs["sinks"],
        )  # fmt: skip
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.equal(inputs["k_cache"], expected_caches[0]) and torch.equal(
        inputs["v_cache"], expected_caches[1]
    )
