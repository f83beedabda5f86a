#!/usr/bin/env python3
"""Plain dense PyTorch reference for `saepipe bench train` (sae_variants.md §8).

Trains a TopK (+AuxK omitted: no dead latents in a few steps) or a ReLU+L1 (April-2024,
norm-weighted penalty) SAE with ordinary autograd, Adam and gradient clipping, at the same
shapes as the Rust bench, on synthetic sparse data, and prints one JSON line with tokens/s.

    python benches/reference/train_sae_torch.py --variant topk --d-in 2048 --d-sae 16384 \
        --batch 4096 --k 64 --steps 3 --threads 2

Decision: torch.set_num_threads(--threads, default 2) as the issue asks; each step does what
a straightforward PyTorch SAE trainer does (dense encode, dense decode, autograd backward,
decoder-gradient projection and renormalisation for TopK, Adam).
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["topk", "relu_l1"], default="topk")
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f, b = a.d_in, a.d_sae, a.batch

    # synthetic sparse data: 32 active unit features per token on average
    n_feat = 4 * d
    dic = torch.nn.functional.normalize(torch.randn(n_feat, d), dim=1)
    data = []
    for _ in range(2):
        mask = torch.rand(b, n_feat) < (32.0 / n_feat)
        coef = (torch.empty(b, n_feat).exponential_() + 0.5) * mask
        data.append(coef @ dic + 0.01 * torch.randn(b, d))
    scale = (d ** 0.5) / data[0].norm(dim=1).mean()
    data = [x * scale for x in data]

    w_dec = torch.nn.functional.normalize(torch.randn(f, d), dim=1)
    if a.variant == "relu_l1":
        w_dec = w_dec * 0.1
    W_dec = torch.nn.Parameter(w_dec.clone())
    W_enc = torch.nn.Parameter(w_dec.t().clone().contiguous())
    b_enc = torch.nn.Parameter(torch.zeros(f))
    b_dec = torch.nn.Parameter(data[0].mean(0).clone())
    params = [W_enc, b_enc, W_dec, b_dec]
    lr = 2e-4 / (f / 16384) ** 0.5 if a.variant == "topk" else 5e-5
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    lam = 5.0

    def step(x):
        if a.variant == "topk":
            pre = (x - b_dec) @ W_enc + b_enc
            vals, idx = pre.topk(a.k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
            xhat = z @ W_dec + b_dec
            loss = (xhat - x).pow(2).sum(-1).mean()
        else:
            z = torch.relu(x @ W_enc + b_enc)
            xhat = z @ W_dec + b_dec
            loss = (xhat - x).pow(2).sum(-1).mean() + lam * (z * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.variant == "topk":
            with torch.no_grad():
                g = W_dec.grad
                g -= (g * W_dec).sum(1, keepdim=True) * W_dec
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if a.variant == "topk":
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=1, keepdim=True)
        return loss.item(), (z != 0).sum(-1).float().mean().item()

    for i in range(a.warmup):
        step(data[i % 2])
    t0 = time.perf_counter()
    l0 = 0.0
    for i in range(a.steps):
        _, l0 = step(data[i % 2])
    dt = time.perf_counter() - t0
    print(json.dumps({"variant": a.variant, "tokens_per_s": a.steps * b / dt, "ms_per_step": 1000 * dt / a.steps,
                      "l0": l0, "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
