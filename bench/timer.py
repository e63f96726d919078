"""Where the time of a world-model step goes: `wm.timer = PhaseTimer(device)` records each phase of
`WorldModel.step_batch` (the runtime calls its optional `timer` hook around every phase)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class PhaseTimer:
    """Wall time of each phase of `WorldModel.step_batch`, in seconds, one entry per call:
    "denoise" (the transformer passes of the denoising steps, noise included), "recache" (the re-cache
    pass of the finished chunk, at s=0 or the context-noise level, that extends the KV cache and reads the heads) and "decode" (latents -> uint8 frames on the host).
    On CUDA each phase is synchronised at both ends, so the split is the device's, not the launch queue's."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sync = torch.device(device).type == "cuda"
        self.times: dict[str, list[float]] = {"denoise": [], "recache": [], "decode": []}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.times.setdefault(phase, []).append(time.perf_counter() - t0)

    def clear(self) -> None:
        for v in self.times.values():
            v.clear()
