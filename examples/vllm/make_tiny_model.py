#!/usr/bin/env python3
"""Write a tiny random-weight Llama (hidden 256, 4 layers, 2 KV heads, bf16) with a BPE
tokenizer trained offline, so vLLM can serve it without any model hub.

    python examples/vllm/make_tiny_model.py /tmp/tiny-llama
    python examples/vllm/make_tiny_model.py --hybrid /tmp/tiny-hybrid   # sliding-window + full layers
    python examples/vllm/make_tiny_model.py --size bench /tmp/bench-llama # ~200 ms per 1000-token prefill here

`--hybrid` alternates `sliding_attention` / `full_attention` layers (Llama `layer_types`, window
64 tokens): vLLM's hybrid KV-cache manager then keeps two KV-cache groups.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

VOCAB = 1024
MAX_POS = 2048
SLIDING_WINDOW = 64
# name -> (hidden, layers, heads, kv heads, intermediate)
SIZES = {"tiny": (256, 4, 4, 2, 512), "bench": (512, 6, 8, 4, 1024)}
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = SIZES["tiny"]

_CORPUS = (
    "the quick brown fox jumps over the lazy dog while the cache moves between engines . "
    "prefill computes the prompt and decode continues generating tokens one by one . "
    "blocks of keys and values travel over shared memory or tcp to the other process . "
    "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g h i j k l m n o p q r s t u v w x y z ."
)


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": MAX_POS, "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    }))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def _config(out: Path, size: str, hybrid: bool) -> None:
    hidden, layers, heads, kv_heads, inter = SIZES[size]
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if hybrid:
        cfg["sliding_window"] = SLIDING_WINDOW
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1,
                                                            "eos_token_id": 2}))


def _weights(out: Path, seed: int, size: str) -> None:
    import torch
    from safetensors.torch import save_file

    HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = SIZES[size]  # noqa: N806
    g = torch.Generator().manual_seed(seed)
    hd = HIDDEN // HEADS

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN, scale=1.0),
         "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
         "lm_head.weight": rnd(VOCAB, HIDDEN, scale=0.2)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        w[p + "self_attn.q_proj.weight"] = rnd(HEADS * hd, HIDDEN, scale=0.2)
        w[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * hd, HIDDEN, scale=0.2)
        w[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * hd, HIDDEN, scale=0.2)
        w[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * hd)
        w[p + "mlp.gate_proj.weight"] = rnd(INTERMEDIATE, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rnd(INTERMEDIATE, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTERMEDIATE)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})


def make_tiny_model(out: str | Path, seed: int = 0, *, size: str = "tiny", hybrid: bool = False) -> Path:
    """Create the model folder (idempotent: an existing complete folder is kept)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(out)
    _config(out, size, hybrid)
    _weights(out, seed, size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default="/tmp/tiny-llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--hybrid", action="store_true", help="alternate sliding-window and full layers")
    args = ap.parse_args()
    print(make_tiny_model(args.out, args.seed, size=args.size, hybrid=args.hybrid))


if __name__ == "__main__":
    main()
