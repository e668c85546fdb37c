"""Tiny random-weight GPT-2, Llama and BERT models saved with the packaged MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from saesweep.collect.model import model_path

VOCAB = 30522


def build(family: str, root: Path) -> Path:
    """Save a tiny model of `family` (gpt2, llama, bert) under root and return its directory."""
    out = root / family
    if out.exists():
        return out
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=3, n_head=2)
        )
    elif family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=256,
            )
        )
    elif family == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
            )
        )
    else:
        raise ValueError(family)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path("demo")).save_pretrained(out)
    return out
