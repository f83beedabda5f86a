#!/usr/bin/env python3
"""`make bench-quality` (issue 16 item 1): peer SAE recipes on saepipe's own activations.

Reads one hookpoint of a saepipe run folder (the training split in file order, shuffled
with --seed, and the held-out split), trains TopK SAEs of the same width, k, batch and
tokens as the run's, and prints pooled R² and L0 on the held-out split beside saepipe's own
numbers from `results/metrics.parquet` (mean over the seeds the run holds, per optimizer):

- sparsify: EleutherAI sparsify's default recipe (its trainer's `signum`): its `SparseCoder`
  (kaiming encoder, decoder = encoder rows normalised, no AuxK: `auxk_alpha = 0`), `b_dec`
  = the first batch's mean, `set_decoder_norm_to_unit_norm()` before every forward, loss
  FVU, `remove_gradient_parallel_to_decoder_directions()`, then
  `ScheduleFreeWrapper(SignSGD(lr = 5e-3/√(W/2^14)), momentum = 0.95)`; evaluated at the
  averaged point x (`optimizer.eval()`, what sparsify saves). Its trainer needs a model to
  hook, so the loop is reproduced here with its own classes, on our activations.
  Column `sparsify x̂` is the same SAE with the decoder rows of x renormalised (what
  saepipe's `signum` evaluates; sparsify saves x as it is).
- adam: the same SAE and loop with torch's Adam at 2e-4/√(W/2^14), constant (no warmup or
  decay: sparsify's own Adam path warms up over 1000 steps, longer than these runs).

    SPARSIFY_DISABLE_TRITON=1 .venv-ref/bin/python benches/reference/quality.py \
        --run data/quality-smollm2 --hookpoint blocks.15.hook_mlp_out --k 16,32,64

Needs torch, eai-sparsify, schedulefree, pyarrow, numpy (../shared/reference-python.md).
R² and L0 are as saepipe's metrics define them (src/eval/mod.rs): raw activation space,
SST = Σ_j (Σ_t x_tj² − (Σ_t x_tj)²/N) and SSE in float64, L0 = mean non-zeros per token.
"""
import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np
import pyarrow.parquet as pq
import torch


def read_split(folder):
    files = sorted(glob.glob(os.path.join(folder, "part-*.parquet")))
    if not files:
        sys.exit(f"no part-*.parquet in {folder}: run `saepipe capture` (or `saepipe run`) first")
    t = pq.read_table(files, columns=["act"])
    col = t.column("act").combine_chunks()
    d = col.type.list_size
    vals = col.flatten().to_numpy(zero_copy_only=False)
    meta = pq.read_schema(files[0]).metadata or {}
    if meta.get(b"dtype") == b"bfloat16":
        vals = (vals.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(vals.astype(np.float32).reshape(-1, d))


def find_split(run, hookpoint, held_out):
    base = os.path.join(run, "activations")
    if held_out:
        cands = [os.path.join(base, hookpoint, "eval"), os.path.join(base, "eval", hookpoint)]
    else:
        cands = [os.path.join(base, hookpoint)]
    for c in cands:
        if glob.glob(os.path.join(c, "part-*.parquet")):
            return c
    sys.exit(f"no {'held-out' if held_out else 'training'} activations of {hookpoint} under {base}")


@torch.no_grad()
def evaluate(sae, x, renorm=False, chunk=4096):
    w_dec = sae.W_dec.data.clone()
    if renorm:
        sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True)
    n, d = x.shape
    sse = 0.0
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    nnz = 0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    for i in range(0, n, chunk):
        xb = x[i : i + chunk]
        acts, idx, _ = sae.encode(xb)
        out = sae.decode(acts, idx)
        sse += float(((xb - out).double() ** 2).sum())
        s1 += xb.double().sum(0)
        s2 += (xb.double() ** 2).sum(0)
        nz = acts != 0
        nnz += int(nz.sum())
        fired[idx[nz]] = True
    sae.W_dec.data = w_dec
    sst = float((s2 - s1 * s1 / n).sum())
    return {"r2": 1.0 - sse / sst, "l0": nnz / n, "dead": 1.0 - float(fired.float().mean())}


def train(kind, x, width, k, batch, seed):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(seed)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=width, k=k), "cpu", dtype=torch.float32)
    if kind == "sparsify":
        lr = 5e-3 / (width / 2**14) ** 0.5
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
    else:
        lr = 2e-4 / (width / 2**14) ** 0.5
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
    steps = x.shape[0] // batch
    for step in range(steps):
        xb = x[step * batch : (step + 1) * batch]
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(xb)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    if kind == "sparsify":
        opt.eval()  # parameters -> the averaged point x (what sparsify saves)
    else:
        sae.set_decoder_norm_to_unit_norm()
    return sae, steps


def saepipe_rows(run, hookpoint, width, ks):
    path = os.path.join(run, "results", "metrics.parquet")
    if not os.path.exists(path):
        return {}
    t = pq.read_table(path).to_pylist()
    out = {}
    for r in t:
        if r["hookpoint"] != hookpoint or r["arch"] != "topk" or r["d_sae"] != width:
            continue
        k = int(r["sparsity_value"])
        if k not in ks or r["r2"] is None:
            continue
        out.setdefault((r["optimizer"], k), []).append((r["r2"], r["l0"], r["train_tokens"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a saepipe run folder (data/<run.name>)")
    ap.add_argument("--hookpoint", default="blocks.15.hook_mlp_out")
    ap.add_argument("--k", default="16,32,64")
    ap.add_argument("--width", type=int, default=2304)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=0, help="training tokens (0 = the whole training split, one pass)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed of the training split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ks = [int(v) for v in a.k.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    xtr = read_split(find_split(a.run, a.hookpoint, False))
    xev = torch.from_numpy(read_split(find_split(a.run, a.hookpoint, True)))
    perm = np.random.default_rng(a.seed).permutation(xtr.shape[0])
    xtr = torch.from_numpy(xtr[perm])
    if a.tokens:
        if a.tokens > xtr.shape[0]:
            sys.exit(f"--tokens {a.tokens} is more than the {xtr.shape[0]} training rows")
        xtr = xtr[: a.tokens]
    ours = saepipe_rows(a.run, a.hookpoint, a.width, ks)
    optimizers = sorted({o for o, _ in ours})
    print(
        f"{a.run} {a.hookpoint}: {xtr.shape[0]} training tokens (d_in {xtr.shape[1]}), "
        f"{xev.shape[0]} held-out; width {a.width}, batch {a.batch}; seeds {seeds}"
    )
    rows = []
    for k in ks:
        row = {"k": k}
        for o in optimizers:
            v = ours.get((o, k), [])
            if v:
                row[f"saepipe {o}"] = {
                    "r2": float(np.mean([r[0] for r in v])),
                    "l0": float(np.mean([r[1] for r in v])),
                    "n": len(v),
                    "tokens": v[0][2],
                }
        for kind in ["sparsify", "adam"]:
            res, res_n, secs = [], [], 0.0
            for s in seeds:
                t0 = time.time()
                sae, steps = train(kind, xtr, a.width, k, a.batch, s)
                secs += time.time() - t0
                res.append(evaluate(sae, xev))
                if kind == "sparsify":
                    res_n.append(evaluate(sae, xev, renorm=True))
            mean = lambda rs, key: float(np.mean([r[key] for r in rs]))
            row[kind] = {"r2": mean(res, "r2"), "l0": mean(res, "l0"), "dead": mean(res, "dead"),
                         "r2_seeds": [r["r2"] for r in res], "tokens": steps * a.batch,
                         "seconds": secs / len(seeds)}
            if res_n:
                row["sparsify x̂"] = {"r2": mean(res_n, "r2"), "l0": mean(res_n, "l0")}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    cols = [f"saepipe {o}" for o in optimizers] + ["sparsify", "sparsify x̂", "adam"]
    print("| k | " + " | ".join(f"{c} R² (L0)" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v['r2']:.3f} ({v['l0']:.1f})" if v else "–")
        print(f"| {row['k']} | " + " | ".join(cells) + " |")
    seen = {v["tokens"] for r in rows for c, v in r.items() if c.startswith("saepipe")}
    if seen and seen != {xtr.shape[0] // a.batch * a.batch}:
        print(f"note: saepipe trained on {sorted(seen)} tokens, the references on {xtr.shape[0] // a.batch * a.batch}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
