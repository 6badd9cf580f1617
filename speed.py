"""How train.py runs fast without changing what it computes: bf16 autocast on a CPU where it measures
faster, a CUDA step replayed as one graph, and the device settings. docs/performance.md has the figures.
"""
import math
import os
import time

import torch
import torch.distributed as dist

from cli import first_line

BF16_MARGIN = 1.2  # --precision=auto takes bf16 only this much faster: a near tie stays in fp32


def bf16_kernels():
    """Whether oneDNN has bf16 kernels for this CPU: x86 from AVX512-BW, VL and DQ on, Arm with BF16."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_speedup(make_pass, repeats=3):
    """fp32 time / bf16-autocast time of one forward and backward pass (above 1: bf16 is faster).

    make_pass() builds the run's model and returns pass(dtype), which runs that pass once. Whether bf16
    pays depends on the CPU, not on whether it has bf16 instructions, so it is timed: the best of `repeats`
    passes each, after a warm-up, taking turns, with the run's RNG untouched. Where oneDNN has no bf16
    kernels (x86 before AVX-512) it is 0 without timing: emulated bf16 is 10x slower there."""
    if not bf16_kernels():
        return 0.0
    with torch.random.fork_rng(devices=[]):
        one_pass = make_pass()
        best = {}
        for attempt in range(repeats + 1):
            for dtype in (torch.bfloat16, None):
                started = time.perf_counter()
                one_pass(dtype)
                if attempt:
                    best[dtype] = min(best.get(dtype, math.inf), time.perf_counter() - started)
    return best[None] / best[torch.bfloat16]


def resolve_precision(precision, device, make_pass, world_size=1):
    """(precision, speedup): "bf16" or "fp32" for this run, and bf16_speedup where "auto" measured it.

    The checkpoint's config records the answer, so a resumed run computes as it started."""
    if precision != "auto":
        return precision, None
    if device.type != "cpu":  # on an H200 this model is too small for bf16 to pay (5.75 vs 4.94 ms per step)
        return "fp32", None
    speedup = bf16_speedup(make_pass)
    use_bf16 = torch.tensor([float(speedup >= BF16_MARGIN)])
    if world_size > 1:  # every rank computes alike: bf16 only where it pays on all of them
        dist.all_reduce(use_bf16, op=dist.ReduceOp.MIN)
    return ("bf16" if use_bf16.item() else "fp32"), speedup


def autocast_dtype(device, precision):
    """torch.bfloat16 for a run in bf16 autocast (on a CPU or CUDA), else None: fp32. `precision` is
    resolve_precision's answer."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: resolve 'auto' with resolve_precision first")
    return torch.bfloat16 if precision == "bf16" and device.type in ("cpu", "cuda") else None


def autocast_to(device, dtype, **kwargs):
    """The context a run computes in: autocast to `dtype` (autocast_dtype's answer), or fp32 for None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, **kwargs)


def precision_name(device, precision, speedup=None):
    """How a run computes, for its first line, with what "auto" measured (0: no bf16 kernels, not timed)."""
    name = "bf16 autocast" if autocast_dtype(device, precision) else "fp32"
    if speedup is None:
        return name
    return f"{name}: " + (f"bf16 measured {speedup:.2f}x as fast as fp32 here" if speedup
                          else "no bf16 kernels for this CPU")


def settings(device, deterministic=False):
    if deterministic:
        # cuBLAS needs a fixed workspace, set before its first call, to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cpu":
        # Tiny late gradients become denormal floats, which x86 handles slowly (bench.py: about 8% per step).
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        # Shapes never change: let cuDNN time its kernels once (not when the run must be deterministic:
        # the kernel it picks can differ between runs). TF32 for the fully connected layers.
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True


def optimizer_tensors(optimizer):
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


def cuda_graph_step(eager, params, optimizer, batch_size, device):
    """step(x, lr) that replays eager(x) (forward, backward and Adam) as one captured CUDA graph: one
    launch per step instead of hundreds (PyTorch docs, "CUDA Graphs", whole-network capture); None where
    capture fails. The optimizer keeps its learning rate in a device tensor. The warm-up that capture needs
    runs real steps, so `params` and Adam's state are put back afterwards."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    saved_params = [p.detach().clone() for p in params]
    saved_state = [t.clone() for t in optimizer_tensors(optimizer)]  # empty for a fresh optimizer
    static_x = torch.zeros(batch_size, 1, 28, 28, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(static_x)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = eager(static_x)
    except RuntimeError as e:  # a GPU or build that cannot capture this step still trains, eagerly
        print(f"CUDA graph capture failed ({first_line(e)}); training without it")
        graph = None
    with torch.no_grad():
        for p, value in zip(params, saved_params):
            p.copy_(value)
        for i, t in enumerate(optimizer_tensors(optimizer)):
            t.copy_(saved_state[i]) if saved_state else t.zero_()  # a fresh Adam's state is all zeros
    if graph is None:
        for group in optimizer.param_groups:
            group["capturable"], group["lr"] = False, float(group["lr"])
        return None

    def graph_step(x, lr):
        static_x.copy_(x)
        for group in optimizer.param_groups:
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        graph.replay()
        return static_out.clone()
    return graph_step
