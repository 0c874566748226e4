"""CUDA graphs for sampling: a model call replayed from one graph per input signature.

Sampling at a small batch is launch-bound: a forward is hundreds of small kernels, which the CPU
issues more slowly than the GPU runs them; a graph issues them all at once.
"""
import torch


class CUDAGraphs:
    """model(*args, **kwargs), replayed from one CUDA graph per input signature. Inputs are copied
    into the graph's static buffers and the output is cloned, since the next replay overwrites it
    (the Adams solvers keep earlier velocities). On the CPU it calls the model."""

    def __init__(self, model):
        self.model, self.graphs = model, {}
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        tensors = [a for a in args if torch.is_tensor(a)]
        if not tensors or not tensors[0].is_cuda:
            return self.model(*args, **kwargs)
        key = (tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args),
               tuple(sorted(kwargs.items())), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in self.graphs:
            static = [a.clone() if torch.is_tensor(a) else a for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph: compilation, cuBLAS handles
                for _ in range(2):
                    self.model(*static, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(*static, **kwargs)
            self.graphs[key] = graph, static, out
        graph, static, out = self.graphs[key]
        for buf, a in zip(static, args):
            if torch.is_tensor(a):
                buf.copy_(a)
        graph.replay()
        return out.clone()
