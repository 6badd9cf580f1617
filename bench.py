"""Speed of this repo on the current device, every figure measured side by side in one run.

    python bench.py              # a table
    python bench.py --json       # one JSON object
    python bench.py --quick      # fewer repeats, smaller MMD sizes (a smoke test)
    python bench.py --hidden=1024   # another shape: latent_dim, channels, hidden, batch_size, critic_channels
    python bench.py --pixel_mmd_weight=100 --adv_weight=20 --latent_adv_weight=5   # with the hybrid's terms

  train       images/s and ms per step of the model and batch size (train.py's) through our loop
              (uint8 data on the device, batches by index, MMD from one matmul) and through a
              naive loop on the same model (DataLoader over float images with per-sample
              collation, MMD from an expanded N x M x D difference tensor); their ratio
  one_thread  ours and naive again with one CPU thread (on a CPU with more), to show how each scales
  variants    our step with each optimisation switched: fp32 or bf16 (where the CPU has bf16
              kernels), foreach or fused Adam, channels_last, torch.compile, CUDA graphs (the
              first step's time includes compiling or capturing); and without the latent critic,
              without the critic, with the critic's convolutions half as wide, and without both
              critics and the pixel MMD (what those loss terms cost), and without the moving average
  flops       achieved FLOP/s of our training step (6 x multiply-adds per image) against this
              device's dense matmul FLOP/s in the precision the step computes in (bf16 or fp32)
  mmd         time and peak memory of one MMD^2 at N = M = 4096 and 16384, D = 64: ours vs
              expanded (skipped where the expanded form cannot fit in memory)
  sampling    images/s of sample.py's decode path
Each time is the median of several timed repeats after a warm-up.
"""
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import data
import hybrid
import speed
import train
from cli import parse_overrides, pick_device, print_results, run
from mmd import mmd

# train.py's options that bench.py takes, with train.py's defaults: the model's shape, the batch size, and
# the pixel MMD's and the two critics' weights (to time the loss without those terms).
TRAIN_OPTIONS = ("latent_dim", "channels", "hidden", "batch_size", "pixel_mmd_weight", "adv_weight",
                 "latent_adv_weight",
                 "ema_decay", "critic_channels")
DEFAULTS = dict(device="auto", json=False, quick=False, data_dir="data",
                **{k: train.DEFAULTS[k] for k in TRAIN_OPTIONS})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def mmd_expanded(x, y, scales, unit):
    """The textbook form: an N x M x D difference tensor per kernel matrix."""
    def mean_k(a, b, skip_diagonal):
        d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        k = sum(torch.exp(-d2 / (s * unit)) for s in scales)
        if skip_diagonal:
            return (k.sum() - k.diagonal().sum()) / (len(a) * (len(a) - 1))
        return k.mean()
    return mean_k(x, x, True) + mean_k(y, y, True) - 2 * mean_k(x, y, False)


def default_model(device, cfg):
    """(model, critics) as train.py builds them, from seed 0."""
    torch.manual_seed(0)
    return train.make_model(cfg, device)


def our_step(images, device, cfg, foreach_adam=False, channels_last=False, compile_step=False, **overrides):
    """One training step exactly as train.py runs it; keyword overrides change train.py's settings."""
    cfg = {**cfg, **overrides}
    if cfg["precision"] == "auto":
        cfg["precision"], _ = train.resolve_precision(cfg, device)
    model, critics = default_model(device, cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = (torch.optim.Adam([*model.parameters(), *critics.parameters()], lr=cfg["lr"]) if foreach_adam
                 else train.make_optimizer(model, critics, cfg, device))
    loss_fn = torch.compile(train.compute_loss) if compile_step else train.compute_loss
    train_step = train.make_train_step(model, optimizer, cfg, device, loss_fn, critics)
    averaged = copy.deepcopy(model).requires_grad_(False) if cfg["ema_decay"] else None
    batches = data.batch_order(len(images), cfg["batch_size"], 0, 0).to(device)
    position = [0]

    def step():
        x = data.to_float(images[batches[position[0] % len(batches)]])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(x, cfg["lr"])
        if averaged is not None:
            train.update_average(averaged, model, cfg["ema_decay"], position[0])
        position[0] += 1
    return step


def naive_loss(model, x, cfg):
    """train.py's default loss (BCE, Gaussian-kernel MMDs, no KL) with the expanded MMD, in fp32, without
    the critics' terms; and for each critic in use, what it scores: {"critic": (the images, the decoded
    prior draws), "latent_critic": (prior draws, the codes)}."""
    logits, z, _, _ = model(x)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    prior_draws = torch.randn(cfg["prior_draws"] or len(z), z.shape[1], device=z.device)
    loss = recon + cfg["mmd_weight"] * mmd_expanded(z, prior_draws, train.parse_scales(cfg["kernel_scales"]),
                                                    2.0 * z.shape[1])
    scored = {}
    if cfg["pixel_mmd_weight"] > 0 or cfg["adv_weight"] > 0:
        drawn = torch.sigmoid(model.decode_logits(torch.randn_like(z)))
        if cfg["pixel_mmd_weight"] > 0:
            loss = loss + cfg["pixel_mmd_weight"] * mmd_expanded(
                drawn.flatten(1), x.flatten(1), train.parse_scales(cfg["pixel_kernel_scales"]), 1.0)
        if cfg["adv_weight"] > 0:
            scored["critic"] = (x, drawn)
    if cfg["latent_adv_weight"] > 0:
        scored["latent_critic"] = (torch.randn_like(z), z)
    return loss, scored


def naive_critic_loss(critic, real, made):
    """A critic's loss, as DCGAN writes it: `real` scored as real, the (detached) `made` as fake."""
    return F.softplus(-critic(real)).mean() + F.softplus(critic(made.detach())).mean()


def naive_fooled(critic, made):
    """The maker's (decoder's or encoder's) loss against a critic: `made` scored as fake."""
    return F.softplus(-critic(made)).mean()


def naive_step(images, device, cfg):
    """The same model and loss the textbook way: per-sample DataLoader, expanded MMD, plain Adam, fp32,
    and each critic as in DCGAN: its own Adam and its own backward pass, before the decoder's and
    encoder's."""
    model, modules = default_model(device, cfg)
    critics = {name: (critic, torch.optim.Adam(critic.parameters(), lr=cfg[hybrid.CRITICS[name][1]],
                                               betas=(0.5, 0.999)),
                      cfg[hybrid.CRITICS[name][0]])
               for name, critic in modules.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    dataset = TensorDataset(images.cpu().float().div(255).unsqueeze(1))
    batches = [iter(DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True, drop_last=True))]

    def step():
        torch.set_flush_denormal(False)  # one of our CPU settings (speed.settings): not the naive loop's
        try:
            (x,) = next(batches[0])
        except StopIteration:
            batches[0] = iter(DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True, drop_last=True))
            (x,) = next(batches[0])
        x = x.to(device)
        loss, scored = naive_loss(model, x, cfg)
        for name, (real, made) in scored.items():
            critic, critic_optimizer, weight = critics[name]
            critic_optimizer.zero_grad(set_to_none=True)
            naive_critic_loss(critic, real, made).backward()
            critic_optimizer.step()
            loss = loss + weight * naive_fooled(critic, made)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        speed.settings(device)
    return step


def interleaved_ms_per_step(steps_by_name, device, steps, repeats):
    """Median ms per step of each step function, timed in turns so that drift hits all alike.
    Also the first step's seconds (which includes compiling, where there is any)."""
    first, times = {}, {name: [] for name in steps_by_name}
    for name, step in steps_by_name.items():
        started = time.perf_counter()
        step()
        sync(device)
        first[name] = time.perf_counter() - started
        for _ in range(3):
            step()
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - started) / steps)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}, first


def one_thread_ratio(images, device, cfg, steps, repeats):
    """Both loops again with one intra-op thread: how much each gains from the machine's other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms, _ = interleaved_ms_per_step({"ours": our_step(images, device, cfg),
                                         "naive": naive_step(images, device, cfg)},
                                        device, steps, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"ours_ms_per_step": ms["ours"], "naive_ms_per_step": ms["naive"],
            "ratio": ms["naive"] / ms["ours"]}


def multiply_adds_per_image(model):
    """Multiply-adds of one forward pass, counted from the conv and linear layer shapes."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            total[0] += output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            total[0] += inputs[0][0].numel() * module.out_channels * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d,
            nn.ConvTranspose2d))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return total[0]


def matmul_flops(device, n, repeats, dtype):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, repeats, warmup=2)


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def status_bytes(field):
    """VmRSS (resident now) or VmHWM (resident at the peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss():
    """Returns the resident bytes now, after resetting the kernel's peak mark to it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def time_mmd(form, n, d, device, repeats):
    """(median seconds, peak extra bytes) of one MMD^2 of two (n, d) sets, without gradients."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g).to(device), torch.randn(n, d, generator=g).to(device)
    fn = (lambda: mmd(x, y)) if form == "ours" else (lambda: mmd_expanded(x, y, [1.0], 2.0 * d))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    with torch.inference_mode():
        seconds = median_seconds(fn, device, repeats, warmup=0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else status_bytes("VmHWM")) - base
    return seconds, max(peak, 0)


def bench(device, quick, data_dir, train_options):
    cfg = {**train.DEFAULTS, **train_options}
    train.validate(cfg)
    repeats, steps = (3, 5) if quick else (7, 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results = {"device": name or f"{device.type} ({torch.get_num_threads()} threads)",
               "torch": torch.__version__, **train_options}
    images = data.load(cfg["dataset"], data_dir, device)["train"][0]
    speed.settings(device)
    cfg["precision"], speedup = train.resolve_precision(cfg, device)  # as train.py would, once

    # Each optimisation switched, against train.py's step ("ours": fused Adam, bf16 autocast on CPUs
    # where it pays, a CUDA graph on CUDA).
    candidates = {"ours": our_step(images, device, cfg), "naive": naive_step(images, device, cfg),
                  "fp32_foreach_adam": our_step(images, device, cfg, foreach_adam=True, precision="fp32",
                                                cuda_graph=False),
                  "fp32_fused_adam": our_step(images, device, cfg, precision="fp32", cuda_graph=False),
                  "plus_channels_last": our_step(images, device, cfg, channels_last=True)}
    # Not on a CPU without oneDNN's bf16 kernels: emulated, a step took 2.8 s against 0.2 s in fp32, 4 minutes
    # of a run.
    if device.type != "cpu" or speed.bf16_kernels():
        candidates["bf16_fused_adam"] = our_step(images, device, cfg, precision="bf16", cuda_graph=False)
    # What the loss terms beyond the first default's cost: the step without the latent critic, without the
    # critic, and without both and the pixel MMD.
    if cfg["latent_adv_weight"] > 0:
        candidates["without_latent_critic"] = our_step(images, device, cfg, latent_adv_weight=0.0)
    if cfg["adv_weight"] > 0:
        candidates["without_critic"] = our_step(images, device, cfg, adv_weight=0.0)
        # The critic with convolutions half as wide (the thirtieth round of the prior gap: faster, worse
        # samples).
        candidates["half_width_critic"] = our_step(images, device, cfg,
                                                   critic_channels=max(1,
                                                           hybrid.critic_width(cfg["channels"],
                                                                   cfg["critic_channels"]) // 2))
    if cfg["ema_decay"] > 0:
        candidates["without_average"] = our_step(images, device, cfg, ema_decay=0.0)
    if cfg["adv_weight"] > 0 or cfg["pixel_mmd_weight"] > 0 or cfg["latent_adv_weight"] > 0:
        candidates["plain_loss"] = our_step(images, device, cfg, adv_weight=0.0, pixel_mmd_weight=0.0,
                                            latent_adv_weight=0.0)
    if not quick:
        candidates["plus_compile"] = our_step(images, device, cfg, compile_step=True, cuda_graph=False)
    if device.type == "cuda":
        candidates["bf16_cuda_graph"] = our_step(images, device, cfg, precision="bf16")
    ms, first = interleaved_ms_per_step(candidates, device, steps, repeats)
    ours, naive = ms["ours"] / 1000, ms["naive"] / 1000
    results["precision"] = speed.precision_name(device, cfg["precision"], speedup)
    results["train"] = {"ours_images_per_s": cfg["batch_size"] / ours, "ours_ms_per_step": 1000 * ours,
                        "naive_images_per_s": cfg["batch_size"] / naive, "naive_ms_per_step": 1000 * naive,
                        "ratio": naive / ours}
    results["variants"] = {name: {"ms_per_step": ms[name], "first_step_s": first[name]}
                           for name in candidates if name != "naive"}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        results["one_thread"] = one_thread_ratio(images, device, cfg, steps, repeats)

    macs = multiply_adds_per_image(default_model(device, cfg)[0])
    achieved = 6 * macs * cfg["batch_size"] / ours
    # Against a matmul in the precision the step computes in (bf16 where autocast is on).
    dtype = speed.autocast_dtype(device, cfg["precision"]) or torch.float32
    peak = matmul_flops(device, 8192 if device.type == "cuda" else 2048, repeats, dtype)
    results["flops"] = {"multiply_adds_per_image": macs, "train_flops_per_s": achieved,
                        "matmul_dtype": str(dtype),
                        "matmul_flops_per_s": peak, "percent_of_matmul": 100 * achieved / peak}

    sizes = (1024, 4096) if quick else (4096, 16384)
    results["mmd"] = {str(n): {} for n in sizes}
    for form in ("ours", "expanded"):
        for n in sizes:
            need = 2 * n * n * 64 * 4  # the expanded form's difference tensor and its square
            if form == "expanded" and need > 0.8 * available_bytes(device):
                results["mmd"][str(n)][form] = {"skipped": f"needs about {need / 2**30:.0f} GiB"}
                continue
            seconds, peak_bytes = time_mmd(form, n, 64, device, repeats=2 if form == "expanded" else repeats)
            results["mmd"][str(n)][form] = {"seconds": seconds, "peak_gib": peak_bytes / 2**30}

    model = default_model(device, cfg)[0].eval()
    z = torch.randn(10000, cfg["latent_dim"], device=device)

    def decode_all():
        with torch.inference_mode():
            for chunk in z.split(1000):
                model.decode(chunk)
    results["sampling_images_per_s"] = len(z) / median_seconds(decode_all, device, repeats)
    return results


def print_table(r):
    t = r["train"]
    print(f"device: {r['device']}, torch {r['torch']}, {r['precision']}, model latent {r['latent_dim']} "
          f"channels {r['channels']} "
          f"hidden {r['hidden']}, batch {r['batch_size']}, pixel_mmd_weight "
          f"{r.get('pixel_mmd_weight', 0.0)}, "
          # absent: made before the option
          f"adv_weight {r.get('adv_weight', 0.0)}, latent_adv_weight {r.get('latent_adv_weight', 0.0)}")
    print(f"train   ours  {t['ours_images_per_s']:9.0f} images/s  {t['ours_ms_per_step']:7.2f} ms/step")
    print(f"        naive {t['naive_images_per_s']:9.0f} images/s  {t['naive_ms_per_step']:7.2f} ms/step   "
          f"ours/naive {t['ratio']:.2f}x")
    if "one_thread" in r:
        o = r["one_thread"]
        print(f"        1 thread:  ours {o['ours_ms_per_step']:.2f} ms/step, naive "
              f"{o['naive_ms_per_step']:.2f} ms/step, "
              f"ours/naive {o['ratio']:.2f}x")
    for name, v in r["variants"].items():
        extra = f"  (first step {v['first_step_s']:.1f}s)" if "first_step_s" in v else ""
        print(f"        {name:<19}{v['ms_per_step']:7.2f} ms/step{extra}")
    f = r["flops"]
    print(f"flops   {f['multiply_adds_per_image'] / 1e6:.2f}M multiply-adds/image; training "
          f"{f['train_flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"= {f['percent_of_matmul']:.1f}% of a {f['matmul_dtype'].split('.')[-1]} matmul's "
          f"{f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s")
    for n, row in r["mmd"].items():
        cells = [f"{form} " + (f"{v['seconds'] * 1000:.0f} ms, {v['peak_gib']:.2f} GiB" if "seconds" in v
                               else v["skipped"])
                 for form, v in row.items()]
        print(f"mmd     N=M={n}, D=64: " + " | ".join(cells))
    print(f"sample  {r['sampling_images_per_s']:.0f} images/s decoded")


def main(argv):
    cfg, _ = parse_overrides(DEFAULTS, argv, "bench.py")
    results = bench(pick_device(cfg["device"]), cfg["quick"], cfg["data_dir"],
                    {k: cfg[k] for k in TRAIN_OPTIONS})
    print_results(results, cfg["json"], print_table)


if __name__ == "__main__":
    run(main)
