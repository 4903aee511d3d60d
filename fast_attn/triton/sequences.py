"""Which problem a program works on: one batch of a padded batch, or one packed sequence.

A packed (varlen) launch has tensors of batch 1, q (1, Hq, Tq, D) and k, v (1, Hkv, Tk, D),
holding N sequences: sequence n is rows cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q and
cu_seqlens_k[n]:cu_seqlens_k[n + 1] of k and v, an attention problem of its own (its own
lengths, band and ALiBi distances). Its grid's batch index is n, and each program sees
its sequence as a problem of batch 1 whose rows start at the sequence's first row: the
Triton twin of sequence_view in csrc/attention_params.h, with the same clamps, so that
bad offsets never make a kernel read or write outside the tensors.
"""

import triton
import triton.language as tl


@triton.jit
def _sequence_rows(cu_seqlens_ptr, sequence, num_rows, max_seqlen):
    """(first row, number of rows) of `sequence`: offsets clamped to [0, num_rows], the
    length to [0, max_seqlen]; the first row in int64 (it multiplies row strides)."""
    begin = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + sequence), 0), num_rows)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + sequence + 1), 0), num_rows)
    return begin.to(tl.int64), tl.minimum(tl.maximum(end - begin, 0), max_seqlen)


@triton.jit
def sequence_view(
    program_batch, seqlen_q, seqlen_k, first_key_offset, last_key_offset, varlen,
    IS_VARLEN: tl.constexpr, BAND_PER_SEQUENCE: tl.constexpr, LEFT_BOUNDED: tl.constexpr,
):
    """(batch, sequence, q_begin, k_begin, bounds) of the program with grid batch index
    `program_batch` (int32).

    batch: the index into the tensors' batch dim (int64; 0 with IS_VARLEN).
    sequence: the problem's index, the row of per-problem data (ALiBi slopes) (int64).
    q_begin, k_begin: the problem's first query and key row in its (batch, head) slices
        (int64; 0 without IS_VARLEN).
    bounds: (seqlen_q, seqlen_k, first_key_offset, last_key_offset) of the problem
        (fast_attn/triton/__init__.py). With BAND_PER_SEQUENCE the band's offsets are
        given relative to the diagonal j = i and each sequence moves them to its own
        bottom-right diagonal, j = i + its Sk - its Sq.
    seqlen_q, seqlen_k: the tensors' rows (Sq and Sk, or Tq and Tk with IS_VARLEN).
    varlen: (cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k) with
        IS_VARLEN (int32 (N + 1,) offsets and bounds on the sequences' lengths), else Nones.
    """
    sequence = program_batch.to(tl.int64)
    if IS_VARLEN:
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k = varlen
        batch = tl.zeros((), tl.int64)  # int64 like a batch index: lse rows (h * Tq) may pass 2^31
        q_begin, sequence_q = _sequence_rows(cu_seqlens_q_ptr, sequence, seqlen_q, max_seqlen_q)
        k_begin, sequence_k = _sequence_rows(cu_seqlens_k_ptr, sequence, seqlen_k, max_seqlen_k)
        if BAND_PER_SEQUENCE:
            last_key_offset += sequence_k - sequence_q
            if LEFT_BOUNDED:
                first_key_offset += sequence_k - sequence_q
        bounds = (sequence_q, sequence_k, first_key_offset, last_key_offset)
    else:
        batch = sequence
        q_begin = 0
        k_begin = 0
        bounds = (seqlen_q, seqlen_k, first_key_offset, last_key_offset)
    return batch, sequence, q_begin, k_begin, bounds
