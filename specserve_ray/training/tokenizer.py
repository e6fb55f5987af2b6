"""The pair's shared tokenizer: byte-level BPE, vocabulary 4096, `<|endoftext|>` as BOS/EOS/pad.

The recipe reuses the committed pair's tokenizer by default so held-out losses stay
comparable across recipes; this trains a fresh one (`--new-tokenizer`).
"""
from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.model_max_length = 2048
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast
