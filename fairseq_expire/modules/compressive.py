"""Compressive memory (Rae et al., ICLR 2020), mean-pooling version, the paper's compression baseline.

A layer remembers its inputs at the last ``n_mem`` positions and ``n_cmem`` compressed memories, each the mean
of ``c`` consecutive positions that left the ``n_mem`` window (compression rate c); it attends over
[compressed ; memory ; block]. Layout of a :class:`LayerMemory` of N entries: the oldest ``N - min(N, n_mem)``
are compressed (oldest first), the rest raw positions, the last M of them the previous block, as the relative
position term needs. A compressed memory's distance is the mean of its positions' distances.
"""

import torch

from fairseq_expire.modules.expire_span import LayerMemory, _block_distances


def compress_memory(
    memory: LayerMemory, block: torch.Tensor, n_mem: int, n_cmem: int, rate: int
) -> LayerMemory:
    """Append the block (B x M x H, detached), move the raw positions beyond ``n_mem`` into compressed memories
    (means over groups of ``rate``, of the valid positions of a group; a group of padding is padding), keep the
    newest ``n_cmem`` of them; shift distances by M. Needs ``n_mem >= M`` and ``n_mem``, M multiples of ``rate``,
    so that positions leave the window in whole groups."""
    B, M, H = block.shape
    N = len(memory)
    raw = min(N, n_mem)
    compressed = N - raw
    hidden = torch.cat([memory.hidden, block.detach()], dim=1)  # B x (N + M) x H
    distance = torch.cat([memory.distance, _block_distances(M, block.device).expand(B, -1)], dim=1) + M
    valid = torch.cat([memory.valid, memory.valid.new_ones(B, M)], dim=1)

    evicted = max(raw + M - n_mem, 0)  # the oldest raw positions, leaving the window
    groups = evicted // rate
    window = slice(compressed, compressed + evicted)
    weight = valid[:, window].view(B, groups, rate).float()  # B x G x c
    count = weight.sum(-1)  # B x G
    pooled = (hidden[:, window].view(B, groups, rate, H) * weight.unsqueeze(-1).to(hidden.dtype)).sum(2)
    pooled = pooled / count.clamp(min=1).unsqueeze(-1).to(hidden.dtype)  # B x G x H

    def assemble(old, new, rest):  # [kept compressed ; new compressed ; raw window]
        return torch.cat(
            [torch.cat([old, new], dim=1)[:, max(compressed + groups - n_cmem, 0) :], rest], dim=1
        )

    rest = slice(compressed + evicted, None)
    return LayerMemory(
        hidden=assemble(hidden[:, :compressed], pooled, hidden[:, rest]),
        distance=assemble(
            distance[:, :compressed], distance[:, window].view(B, groups, rate).mean(-1), distance[:, rest]
        ),
        valid=assemble(valid[:, :compressed], count > 0, valid[:, rest]),
    )
