"""Which program is which: the order of the launch grid of the attention kernels.

A grid is (blocks, heads, batch) with the blocks (of queries, or of keys for
dK/dV) fastest, so that programs next to each other share one (batch, head)'s
K and V (or Q and dO) in L2. With BATCH_FASTEST the grid is (batch, blocks,
heads): the programs of every batch that read one slice of a bias broadcast over
the batch (T5's (1, H, Sq, Sk)) run side by side, so each bias tile comes from
memory once and from L2 for the other batches. In (blocks, heads, batch) order
a (1, H, S, S) bias larger than L2 was read from memory once per batch.
"""

import triton
import triton.language as tl


@triton.jit
def program_coordinates(BATCH_FASTEST: tl.constexpr):
    """(block, head, batch, number of blocks) of this program."""
    if BATCH_FASTEST:
        block = tl.program_id(1)
        head = tl.program_id(2)
        batch = tl.program_id(0)
        num_blocks = tl.num_programs(1)
    else:
        block = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2)
        num_blocks = tl.num_programs(0)
    return block, head, batch, num_blocks
