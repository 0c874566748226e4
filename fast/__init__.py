"""The fast layer: every speed path of pixnerd, applied to a built model from outside.

The core files (model.py, nerf_head.py, flow.py, samplers.py) are plain PyTorch and never mention
this package. train.py and sample.py call it in one place each (`--fast`, on by default on CUDA):
- `enable(model)` swaps the model's blocks, attentions, SwiGLUs and neural-field modules for
  subclasses whose forwards run fused Triton kernels (blocks.py, nerf.py) and fall back to the
  plain forwards wherever a kernel does not apply;
- `for_training` adds bf16 compute copies of the Linear weights with an fp32 gradient average under
  DDP (precision.py), regional torch.compile (optionally CUDA graphs) and one fused AdamW +
  clipping + EMA step (optim.py);
- `for_sampling` adds bf16 weights, compile and CUDA graphs (graphs.py).
Each piece is tested against the plain path it replaces (test_fast.py).
"""
import time

import torch

from fast import blocks, nerf, optim
from fast.graphs import CUDAGraphs
from fast.precision import allreduce_fp32, bf16_linears, compute_copy


def enable(model):
    """Swap model's modules for the fast ones where the kernels apply (CUDA with Triton), in place:
    same parameters, same state-dict keys. Returns the number of modules swapped (0 on the CPU)."""
    return nerf.enable(model) + blocks.enable(model)


def compile_regions(model, **kwargs):
    """torch.compile each transformer block and the head in place (regional compilation): the blocks
    share one compiled graph, so compile time is that of one block, and the state-dict keys stay
    unprefixed. Shapes are static by default: sampling alternates two batch sizes (with and without
    the CFG branch), and dynamic-shape kernels run slower. Past torch's recompile limit a block runs
    eagerly, still correct."""
    kwargs = {"dynamic": False, **kwargs}
    for block in [*model.blocks, *getattr(model, "text_blocks", [])]:
        block.compile(**kwargs)
    model.head.compile(**kwargs)
    return model


def for_training(model, ema, opt, *, ema_decay, grad_clip=None, compile=True, cuda_graphs=False,
                 bf16_copies=True, encoder=None, log=print):
    """The fast version of a training step's pieces. model: the fp32 model that opt updates (opt may
    hold more parameters, e.g. the REPA projector); ema: its EMA copy.

    Returns (net, step, comm_hook): net runs the forward and backward (a bf16 compute copy of model
    when bf16_copies, with the kernels, compiled); step() clips the gradients to grad_clip (None:
    not clipped), runs AdamW and ema += (1 - ema_decay) (model - ema), writes the copies, zeroes
    their gradients and returns the gradients' total norm; comm_hook is the DDP communication hook
    the copies need (DDP.register_comm_hook), or None. encoder: the frozen REPA target network
    (dinov2.DINOv2), given bf16 weights and, with compile, compiled blocks, in place."""
    net, copies = compute_copy(model) if bf16_copies else (model, [])
    log(f"bf16 compute copies: {f'{len(copies)} Linear tensors' if copies else 'off'}")
    swapped = enable(net) + enable(ema)  # the EMA samples the training grids
    log(f"fused kernels: {'on' if swapped else 'off (needs Triton)'}")
    graphs = cuda_graphs and compile
    if cuda_graphs:
        log(f"CUDA graphs: {'on' if graphs else 'off (they need --compile)'}")
    if compile:
        compile_regions(net, **({"mode": "reduce-overhead"} if graphs else {}))
    if encoder is not None:  # autocast runs it in bf16: its weights cast once, its blocks compiled
        bf16_linears(encoder)
        for block in encoder.blocks if compile else []:
            block.compile(dynamic=False)
        log(f"REPA encoder: bf16 weights{', compiled blocks' if compile else ''}")
    model_params, ema_params = list(model.parameters()), list(ema.parameters())

    def step():
        norm = optim.step(opt, ema_params, model_params, ema_decay, grad_clip, copies=copies)
        for _, q in copies:
            q.grad = None
        if graphs:  # the graphs' outputs (activations) of this step may be overwritten from now on
            torch.compiler.cudagraph_mark_step_begin()
        return norm

    return net, step, allreduce_fp32 if copies else None


def for_sampling(model, compile=None, cuda_graphs=True):
    """model (eval, no gradients) with bf16 weights and the kernels; compile None, "regions" (each
    block) or "full" (the whole model); replayed from CUDA graphs when cuda_graphs."""
    bf16_linears(model)
    enable(model)
    if compile == "regions":
        compile_regions(model)
    elif compile == "full":
        model.compile(dynamic=False)
    return CUDAGraphs(model) if cuda_graphs else model


# ---------------------------------------------------------------------------------------------
# Measurement: FLOPs, MFU, memory
# ---------------------------------------------------------------------------------------------

# Dense bf16 matmul rates measured with measure_peak_flops on one card of each kind (TFLOP/s x 1e12).
PEAK_FLOPS = {"H100": 686e12, "H200": 790e12}
_measured = {}


def peak_flops(device):
    """The MFU reference of a CUDA device: the table's rate for its card, else measured once."""
    name = torch.cuda.get_device_name(device)
    for card, rate in PEAK_FLOPS.items():
        if card in name:
            return rate
    if name not in _measured:
        _measured[name] = measure_peak_flops(device)
    return _measured[name]


def measure_peak_flops(device, n=8192, iters=20):
    """The bf16 rate of an n x n x n matmul on device, FLOP/s (median of iters)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(iters + 3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times[3:])[iters // 2]


def count_flops(config, image_size):
    """Forward matmul + attention FLOPs of one image of the model config {"name", "kwargs"},
    counted on the meta device (SwiGLU's alignment padding left out: not the model's FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model import MODELS, SwiGLU
    with torch.device("meta"):
        m = MODELS[config["name"]](**config["kwargs"])
        x = torch.empty(1, 3, image_size, image_size)
        y = torch.zeros(1, dtype=torch.long) if m.text_dim is None else torch.empty(1, m.text_pos.shape[1], m.text_dim)
        for mlp in m.modules():
            if isinstance(mlp, SwiGLU):
                mlp.pad = 0
        with FlopCounterMode(display=False) as counter:
            m(x, torch.empty(1), y)
    return counter.get_total_flops()


def peak_gib(device, graphs=False):
    """Peak GPU memory since the last reset, GiB: tensors allocated, or with CUDA graphs the memory
    reserved, since the graphs' private pools do not count as allocated while they replay."""
    peak = torch.cuda.max_memory_reserved if graphs else torch.cuda.max_memory_allocated
    return peak(device) / 2 ** 30
