#!/usr/bin/env python3
"""Reference forward-pass throughput of Hugging Face transformers on SmolLM2-135M (GGUF, f32, CPU).

The baseline that saepipe's capture forward is compared against (issue 2 item 6). Loads the GGUF
with transformers (dequantised to f32, see tests/fixtures/gen_golden_gguf.py), pins torch to
2 threads (the machine size), warms up, then times forward passes under torch.inference_mode on
random token ids (ids drawn from the vocabulary; content does not change the cost).

    /work/.venv-ref/bin/python benches/reference/forward_tps.py \\
        --gguf data/models/SmolLM2-135M-Instruct.Q4_1.gguf --batch 4 --seq 128 [--stop-layer 15]

--stop-layer L keeps blocks 0..=L and calls the decoder stack (model.model) without the final
norm (replaced by Identity) and lm_head: the fair comparison to a capture forward that stops
after block L.

Prints one machine-readable line last:
    transformers_tokens_per_s=<float> layers=<n>
tokens/s = batch * seq / median seconds per forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--stop-layer", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa|eager)")
    args = ap.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"error: {args.gguf} not found; run scripts/fetch_smollm2.sh first")
    if args.batch < 1 or args.seq < 1 or args.repeats < 1:
        sys.exit("error: --batch, --seq and --repeats must be >= 1")

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32, attn_implementation=args.attn
    )
    model.eval()
    n_layers = model.config.num_hidden_layers
    if args.stop_layer is not None:
        if not 0 <= args.stop_layer < n_layers:
            sys.exit(f"error: --stop-layer must be in 0..{n_layers - 1}")
        model.model.layers = model.model.layers[: args.stop_layer + 1]
        model.model.config.num_hidden_layers = args.stop_layer + 1
        model.model.norm = torch.nn.Identity()
        run = model.model  # decoder stack only: no lm_head
    else:
        run = model
    layers = len(model.model.layers)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)

    def forward() -> None:
        out = run(input_ids=ids, use_cache=False)
        # Touch the result so nothing is left lazy.
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).sum().item()

    times = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            forward()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tps = args.batch * args.seq / med
    print(f"# batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} attn={args.attn} "
          f"torch={torch.__version__} seconds/forward median={med:.4f} min={min(times):.4f} max={max(times):.4f}",
          file=sys.stderr)
    print(f"transformers_tokens_per_s={tps:.1f} layers={layers}")


if __name__ == "__main__":
    main()
