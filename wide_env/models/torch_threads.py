"""Torch's intra-op threads limited to one around the model backend's own torch calls, the caller's setting
restored afterwards (never set process-wide: the user's script keeps its threads).

The shipped models are tiny (d_model 32 or 64): a torch call on them is per-operation overhead, and with
torch's default thread count (one per core) every call wakes the pool, whose threads then compete with the
caller's own work; on a 2-core machine a preset stepped 50 times slower than with one thread (issue 22).
"""

from __future__ import annotations


class one_torch_thread:  # noqa: N801  (used as a function: ``with one_torch_thread():``)
    """Run the block with ``torch.set_num_threads(1)``; restore the caller's count afterwards (also on error).
    A class, not a generator context manager: entered every step with live gating, where contextlib's
    generator costs about 2 us."""

    __slots__ = ("threads",)

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.threads != 1:
            import torch

            torch.set_num_threads(self.threads)
