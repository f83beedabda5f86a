"""Write a random-weight checkpoint of Pythia-1B's shape, for `saepipe bench capture` memory runs.

    python3 benches/reference/pythia1b_shape.py OUT_DIR [--dtype f16|bf16|f32] [--tokenizer FILE]

OUT_DIR gets config.json (EleutherAI/pythia-1b's shape: 16 layers, d_model 2048, 8 heads,
d_ff 8192, vocab 50304, rotary_pct 0.25, parallel residual, untied embed_out),
model.safetensors in --dtype (default f16, as the hub's checkpoint is stored; 2.0 GB) with
N(0, 0.02²) matrices, unit LayerNorm gains and zero biases, and tokenizer.json copied from
--tokenizer (default: the tiny golden fixture's, whose ids are all < 50304). Needs numpy only.
Then, e.g.:

    saepipe bench capture --model local:OUT_DIR --model-dtype f32,bf16 --dtype f32 \\
        --tokens 512 --context-len 128 --batch-size 4
"""

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

D, LAYERS, HEADS, FF, VOCAB = 2048, 16, 8, 8192, 50304
ROOT = Path(__file__).resolve().parents[2]


def shapes():
    yield "gpt_neox.embed_in.weight", (VOCAB, D)
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{ln}.weight", (D,)
            yield f"{p}.{ln}.bias", (D,)
        for name, o, n in [("attention.query_key_value", 3 * D, D), ("attention.dense", D, D),
                           ("mlp.dense_h_to_4h", FF, D), ("mlp.dense_4h_to_h", D, FF)]:
            yield f"{p}.{name}.weight", (o, n)
            yield f"{p}.{name}.bias", (o,)
    yield "gpt_neox.final_layer_norm.weight", (D,)
    yield "gpt_neox.final_layer_norm.bias", (D,)
    yield "embed_out.weight", (VOCAB, D)


def values(name, shape, rng):
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        return np.ones(n, np.float32)
    if name.endswith(".bias"):
        return np.zeros(n, np.float32)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)


def encode(x, dtype):
    if dtype == "f32":
        return x.astype("<f4").tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    # bf16: round to nearest even on the upper 16 bits of the f32 pattern
    u = x.astype("<f4").view("<u4")
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    return u.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    ap.add_argument("--tokenizer", type=Path,
                    default=ROOT / "tests/fixtures/golden/tiny_gpt_neox/tokenizer.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": VOCAB,
        "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": FF, "hidden_act": "gelu", "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
        "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 0, "initializer_range": 0.02,
        "torch_dtype": {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}[a.dtype],
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(a.tokenizer, a.out / "tokenizer.json")
    size = {"f16": 2, "bf16": 2, "f32": 4}[a.dtype]
    st = {"f16": "F16", "bf16": "BF16", "f32": "F32"}[a.dtype]
    header, off, items = {}, 0, list(shapes())
    for name, shape in items:
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    with open(a.out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape in items:
            f.write(encode(values(name, shape, rng), a.dtype))
    print(f"wrote {a.out} ({off / 1e9:.2f} GB of {a.dtype} weights)")


if __name__ == "__main__":
    main()
