"""diffusers' group offloading on a CPU as if the device had CUDA streams: what its stream backend is asked while
hooks register and run, and pinning, faked (a CPU has neither). The hooks' own bookkeeping runs for real."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch


class StreamBackend:
    """Stands in for diffusers' `TorchDeviceBackend` of a device with streams."""

    class Stream:
        def synchronize(self) -> None:
            pass

    def __init__(self, device) -> None:
        pass

    def current_stream(self):
        return SimpleNamespace(synchronize=lambda: None)

    def stream(self, stream):
        return contextlib.nullcontext()


def fake_streams(monkeypatch) -> None:
    import diffusers.hooks.group_offloading as group_offloading

    monkeypatch.setattr(group_offloading, "TorchDeviceBackend", StreamBackend)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
