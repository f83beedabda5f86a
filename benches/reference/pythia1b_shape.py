"""Write a random-weight checkpoint of Pythia-1B's (or SmolLM3-3B's) shape, for memory runs.

    python3 benches/reference/pythia1b_shape.py OUT_DIR [--shape pythia-1b|smollm3-3b] \\
        [--dtype f16|bf16|f32] [--tokenizer FILE]

OUT_DIR gets config.json, model.safetensors in --dtype with N(0, 0.02²) matrices, unit norm
gains and zero biases, and tokenizer.json copied from --tokenizer (default: the tiny golden
fixture's, whose ids are all below either vocabulary). Needs numpy only.

- `pythia-1b` (default): EleutherAI/pythia-1b's shape: 16 layers, d_model 2048, 8 heads,
  d_ff 8192, vocab 50304, rotary_pct 0.25, parallel residual, untied embed_out (default
  dtype f16, as the hub's checkpoint is stored; 2.0 GB).
- `smollm3-3b`: HuggingFaceTB/SmolLM3-3B's shape: 36 layers, d_model 2048, 16 heads, 4 KV
  heads, d_ff 11008, vocab 128256, every 4th layer NoPE, tied embeddings (use
  `--dtype bf16`, the hub checkpoint's dtype; 6.2 GB).

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

ROOT = Path(__file__).resolve().parents[2]
# name: (d_model, layers, heads, kv_heads, d_ff, vocab)
SHAPES = {
    "pythia-1b": (2048, 16, 8, 8, 8192, 50304),
    "smollm3-3b": (2048, 36, 16, 4, 11008, 128256),
}


def neox_tensors(d, layers, ff, vocab):
    yield "gpt_neox.embed_in.weight", (vocab, d)
    for i in range(layers):
        p = f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{ln}.weight", (d,)
            yield f"{p}.{ln}.bias", (d,)
        for name, o, n in [("attention.query_key_value", 3 * d, d), ("attention.dense", d, d),
                           ("mlp.dense_h_to_4h", ff, d), ("mlp.dense_4h_to_h", d, ff)]:
            yield f"{p}.{name}.weight", (o, n)
            yield f"{p}.{name}.bias", (o,)
    yield "gpt_neox.final_layer_norm.weight", (d,)
    yield "gpt_neox.final_layer_norm.bias", (d,)
    yield "embed_out.weight", (vocab, d)


def llama_tensors(d, layers, heads, kv, ff, vocab):
    hd = d // heads
    yield "model.embed_tokens.weight", (vocab, d)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        for name, o, n in [("self_attn.q_proj", heads * hd, d), ("self_attn.k_proj", kv * hd, d),
                           ("self_attn.v_proj", kv * hd, d), ("self_attn.o_proj", d, heads * hd),
                           ("mlp.gate_proj", ff, d), ("mlp.up_proj", ff, d),
                           ("mlp.down_proj", d, ff)]:
            yield f"{p}.{name}.weight", (o, n)
    yield "model.norm.weight", (d,)


def config(shape, torch_dtype):
    d, layers, heads, kv, ff, vocab = SHAPES[shape]
    if shape == "pythia-1b":
        return {
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
            "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ff, "hidden_act": "gelu",
            "rotary_pct": 0.25, "rotary_emb_base": 10000, "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5, "use_parallel_residual": True,
            "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
            "initializer_range": 0.02, "torch_dtype": torch_dtype,
        }
    return {
        "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "vocab_size": vocab,
        "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 65536, "no_rope_layer_interval": 4,
        "use_sliding_window": False, "torch_dtype": torch_dtype,
    }


def tensors(shape):
    d, layers, heads, kv, ff, vocab = SHAPES[shape]
    if shape == "pythia-1b":
        return list(neox_tensors(d, layers, ff, vocab))
    return list(llama_tensors(d, layers, heads, kv, ff, vocab))


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
    ap.add_argument("--shape", choices=sorted(SHAPES), default="pythia-1b")
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    ap.add_argument("--tokenizer", type=Path,
                    default=ROOT / "tests/fixtures/golden/tiny_gpt_neox/tokenizer.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}[a.dtype]
    (a.out / "config.json").write_text(json.dumps(config(a.shape, torch_dtype), indent=2) + "\n")
    shutil.copy(a.tokenizer, a.out / "tokenizer.json")
    size = {"f16": 2, "bf16": 2, "f32": 4}[a.dtype]
    st = {"f16": "F16", "bf16": "BF16", "f32": "F32"}[a.dtype]
    header, off, items = {}, 0, tensors(a.shape)
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
    print(f"wrote {a.out} ({a.shape}, {off / 1e9:.2f} GB of {a.dtype} weights)")


if __name__ == "__main__":
    main()
