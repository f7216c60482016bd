"""Detokenize the engine's output ids into ``text_output`` (written for triage).

TOKENS_BATCH ``[batch, beam, n]`` and SEQUENCE_LENGTH ``[batch, beam]`` → OUTPUT ``[batch, beam]``
strings. While streaming, each call gets only the new tokens of one step; a SentencePiece piece
that starts a word ("▁word") keeps its leading space, which ``decode`` alone would drop at the
start of a chunk, so the streamed chunks concatenate to the same text as one final answer.
``transformers`` is imported in ``initialize`` only (the unit tests check the pure helpers).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import triton_python_backend_utils as pb_utils

WORD_START = "\u2581"  # SentencePiece's "▁"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def convert_ids_to_tokens(self, ids: int) -> str: ...


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def decode_chunk(decoder: Decoder, ids: list[int], skip_special_tokens: bool) -> str:
    """``decode(ids)``, keeping the leading space of a SentencePiece word-start piece."""
    if not ids:
        return ""
    text = decoder.decode(ids, skip_special_tokens=skip_special_tokens)
    first = decoder.convert_ids_to_tokens(ids[0])
    if isinstance(first, str) and first.startswith(WORD_START) and not text.startswith(" "):
        text = " " + text
    return text


def decode_batch(
    decoder: Decoder, tokens: np.ndarray, lengths: np.ndarray, skip_special_tokens: bool
) -> np.ndarray:
    """OUTPUT ``[batch, beam]`` (object array of UTF-8 bytes) for the engine's outputs."""
    batch, beams = tokens.shape[0], tokens.shape[1]
    out = np.empty((batch, beams), dtype=object)
    for b in range(batch):
        for k in range(beams):
            ids = tokens[b, k, : int(lengths[b, k])].tolist()
            out[b, k] = decode_chunk(decoder, ids, skip_special_tokens).encode("utf-8")
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        params = model_parameters(json.loads(args["model_config"]))
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], legacy=False)
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() == "true"

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
                text = decode_batch(self.tokenizer, tokens, lengths, self.skip_special_tokens)
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)])
                )
            except Exception as exc:  # one bad request must not fail the batch
                error = pb_utils.TritonError(f"postprocessing: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
