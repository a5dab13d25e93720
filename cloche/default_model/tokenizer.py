"""The default model's tokenizer: byte-level BPE trained on the corpus's training split.

Byte-level BPE never meets an unknown character, and a vocabulary of a few thousand keeps the
embedding (tied with the unembedding) a small share of a small model. The result is saved as a
``PreTrainedTokenizerFast`` (``tokenizer.json`` plus its config), so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it with the right bos/eos/pad.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["EOS", "PAD", "VOCAB_SIZE", "save", "train_tokenizer", "wrap"]

EOS = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE; the special tokens get ids 0 (``EOS``, also bos) and 1 (``PAD``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def wrap(tok: Tokenizer):
    """Wrap as a ``PreTrainedTokenizerFast`` with bos = eos = ``EOS`` and pad = ``PAD``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def save(tok: Tokenizer, directory: Path) -> None:
    """Save in the Hugging Face layout that ``AutoTokenizer.from_pretrained`` reads."""
    wrap(tok).save_pretrained(str(directory))
