"""A distributed sampler whose position survives a change of world size.

:class:`ElasticSampler` walks a seeded permutation of the dataset one global batch per optimizer
step. Within a step's stretch of ``train_batch_size`` indices, accumulation step ``a`` of rank ``r``
takes the micro-batch at ``(a * world_size + r) * micro``. Its state is the epoch and the number of
samples consumed by completed steps, which does not depend on the world size: a job restarted from a
checkpoint at another world size (with the same global batch, as elasticity keeps it) resumes at the
first sample no step has seen, so none is skipped or seen twice. Save it with the checkpoint
(``engine.save_checkpoint(..., client_state={"sampler": sampler.state_dict()})``) and restore it
from ``engine.client_state`` after ``engine.load_checkpoint``.
"""

import torch


class ElasticSampler:
    """This rank's micro-batches of dataset indices, ``micro_batch`` each, ``accumulation`` per step.

    Parameters
    ----------
    num_samples : int
        The dataset's length.
    global_batch, micro_batch, world_size, rank : int
        ``global_batch == micro_batch * accumulation * world_size``; the engine's config has them
        (:meth:`for_engine`).
    seed : int
        Each epoch's permutation is drawn from ``seed + epoch``.

    Iterating yields lists of ``micro_batch`` indices, forever (epoch after epoch); the remainder of
    an epoch short of a whole global batch is dropped.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, world_size: int, rank: int,
                 seed: int = 0):
        for name, value in (("num_samples", num_samples), ("global_batch", global_batch),
                            ("micro_batch", micro_batch), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch={global_batch} must be a multiple of micro_batch={micro_batch} * "
                             f"world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_samples < global_batch:
            raise ValueError(f"num_samples={num_samples} must be >= global_batch={global_batch}")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.accumulation = global_batch // (micro_batch * world_size)
        self.epoch, self.consumed = 0, 0

    @classmethod
    def for_engine(cls, num_samples: int, engine, seed: int = 0) -> "ElasticSampler":
        """The sampler of ``engine``'s rank with its batch triple and world size."""
        c = engine.config
        return cls(num_samples, c.train_batch_size, c.train_micro_batch_size_per_gpu, engine.world_size,
                   engine.rank, seed)

    def _order(self) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        order = self._order()
        while True:
            if self.consumed + self.global_batch > self.num_samples:  # the epoch's last whole batch is done
                self.epoch, self.consumed = self.epoch + 1, 0
                order = self._order()
            base = self.consumed
            for a in range(self.accumulation):
                lo = base + (a * self.world_size + self.rank) * self.micro_batch
                if a == self.accumulation - 1:  # the step's last micro-batch: the step is consumed
                    self.consumed = base + self.global_batch
                yield order[lo:lo + self.micro_batch].tolist()

    def state_dict(self) -> dict:
        """The position: epoch and samples consumed by completed steps (world-size independent)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at ``state``; the global batch, dataset length and seed must be the saved ones."""
        for key in ("global_batch", "num_samples", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the sampler state has {key}={state[key]}, this sampler {getattr(self, key)}: a "
                                 f"resumed job must keep the dataset, the seed and the global batch")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
