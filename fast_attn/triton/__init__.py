"""@triton.jit kernels of the Triton backend, one concern per module.

forward              out and lse (online softmax over key blocks)
backward_preprocess  delta = rowsum(grad_out * out) - grad_lse
backward_dkdv        dK and dV: one program per key block, looping over query blocks
                     and over the query heads that share the kv head (GQA)
backward_dq          dQ: one program per query block, looping over key blocks; also
                     writes dbias directly when the bias has the problem's full shape
backward_dbias       dbias of a broadcast bias: each program owns one tile of the bias
                     and sums the score gradients of every (batch, head) that reads it
block_ranges         which tiles a program visits, and which of them need masks
head_slices          where a program's (batch, head) slice of each input starts
sequences            which problem a program works on: a batch, or one of packed sequences
scores               q.k products turned into masked, biased scores in the log2 domain
dropout              the contract's dropout hash, bit-identical to fast_attn/dropout.py
decode               decoding against a KV cache (decode_forward): the in-place append, the
                     split-KV kernel (query heads of one kv head packed in a tile, paged or
                     contiguous caches) and the lse merge of its splits

The kernels take flat arguments (torch.compile's wrap_triton passes tensors and
scalars) and hand their helpers tuples, unpacked where they are read:
    kv        (k head pointer, v head pointer, k row stride, v row stride)
    q_do      (q head pointer, grad_out head pointer, q row stride, grad_out row stride)
    bias      (bias head pointer, row stride, column stride)
    key_mask  (key mask row pointer, column stride)
    dropout   (seed low, seed high, keep threshold, keep scale): dropout_parameters
    bounds    (seqlen_q, seqlen_k, first_key_offset, last_key_offset): the band of
              fast_attn.causal.visible_band, query i sees key j iff
              j >= i + first_key_offset (with LEFT_BOUNDED) and j <= i + last_key_offset
              (with RIGHT_BOUNDED: a causal mask, or a window's right side)
    modifiers (softcap, alibi_slope_log2) of one (batch, head): scores.py
    varlen    (cu_seqlens_q pointer, cu_seqlens_k pointer, max_seqlen_q, max_seqlen_k):
              packed sequences (IS_VARLEN), read by sequences.sequence_view
A head pointer points at one (batch, head) slice, the key mask's row pointer at one
batch's row; head_slices builds them. Constexprs stay separate parameters: a value
unpacked from a tuple is a runtime value, and an `if` on it would not compile out. The scalars and pointers of
the score modifiers (first_key_offset, softcap, alibi_slopes_ptr, alibi_batch_stride)
are None when the variant lacks them: a None argument leaves the compiled signature,
so a kernel without a modifier compiles exactly as it did before the modifier existed.
So are those of packed sequences without IS_VARLEN.

Packed sequences (IS_VARLEN): the tensors have batch 1, the grid's batch index is the
sequence n, and the forward, dQ and dK/dV programs see their sequence through
sequences.sequence_view as a problem of its own (its first rows, lengths and band);
blocks past the sequence's end exit at once. The preprocess kernel works on the packed
rows as they are.

The launchers (grids, autotuning, allocation) live in fast_attn/ops/triton_ops.py.
"""
