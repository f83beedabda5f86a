#!/usr/bin/env python3
"""Load saepipe's SAELens-v6 exports with SAELens itself and compare encode/decode with ours.

Not part of `make test` (needs the reference venv with sae-lens). Usage:

    # 1. write the exports and our outputs (one folder per variant)
    SAEPIPE_INTEROP_DIR=/tmp/interop cargo test --test sae_export
    # 2. compare
    /work/.venv-ref/bin/python tests/interop/check_saelens.py /tmp/interop

For every `<dir>/<variant>/` it runs `SAE.load_from_disk` (for our own `bi_jumprelu`
and `abs_topk` architectures, the README formula in torch), encodes the stored raw inputs `x`,
decodes, and compares with our dense codes `feats` and reconstructions `recon`
(`io.safetensors`). Exits non-zero on any mismatch.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from sae_lens import SAE
import sae_lens


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/interop")
    failures = 0
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    for d in sorted(p for p in root.iterdir() if (p / "cfg.json").exists()):
        cfg = json.loads((d / "cfg.json").read_text())
        if cfg["architecture"] == "kmeans":
            # saepipe's own k-means baselines: no SAELens architecture (README, "SAEs").
            print(f"{d.name:10s} arch=kmeans    skipped (not a SAELens architecture)")
            continue
        io = load_file(str(d / "io.safetensors"))
        if cfg["architecture"] == "bi_jumprelu":
            # Our own architecture (SA-GSAE): the README formula, computed independently.
            w = load_file(str(d / "sae_weights.safetensors"))
            m = io["x"] @ w["W_enc"] + w["b_enc"]
            feats = m * ((m > w["threshold_pos"]) | (m < w["threshold_neg"]))
            recon = feats @ w["W_dec"] + w["b_dec"]
            sae = None
        elif cfg["architecture"] == "abs_topk":
            # Our own architecture (AbsTopK): the README formula, computed independently.
            w = load_file(str(d / "sae_weights.safetensors"))
            m = (io["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
            top = m.abs().topk(cfg["k"], dim=-1).indices
            feats = torch.zeros_like(m).scatter(-1, top, m.gather(-1, top))
            recon = feats @ w["W_dec"] + w["b_dec"]
            sae = None
        else:
            sae = SAE.load_from_disk(str(d), device="cpu")
            sae.eval()
            with torch.no_grad():
                feats = sae.encode(io["x"])
                recon = sae.decode(feats)
        same_support = torch.equal(feats != 0, io["feats"] != 0)
        df = (feats - io["feats"]).abs().max().item()
        dr = (recon - io["recon"]).abs().max().item()
        scale = io["recon"].abs().max().item()
        ok = same_support and df <= 1e-4 * max(1.0, io["feats"].abs().max().item()) and dr <= 1e-4 * max(1.0, scale)
        failures += not ok
        print(f"{d.name:10s} arch={cfg['architecture']:9s} class={type(sae).__name__:12s} "
              f"same_support={same_support} max|dfeat|={df:.2e} max|drecon|={dr:.2e} "
              f"L0={float((feats != 0).sum(-1).float().mean()):.2f} {'OK' if ok else 'MISMATCH'}")
    if failures:
        print(f"{failures} mismatches")
        sys.exit(1)
    print("all match")


if __name__ == "__main__":
    main()
