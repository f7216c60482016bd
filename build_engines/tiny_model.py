"""A tiny Llama-architecture checkpoint made locally: no hub download, ever.

The tokenizer is a byte-level BPE trained (``tokenizers``) on this repository's own Markdown, so
it encodes any text; the weights are random (``transformers`` + ``torch``, seeded) and saved as
safetensors with a Hugging Face ``config.json``. Good for exercising conversion, TP sharding,
engine build and serving; the text it generates is noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.paths import REPO_ROOT

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__"}


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    vocab_size: int = 1024


def corpus(root: Path = REPO_ROOT) -> Iterator[str]:
    """The repository's Markdown files (local text, deterministic order)."""
    for path in sorted(root.rglob("*.md")):
        if SKIP_DIRS.isdisjoint(path.relative_to(root).parts):
            yield path.read_text(errors="replace")


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``SPECIAL_TOKENS`` (ids 0..3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_tiny_llama(dest: Path, shape: TinyShape | None = None, seed: int = 0) -> Path:
    """Tokenizer + random-weight Llama in ``dest`` (a Hugging Face checkpoint directory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = shape or TinyShape()
    dest.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus(), shape.vocab_size),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(dest, safe_serialization=True)
    return dest
