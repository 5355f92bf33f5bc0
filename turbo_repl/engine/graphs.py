"""CUDA graphs for the DiT forward: the shapes of a run are fixed, so each expert's forward is captured once per
shape and backend choice and replayed on every step, without a thousand kernel launches from Python."""

from __future__ import annotations

from collections import OrderedDict

import torch


class GraphedForward:
    """Calls `net(x, timesteps, context, y)` through a captured CUDA graph (eager on the CPU).

    The returned tensor is the graph's static output: it is overwritten by the next call, so use it (the sampler
    converts it to float64 at once) before calling again. A capture that fails falls back to eager for that key.
    """

    def __init__(self, net, keep: int = 2):
        self.net, self.keep = net, keep
        self._graphs: OrderedDict[tuple, tuple | None] = OrderedDict()

    def _key(self, *tensors) -> tuple:
        modes = tuple(sorted({(m.mode, m.topk) for m in self.net.modules() if hasattr(m, "topk")}))
        return tuple((t.shape, t.dtype) if t is not None else None for t in tensors) + modes

    def __call__(self, x, timesteps, context, y=None):
        if x.device.type != "cuda":
            return self.net(x, timesteps, context, y)
        key = self._key(x, timesteps, context, y)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, timesteps, context, y)
            while len(self._graphs) > self.keep:   # old shapes: give their memory back
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        entry = self._graphs[key]
        if entry is None:
            return self.net(x, timesteps, context, y)
        graph, inputs, output = entry
        for static, value in zip(inputs, (x, timesteps, context, y)):
            if static is not None:
                static.copy_(value)
        graph.replay()
        return output

    def _capture(self, x, timesteps, context, y):
        inputs = tuple(t.clone() if t is not None else None for t in (x, timesteps, context, y))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):   # compile and autotune kernels, allocate workspaces, fill caches
                self.net(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                output = self.net(*inputs)
        except RuntimeError:   # something in the forward cannot be captured: stay eager
            torch.cuda.synchronize()
            return None
        return graph, inputs, output

    def clear(self) -> None:
        self._graphs.clear()
