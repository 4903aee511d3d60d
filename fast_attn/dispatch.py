"""The backend registry: the only module that chooses a kernel.

Each backend declares what it supports and answers `not_supported_reasons`.
"auto" takes the first backend with no reasons, in the order triton, cuda,
cpu, reference (fastest measured first), or cuda first for a decoding step and where a committed GPU
measurement found the CUDA kernels faster (auto_order); a backend named explicitly that cannot run the
input raises with every reason. Decisions use static facts only (device, dtype, head dim, features,
compute capability, causality, and whether a call needs a gradient or is a decoding step: few query
rows, no gradient), so compiled graphs stay whole.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import _extension
from .causal import CausalMode
from .dropout import new_dropout_seed
from .measured_order import CUDA_FASTER
from .ops import cpp_ops
from .validation import SUPPORTED_DTYPES, AttentionProblem, DecodeProblem

# Triton first on GPUs: on an H100 (bf16, 16k tokens, benchmarks/results/h100-20261126.md)
# it ran 1.09-1.34x SDPA flash forward and 0.999-1.24x backward, while the mma.sync CUDA
# kernels ran 0.53-0.79x forward and 0.38-0.58x backward; both are held to the same contract tests.
AUTO_ORDER = ("triton", "cuda", "cpu", "reference")
# The C++ CUDA kernels first, for two kinds of GPU call (auto_order):
# - decoding steps, bound by the host path, not by FLOPs: on that H100 a Triton launch cost 144 us of
#   host time per call against SDPA's 18 us, while a C++ op's launch costs a few microseconds
#   (decode_attention's steps, and attention's calls of at most MAX_DECODING_ROWS query rows without
#   a gradient: a transformers model's generation steps); their speed on a GPU is not measured yet;
# - the problems measured_order.CUDA_FASTER lists: where a committed fast_attn.bench run on a GPU found
#   the CUDA kernels faster than Triton at every sequence length (tools/measured_order.py writes it).
CUDA_FIRST_ORDER = ("cuda", "triton", "cpu", "reference")


# The optional features of the contract a backend may lack, and how a refusal names them.
FEATURES = {
    "dropout": "dropout (dropout_p > 0)",
    "window": "window_size",
    "softcap": "softcap",
    "alibi": "alibi_slopes",
    "sinks": "sinks",
    "varlen": "packed sequences (varlen_attention)",
    "kv_cache": "decoding against a KV cache (decode_attention)",
}
ALL_FEATURES = frozenset(FEATURES)


def _feature_flags(problem: AttentionProblem | DecodeProblem) -> tuple[bool, ...]:
    """Whether this problem uses each optional feature, in the order of FEATURES."""
    return (
        problem.dropout_p > 0.0,
        problem.window is not None,
        problem.softcap is not None,
        problem.alibi_slopes is not None,
        problem.sinks is not None,
        problem.packed_sequences is not None,
        isinstance(problem, DecodeProblem),
    )


def asked_features(problem: AttentionProblem | DecodeProblem) -> set[str]:
    """The optional features this problem uses."""
    return {feature for feature, used in zip(FEATURES, _feature_flags(problem)) if used}


class BackendNotSupportedError(NotImplementedError):
    """A named backend cannot run this input; the message lists every reason."""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    supports_head_dim: Callable[[int], bool]
    head_dims_text: str
    features: frozenset[str]  # the optional features of the contract it implements (see FEATURES)
    min_capability: tuple[int, int] | None
    availability: Callable[[], str | None]  # None when usable, else why not; evaluated once at import
    run: Callable  # (problem, dropout_seed) -> (out, lse)
    # Reasons of this backend's own beyond the declared facts: (problem, explicit) -> reasons. Without
    # a bias they may read only the device, dtype, head dim and features (see _AUTO_CHOICES).
    extra_reasons: Callable[[AttentionProblem, bool], list[str]] = lambda problem, explicit: []
    # Why a backend that is available cannot serve this machine's devices in practice (info only).
    machine_note: Callable[[], str | None] = lambda: None
    # Its decoding step (feature "kv_cache"): (DecodeProblem) -> (out (B, Sq, Hq, D), lse (B, Hq, Sq))
    # without the sinks, which run_decode_problem applies.
    decode: Callable | None = None

    def not_supported_reasons(self, problem: AttentionProblem, explicit: bool = True) -> list[str]:
        """Every reason this backend cannot run `problem` (empty when it can)."""
        return list(self._reasons(problem, explicit))

    def accepts(self, problem: AttentionProblem, explicit: bool = False) -> bool:
        """Whether this backend can run `problem`: stops at the first reason ("auto" asks every call)."""
        return next(self._reasons(problem, explicit), None) is None

    def _reasons(self, problem: AttentionProblem, explicit: bool) -> Iterator[str]:
        unavailable = UNAVAILABLE[self.name]
        if unavailable is not None:
            yield unavailable
            return
        device = problem.device
        if device.type not in self.device_types:
            yield f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        elif device.type == "cuda" and self.min_capability is not None:
            capability = torch.cuda.get_device_capability(device)
            if capability < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                yield f"needs compute capability >= {need}, device has {capability[0]}.{capability[1]}"
        if problem.dtype not in self.dtypes:
            yield f"supports dtypes {[str(d).replace('torch.', '') for d in self.dtypes]}, not {problem.dtype}"
        if not self.supports_head_dim(problem.head_dim):
            yield f"supports head dims {self.head_dims_text}, not {problem.head_dim}"
        for feature in asked_features(problem) - self.features:
            yield f"does not implement {FEATURES[feature]} yet"
        yield from self.extra_reasons(problem, explicit)


def _extension_unavailable() -> str | None:
    return _extension.load()[1]


def _cpu_unavailable() -> str | None:
    reason = _extension_unavailable()
    if reason is None and not cpp_ops.has_kernel_for("CPU"):
        reason = "this build of fast_attn registered no CPU kernel"
    return reason


def _cuda_unavailable() -> str | None:
    reason = _extension_unavailable()
    if reason is not None:
        return reason
    if not _extension.build_info().get("with_cuda") or not cpp_ops.has_kernel_for("CUDA"):
        return "this build of fast_attn has no CUDA kernels (built without CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# Triton reads it when its kernels are first imported, which fast_attn does at import.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_on_cpu_reasons(problem: AttentionProblem, explicit: bool) -> list[str]:
    # On CPU tensors the Triton kernels run in the interpreter, which only tests use.
    if problem.device.type != "cpu":
        return []
    if not TRITON_INTERPRETING:
        return ["runs on CPU tensors only under TRITON_INTERPRET=1"]
    if not explicit:
        return ["the Triton interpreter is only used when backend='triton' is named"]
    return []


def _triton_machine_note() -> str | None:
    if torch.cuda.is_available():
        return None
    return "no CUDA device (CPU tensors run only under TRITON_INTERPRET=1, for tests)"


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        # Registers the triton ops now, so compiled code never runs this import.
        importlib.import_module("fast_attn.ops.triton_ops")
    except ImportError as error:
        return f"the Triton kernels failed to import: {error}"
    return None


CUDA_HEAD_DIMS: tuple[int, ...] = tuple(_extension.build_info().get("cuda_head_dims", ()))


def _cuda_supports_head_dim(head_dim: int) -> bool:
    # A head dim runs in the smallest compiled kernel that fits it, zero-padded.
    return head_dim % 8 == 0 and bool(CUDA_HEAD_DIMS) and head_dim <= max(CUDA_HEAD_DIMS)


def _cuda_modifier_reasons(problem: AttentionProblem, explicit: bool) -> list[str]:
    # The dK/dV kernel that sums a broadcast bias's gradient has no registers left for the score
    # modifiers at kernel head dims of 128 and up (dkdv_dbias_with_modifiers in csrc/cuda/kernel_api.h).
    if isinstance(problem, DecodeProblem):
        return []
    bias = problem.bias
    modifiers = problem.softcap is not None or problem.alibi_slopes is not None
    modifiers = modifiers or (problem.window is not None and problem.window[0] >= 0)
    if not (modifiers and bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return []
    full_rows_and_keys = bias.shape[2] == problem.seqlen_q and bias.shape[3] == problem.seqlen_k
    kernel_head_dim = min((d for d in CUDA_HEAD_DIMS if d >= problem.head_dim), default=0)
    if full_rows_and_keys or kernel_head_dim < 128:
        return []
    return [
        "does not implement the gradient of a bias broadcast over rows or keys together with window_size's "
        f"left side, softcap or alibi_slopes at head dim {problem.head_dim} (kernel head dims of 128 and up)"
    ]


def _reference_score_options(problem: AttentionProblem | DecodeProblem) -> dict:
    """The problem's causality and score modifiers as the reference functions' keywords (sinks apart)."""
    return dict(
        causal=problem.causal,
        window_size=problem.window,
        softcap=problem.softcap,
        alibi_slopes=problem.alibi_slopes,
        scale=problem.scale,
    )


def _run_reference(problem: AttentionProblem, dropout_seed):
    from .reference import reference_attention, reference_varlen_attention

    options = dict(
        _reference_score_options(problem),
        sinks=problem.sinks,
        dropout_p=problem.dropout_p,
        dropout_seed=dropout_seed,
    )
    if problem.packed_sequences is None:
        return reference_attention(
            problem.q, problem.k, problem.v, bias=problem.bias, key_mask=problem.key_mask, **options
        )
    cu_seqlens_q, cu_seqlens_k, _, _ = problem.packed_sequences
    packed = (t[0].transpose(0, 1) for t in (problem.q, problem.k, problem.v))  # (T, H, D)
    out, lse = reference_varlen_attention(*packed, cu_seqlens_q, cu_seqlens_k, **options)
    return out.transpose(0, 1)[None], lse[None]  # as the ops give them: (1, Hq, Tq, D), (1, Hq, Tq)


def _reference_decode(problem: DecodeProblem):
    from .reference import reference_decode_attention

    return reference_decode_attention(
        problem.q,
        problem.k_cache,
        problem.v_cache,
        problem.cache_seqlens,
        k=problem.k_new,
        v=problem.v_new,
        cache_leftpad=problem.cache_leftpad,
        block_table=problem.block_table,
        cache_batch_idx=problem.cache_batch_idx,
        **_reference_score_options(problem),
    )


def _with_sinks(kernel_forward: Callable) -> Callable:
    """A kernel backend's run: its forward op, then the sinks (fast_attn/ops/sinks.py) when asked for."""

    def run(problem: AttentionProblem, dropout_seed):
        out, lse = kernel_forward(problem, dropout_seed)
        if problem.sinks is None:
            return out, lse
        from .ops.sinks import apply_sinks

        return apply_sinks(out, lse, problem.sinks)

    return run


def _cpp_decode(problem: DecodeProblem):
    return cpp_ops.decode_forward(problem.op_arguments())


# A CPU problem of at most MAX_DECODING_ROWS query rows runs as a decoding step when its query heads
# share kv heads (GQA) or it has DECODING_KEYS keys or more: the decode kernel packs the rows of a kv
# head's query heads into one tile and splits long key ranges, where the forward kernel's tiles hold
# 64 query rows of one head. benchmarks/launch_overhead.py compares them; on the 2-core AVX2
# machine (one thread, float32, D 64, us per call as a decoding step / through the forward kernel):
# H 32/8, Sq 1: 74 / 99 at Sk 64, 166 / 306 at Sk 512; H 12/12, Sq 1: 1927 / 2460 at Sk 4096,
# but 92 / 78 at Sk 64 and 176 / 160 at Sk 512.
MAX_DECODING_ROWS = 4
DECODING_KEYS = 2048
# Such a call splits its keys into parts of at least DECODING_SPLIT_KEYS keys until it has
# DECODING_TASKS (sequence, kv head, split) tasks: a rule of the shapes alone, so that its results,
# like the forward kernel's, do not depend on the thread count.
DECODING_TASKS = 8
DECODING_SPLIT_KEYS = 256


def _runs_as_decoding(problem: AttentionProblem) -> bool:
    """Whether the CPU decode kernel computes this problem: few query rows, and nothing that kernel
    lacks (a bias, a key mask, dropout, packed sequences, a gradient, top-left causal alignment; under
    torch.compile the op's in-place cache arguments would be copied)."""
    _, heads_q, seqlen_q, _ = problem.q.shape
    _, heads_kv, seqlen_k, _ = problem.k.shape
    if seqlen_q > MAX_DECODING_ROWS or (heads_q == heads_kv and seqlen_k < DECODING_KEYS):
        return False
    return (
        problem.bias is None
        and problem.key_mask is None
        and problem.dropout_p == 0.0
        and problem.packed_sequences is None
        and (problem.causal != CausalMode.TOP_LEFT or seqlen_q == seqlen_k)
        and not problem.needs_grad
        and not torch.compiler.is_compiling()
    )


def _cpu_forward(problem: AttentionProblem, dropout_seed):
    """The CPU backend's forward: a decoding step over k and v as a full cache when it runs as one."""
    if not _runs_as_decoding(problem):
        return cpp_ops.attention_forward(problem, dropout_seed)
    window_left, window_right = problem.window or (-1, -1)
    seqlens = torch.full((problem.batch,), problem.seqlen_k, dtype=torch.int32)
    pairs = problem.batch * problem.heads_kv
    splits = max(1, min(-(-DECODING_TASKS // max(pairs, 1)), problem.seqlen_k // DECODING_SPLIT_KEYS))
    out, lse = cpp_ops.decode_forward((
        problem.q.transpose(1, 2), problem.k.transpose(1, 2), problem.v.transpose(1, 2), None, None, seqlens,
        None, None, None, problem.scale, problem.causal != CausalMode.NONE, problem.alibi_slopes,
        window_left, window_right, problem.softcap or 0.0, splits,
    ))  # fmt: skip
    return out.transpose(1, 2), lse  # (B, Hq, Sq, D) stored (B, Sq, Hq, D), as attention_forward's


def _triton_forward(problem: AttentionProblem, dropout_seed):
    from .ops.triton_ops import attention_forward

    return attention_forward(problem, dropout_seed)


def _triton_decode(problem: DecodeProblem):
    from .ops.triton_decode import decode_forward

    return decode_forward(problem)


BACKENDS: dict[str, Backend] = {
    "cuda": Backend(
        name="cuda",
        device_types=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        supports_head_dim=_cuda_supports_head_dim,
        head_dims_text=f"8..{max(CUDA_HEAD_DIMS)} step 8" if CUDA_HEAD_DIMS else "none compiled",
        features=frozenset({"dropout", "sinks", "window", "softcap", "alibi", "varlen", "kv_cache"}),
        min_capability=(8, 0),
        availability=_cuda_unavailable,
        run=_with_sinks(cpp_ops.attention_forward),
        extra_reasons=_cuda_modifier_reasons,
        decode=_cpp_decode,
    ),
    "triton": Backend(
        name="triton",
        device_types=("cuda", "cpu"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        supports_head_dim=lambda d: 1 <= d <= 256,
        head_dims_text="1..256",
        features=frozenset({"dropout", "sinks", "window", "softcap", "alibi", "varlen", "kv_cache"}),
        min_capability=(8, 0),
        availability=_triton_unavailable,
        run=_with_sinks(_triton_forward),
        extra_reasons=_triton_on_cpu_reasons,
        machine_note=_triton_machine_note,
        decode=_triton_decode,
    ),
    "cpu": Backend(
        name="cpu",
        device_types=("cpu",),
        dtypes=SUPPORTED_DTYPES,
        supports_head_dim=lambda d: 1 <= d <= 256,
        head_dims_text="1..256",
        features=frozenset({"dropout", "window", "softcap", "alibi", "sinks", "varlen", "kv_cache"}),
        min_capability=None,
        availability=_cpu_unavailable,
        run=_with_sinks(_cpu_forward),
        decode=_cpp_decode,
    ),
    "reference": Backend(
        name="reference",
        device_types=("cpu", "cuda"),
        dtypes=SUPPORTED_DTYPES,
        supports_head_dim=lambda d: d >= 1,
        head_dims_text="any",
        features=ALL_FEATURES,
        min_capability=None,
        availability=lambda: None,
        run=_run_reference,
        decode=_reference_decode,
    ),
}


# Availability is fixed for the process; evaluating it once keeps the checks
# (extension loading, registered kernels) out of torch.compile's traced code.
UNAVAILABLE: dict[str, str | None] = {name: backend.availability() for name, backend in BACKENDS.items()}


def select_backend(problem: AttentionProblem, backend: str = "auto") -> Backend:
    """The backend that will run `problem`; raise if a named one cannot."""
    if backend != "auto":
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(problem, explicit=True)
        if reasons:
            raise BackendNotSupportedError(
                f"fast_attn backend '{backend}' cannot run this input: " + "; ".join(reasons)
            )
        return chosen
    key = _auto_choice_key(problem)
    chosen = _AUTO_CHOICES.get(key) if key is not None else None
    if chosen is not None:
        return chosen
    for name in auto_order(problem):
        candidate = BACKENDS[name]
        if candidate.accepts(problem):
            if key is not None:
                _AUTO_CHOICES[key] = candidate
            return candidate
    raise BackendNotSupportedError("no fast_attn backend can run this input")  # reference takes everything


def auto_order(problem: AttentionProblem | DecodeProblem) -> tuple[str, ...]:
    """The backends "auto" tries, in order: CUDA_FIRST_ORDER for a decoding step (a DecodeProblem, or
    an attention call on a GPU with few query rows and no gradient) and for a GPU problem on which the
    CUDA kernels measured faster (measured_order.CUDA_FASTER), AUTO_ORDER otherwise."""
    if isinstance(problem, DecodeProblem):
        return CUDA_FIRST_ORDER
    if problem.q.is_cuda:
        if _is_decoding_step(problem):
            return CUDA_FIRST_ORDER
        if measured_key(problem, torch.cuda.get_device_capability(problem.device)) in CUDA_FASTER:
            return CUDA_FIRST_ORDER
    return AUTO_ORDER


def _is_decoding_step(problem: AttentionProblem) -> bool:
    return problem.seqlen_q <= MAX_DECODING_ROWS and not problem.needs_grad


_MEASURED_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def capability_name(capability: tuple[int, int]) -> str:
    """A compute capability as the measurements name it: (9, 0) -> "sm_90"."""
    return f"sm_{capability[0]}{capability[1]}"


def measured_key(problem: AttentionProblem, capability: tuple[int, int]) -> tuple | None:
    """The problem's key in measured_order.CUDA_FASTER on a GPU of `capability`: (capability name,
    dtype, head dim, causal, "fwd_bwd" with a gradient else "fwd"); None for a problem the bench
    does not measure (a bias, key mask or optional feature, a dtype other than bf16 and fp16)."""
    dtype = _MEASURED_DTYPES.get(problem.dtype)
    if dtype is None or problem.bias is not None or problem.key_mask is not None:
        return None
    if any(_feature_flags(problem)):
        return None
    mode = "fwd_bwd" if problem.needs_grad else "fwd"
    return (capability_name(capability), dtype, problem.head_dim, problem.causal != CausalMode.NONE, mode)


# "auto"'s choices by the facts that decide them, so that a call repeating an earlier one's facts
# (every decoding step, every layer) asks no backend again. Without a bias the reasons of every
# backend read only the device, the dtype, the head dim and the features asked for (the bias's
# gradient is the one further fact, _cuda_modifier_reasons): a backend's extra_reasons must keep it so.
# A GPU attention call's order (auto_order) also reads whether it is a decoding step, needs a
# gradient, is causal and has a key mask.
_AUTO_CHOICES: dict[tuple, Backend] = {}


def _auto_choice_key(problem: AttentionProblem | DecodeProblem) -> tuple | None:
    if problem.bias is not None:
        return None
    q = problem.q  # its last dim is the head dim in either problem's layout
    order_facts = None
    if q.is_cuda and not isinstance(problem, DecodeProblem):
        order_facts = (
            problem.seqlen_q <= MAX_DECODING_ROWS,
            problem.needs_grad,
            problem.causal != CausalMode.NONE,
            problem.key_mask is not None,
        )
    return (type(problem), q.device, q.dtype, q.shape[-1], _feature_flags(problem), order_facts)


def run_problem(problem: AttentionProblem, backend: str = "auto"):
    """(out, lse) of `problem` on `backend` (see select_backend), with a fresh dropout seed when it drops."""
    chosen = select_backend(problem, backend)
    dropout_seed = new_dropout_seed(problem.device) if problem.dropout_p > 0.0 else None
    return chosen.run(problem, dropout_seed)


def run_decode_problem(problem: DecodeProblem, backend: str = "auto"):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq)) of a decoding step on `backend` (see select_backend);
    the new keys and values are in the caches afterwards."""
    out, lse = select_backend(problem, backend).decode(problem)
    if problem.sinks is None:
        return out, lse
    from .ops.sinks import apply_sinks

    out, lse = apply_sinks(out.transpose(1, 2), lse, problem.sinks)
    return out.transpose(1, 2), lse


def available_backends() -> dict[str, str | None]:
    """Each backend's name mapped to None if it can run on this machine, else why not."""
    return {name: UNAVAILABLE[name] or backend.machine_note() for name, backend in BACKENDS.items()}
