"""CUDA graphs: launch a whole training step, or a whole network call, at once.

Eagerly, every operator is a kernel launch that costs the host microseconds. A small U-Net's
training step is over a thousand launches, so on a fast GPU the host, not the GPU, sets the pace
(docs/speed.md). A graph records
the launches once and replays them with one call. What a graph reads and writes must stay
at fixed addresses, so its inputs are copied into buffers it owns.
"""

from __future__ import annotations

from typing import Callable

import torch


def _warm_up(fn: Callable[[], object]) -> object:
    """Run fn on a side stream, as capture wants: cuDNN, cuBLAS and the optimizer set up there."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _capture(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of recording fn; the launches are recorded, not run."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _why(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def graphed_step(step: Callable[[], None], warmup: int = 3,
                 on_fallback: Callable[[str], None] = lambda why: None) -> Callable[[], None]:
    """`step` (no arguments, fixed tensors) as a CUDA graph: its first `warmup` calls run eagerly,
    the next is captured, and every call from then on replays the capture. If capture fails (an
    operator that cannot be recorded on this GPU or torch), `on_fallback(why)` is told and every
    call runs eagerly: a failed capture recorded the step without running it."""
    graph: torch.cuda.CUDAGraph | None = None
    calls, eager = 0, False

    def run() -> None:
        nonlocal graph, calls, eager
        calls += 1
        if eager:
            step()
            return
        if calls <= warmup:
            _warm_up(step)
            return
        if graph is None:
            try:
                graph, _ = _capture(step)
            except Exception as e:  # noqa: BLE001 -- any failure to record: train on eagerly
                eager = True
                on_fallback(_why(e))
                step()
                return
        graph.replay()
    return run


def graphed_forward(fn: Callable[..., torch.Tensor], on_fallback: Callable[[str], None] = lambda why: None
                    ) -> Callable[..., torch.Tensor]:
    """fn(*tensors) (no grad; x, t and, for a conditional model, class labels) replayed as a CUDA graph, one
    per input shape; returns a fresh output. If capture fails, `on_fallback(why)` is told and every call
    runs fn eagerly."""
    graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
    pool = torch.cuda.graph_pool_handle()  # the graphs of several batch sizes share their memory
    eager = False

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        nonlocal eager
        key = tuple((a.shape, a.dtype, a.stride()) for a in tensors)
        if not eager and key not in graphs:
            static = [a.clone() for a in tensors]
            _warm_up(lambda: fn(*static))
            try:
                graph, static_out = _capture(lambda: fn(*static), pool)
            except Exception as e:  # noqa: BLE001 -- any failure to record: sample on eagerly
                eager = True
                on_fallback(_why(e))
            else:
                graphs[key] = graph, static, static_out
        if eager:
            return fn(*tensors)
        graph, static, static_out = graphs[key]
        for buffer, a in zip(static, tensors):
            buffer.copy_(a)
        graph.replay()
        return static_out.clone()
    return run
