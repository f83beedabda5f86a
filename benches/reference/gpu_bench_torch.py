#!/usr/bin/env python3
"""PyTorch/transformers rows of `saepipe bench gpu` (issue 13 item 5): the anchor beside ours.

    python benches/reference/gpu_bench_torch.py --device cuda forward \\
        --config-json '{"model_type": "gpt_neox", ...}' --dtype bf16 --batch 32 --seq 1024 \\
        [--stop-layer 8] [--iters 3] [--warmup 1]
    python benches/reference/gpu_bench_torch.py --device cuda train \\
        --d-in 2048 --d-sae 16384 --k 64 --batch 4096 --dtype bf16 [--steps 5] [--warmup 1]

forward: a random-weight transformers model built from the same config.json saepipe builds
(GPTNeoXForCausalLM, or SmolLM3ForCausalLM; LlamaForCausalLM with the same shapes where this
transformers has no SmolLM3), initialised on the device, cast to --dtype, sdpa attention,
under torch.inference_mode. --stop-layer L keeps blocks 0..=L and calls the decoder stack
(model.model / model.gpt_neox) with its final norm replaced by Identity, no lm_head: what a
capture forward that stops after block L does.

train: a TopK SAE step written the straightforward way (dense encode, torch.topk, ReLU,
dense decode, squared error, autograd backward, Adam), parameters in --dtype.

Prints one JSON line last: {"tokens_per_s": ..., "peak_reserved_mib": ..., "peak_allocated_mib":
..., "note": ...}; tokens/s = tokens per pass or step / mean seconds (after --warmup untimed).
Needs only torch (+ transformers for forward): no Rust toolchain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def memory(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"peak_reserved_mib": None, "peak_allocated_mib": None}
    return {
        "peak_reserved_mib": torch.cuda.max_memory_reserved(dev) / 2**20,
        "peak_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2**20,
    }


def build_model(cfg: dict, stop: int | None, dev: torch.device, dtype: torch.dtype):
    import transformers

    cfg = dict(cfg)
    if stop is not None:
        cfg["num_hidden_layers"] = stop + 1
    kind = cfg["model_type"]
    note = ""
    if kind == "gpt_neox":
        conf, cls = transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM
    elif kind == "smollm3" and hasattr(transformers, "SmolLM3ForCausalLM"):
        conf, cls = transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM
    else:
        conf, cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
        note = f"LlamaForCausalLM with the {kind} shapes"
        for key in ("no_rope_layer_interval", "no_rope_layers"):
            cfg.pop(key, None)
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    # Special-token ids inside any vocabulary (the defaults of SmolLM3Config are not).
    kw.setdefault("pad_token_id", None)
    kw.setdefault("bos_token_id", 0)
    kw.setdefault("eos_token_id", 0)
    config = conf(**kw)
    config._attn_implementation = "sdpa"
    with torch.device(dev):
        model = cls(config)
    model = model.to(dtype).eval()
    if stop is not None:
        base = model.gpt_neox if kind == "gpt_neox" else model.model
        if hasattr(base, "final_layer_norm"):
            base.final_layer_norm = torch.nn.Identity()
        if hasattr(base, "norm"):
            base.norm = torch.nn.Identity()
        return base, note
    return model, note


def forward(a, dev: torch.device) -> dict:
    dtype = DTYPES[a.dtype]
    cfg = json.loads(a.config_json)
    model, note = build_model(cfg, a.stop_layer, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        for _ in range(a.warmup):
            model(input_ids=ids)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(a.iters):
            model(input_ids=ids)
        sync(dev)
        secs = (time.perf_counter() - t0) / a.iters
    import transformers

    out = {"tokens_per_s": a.batch * a.seq / secs, **memory(dev)}
    out["note"] = f"transformers {transformers.__version__}, sdpa" + (f"; {note}" if note else "")
    return out


def train(a, dev: torch.device) -> dict:
    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    d, f, b = a.d_in, a.d_sae, a.batch
    w = torch.nn.functional.normalize(torch.randn(f, d, device=dev), dim=1)
    W_dec = torch.nn.Parameter(w.to(dtype))
    W_enc = torch.nn.Parameter(w.t().contiguous().to(dtype))
    b_enc = torch.nn.Parameter(torch.zeros(f, device=dev, dtype=dtype))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=dev, dtype=dtype))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=2e-4)
    xs = [torch.randn(b, d, device=dev).to(dtype) for _ in range(2)]

    def step(x):
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(a.k, dim=1)
        acts = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
        recon = acts @ W_dec + b_dec
        loss = (recon - x).float().pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(a.warmup):
        step(xs[i % 2])
    sync(dev)
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(xs[i % 2])
    sync(dev)
    secs = time.perf_counter() - t0
    return {
        "tokens_per_s": a.steps * b / secs,
        **memory(dev),
        "note": f"torch {torch.__version__}, topk + scatter, Adam; loss {loss.item():.3f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    sub = ap.add_subparsers(dest="what", required=True)
    fw = sub.add_parser("forward")
    fw.add_argument("--config-json", required=True)
    fw.add_argument("--stop-layer", type=int, default=None)
    fw.add_argument("--batch", type=int, default=32)
    fw.add_argument("--seq", type=int, default=1024)
    tr = sub.add_parser("train")
    tr.add_argument("--d-in", type=int, default=2048)
    tr.add_argument("--d-sae", type=int, default=16384)
    tr.add_argument("--k", type=int, default=64)
    tr.add_argument("--batch", type=int, default=4096)
    tr.add_argument("--steps", type=int, default=5)
    for p in (fw, tr):
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("--iters", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    if a.what == "train":
        a.steps = max(a.steps, 1)
    else:
        a.iters = max(a.iters, 1)
    print(json.dumps(forward(a, dev) if a.what == "forward" else train(a, dev)))


if __name__ == "__main__":
    main()
