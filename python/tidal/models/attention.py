"""What a model needs to know about the batch to run paged attention.

The serving engine builds one ``AttentionMetadata`` per step from the scheduler's output; the model
passes it unchanged to every attention layer. Tokens of all sequences are flattened into one batch
of ``num_tokens`` rows, sequence after sequence.
"""

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The flat batch layout of one engine step.

    Attributes
    ----------
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int64: the KV-cache slot (``block_id * block_size + offset``) each new
        token's key and value are written to; a negative slot is skipped (padding).
    block_tables : torch.Tensor
        ``[num_seqs, max_num_blocks_per_seq]`` int32: each sequence's block table, padded with 0.
    seq_lens : torch.Tensor
        ``[num_seqs]`` int32: each sequence's context length after this step's tokens
        (``num_computed_tokens + num_new_tokens``).
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32: prefix sums of the new tokens per sequence, first 0, last
        ``num_tokens``. Sequence ``s`` owns rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]``.
    max_seqlen_q : int
        The largest number of new tokens of one sequence (1 for a pure decode step).
    max_seqlen_k : int
        The largest ``seq_lens`` entry.
    split_counters : torch.Tensor or None
        CUDA: the int32 zeros of ``ops.paged_attention``'s in-kernel merge of key splits, owned by the
        model runner (one set per runner: its steps and layers run one after another on its stream).
    seq_order : torch.Tensor or None
        ``[num_seqs]`` int32: the order in which the attention kernels take the sequences (the GPU
        model runner's: longest context first); None takes them as they come.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    split_counters: torch.Tensor | None = None
    seq_order: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
