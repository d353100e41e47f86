"""A CUDA graph faked on the CPU with the semantics that matter to a caller: the captured run's output tensors are
the graph's own, overwritten in place by every replay, and a replay computes from the graph's own input tensors
(the ones the capture ran on). What a test of the graphs checks is the wrapping around it: which calls replay, that
the inputs reach the graph and the outputs come out right and are not overwritten later, the keys, and every way
back to eager. The CUDA capture itself runs on a GPU only (`.ci/gpu-checks`)."""

from __future__ import annotations

from pipeline.cuda_graphs import tensors


class FakeGraph:
    """A replay reruns the captured function and writes its results into the captured output's tensors."""

    def __init__(self, run, output, corrupt: bool = False):
        self.run, self.output, self.corrupt = run, output, corrupt

    def replay(self) -> None:
        for static, fresh in zip(tensors(self.output), tensors(self.run()), strict=True):
            static.copy_(fresh + 1 if self.corrupt else fresh)


def fake_capture(run):
    expected = run()
    output = run()
    return FakeGraph(run, output), output, expected


def failing_capture(run):
    raise RuntimeError("operation not permitted when stream is capturing")


def corrupting_capture(run):
    _, output, expected = fake_capture(run)
    return FakeGraph(run, output, corrupt=True), output, expected
