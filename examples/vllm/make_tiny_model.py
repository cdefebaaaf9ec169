#!/usr/bin/env python3
"""Write a tiny random-weight Llama (hidden 256, 4 layers, 2 KV heads, bf16) with a BPE
tokenizer trained offline, so vLLM can serve it without any model hub.

    python examples/vllm/make_tiny_model.py /tmp/tiny-llama
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

HIDDEN = 256
LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 512
VOCAB = 1024
MAX_POS = 2048

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


def _config(out: Path) -> None:
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1,
                                                            "eos_token_id": 2}))


def _weights(out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

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


def make_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Create the model folder (idempotent: an existing complete folder is kept)."""
    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(out)
    _config(out)
    _weights(out, seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default="/tmp/tiny-llama")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_model(args.out, args.seed))


if __name__ == "__main__":
    main()
