"""The shape of a Hugging Face decoder checkpoint, read from its ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelShapeError(ValueError):
    """``config.json`` is missing, unreadable, or lacks a field the plan needs."""


REQUIRED = (
    "num_attention_heads",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
)


@dataclass(frozen=True)
class ModelShape:
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    head_dim: int
    max_position_embeddings: int | None
    model_type: str
    tie_word_embeddings: bool
    checkpoint_quantization: str | None
    """``quantization_config.quant_method`` of a pre-quantised checkpoint (e.g. ``fp8``)."""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelShape:
        # multimodal checkpoints keep the language model under text_config
        text = config.get("text_config") or config
        missing = [key for key in REQUIRED if not isinstance(text.get(key), int)]
        if missing:
            raise ModelShapeError(f"{source} has no integer {', '.join(missing)}")
        heads = text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        quant = config.get("quantization_config") or {}
        return cls(
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            hidden_size=text["hidden_size"],
            num_hidden_layers=text["num_hidden_layers"],
            vocab_size=text["vocab_size"],
            intermediate_size=text["intermediate_size"],
            head_dim=int(head_dim),
            max_position_embeddings=text.get("max_position_embeddings"),
            model_type=str(config.get("model_type", "unknown")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            checkpoint_quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShape:
        path = model_dir / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelShapeError(f"{path} not found (model_dir must be a HF checkpoint)") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelShapeError(f"{path} is not readable JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ModelShapeError(f"{path} is not a JSON object")
        return cls.from_config(config, str(path))

    def layer_params(self) -> tuple[int, int]:
        """(attention, MLP) parameters of one layer: the dense gated-MLP decoder formula
        (Llama, Mistral, Qwen); other architectures are approximated by it."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        attention = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention, mlp

    def parameter_count(self) -> int:
        attention, mlp = self.layer_params()
        embeddings = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embeddings
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return self.num_hidden_layers * (attention + mlp) + embeddings + lm_head + norms
