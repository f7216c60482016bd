"""Tokenize the ensemble's text inputs for the TensorRT-LLM engine (written for triage).

QUERY (text) → INPUT_ID (padded ids) + REQUEST_INPUT_LEN; STOP_WORDS_DICT / BAD_WORDS_DICT (lists
of strings) → the engine's word-list tensors ``[batch, 2, n]`` (row 0 the concatenated token ids,
row 1 the end offset of each word, padded with 0 / -1); END_ID / PAD_ID default to the tokenizer's
EOS / PAD. The tokenizer (``transformers.AutoTokenizer``) is imported in ``initialize`` only, so
this module imports without transformers (the unit tests check the pure helpers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import triton_python_backend_utils as pb_utils


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def as_texts(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def word_list(encoder: Encoder, batches: Sequence[Sequence[str]]) -> np.ndarray:
    """The engine's word-list format for one list of words per batch item: int32 ``[b, 2, n]``."""
    ids: list[list[int]] = []
    offsets: list[list[int]] = []
    for words in batches:
        flat: list[int] = []
        ends: list[int] = []
        for word in words:
            tokens = encoder.encode(word, add_special_tokens=False)
            if tokens:
                flat += tokens
                ends.append(len(flat))
        ids.append(flat)
        offsets.append(ends)
    width = max((len(row) for row in ids), default=0)
    if width == 0:
        return np.zeros((len(batches), 2, 0), dtype=np.int32)
    out = np.zeros((len(batches), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, (flat, ends) in enumerate(zip(ids, offsets, strict=True)):
        out[i, 0, : len(flat)] = flat
        out[i, 1, : len(ends)] = ends
    return out


def pad_ids(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids ``[b, max_len]`` right-padded with ``pad_id``, lengths ``[b, 1]``), both int32."""
    longest = max((len(s) for s in sequences), default=0)
    ids = np.full((len(sequences), max(longest, 1)), pad_id, dtype=np.int32)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
    lengths = np.array([[len(s)] for s in sequences], dtype=np.int32)
    return ids, lengths


def per_item(values: np.ndarray | None, batch: int, default: int) -> np.ndarray:
    """An optional ``[b, 1]`` int input, or ``default`` for every item."""
    if values is None:
        return np.full((batch, 1), default, dtype=np.int32)
    return values.reshape(batch, 1).astype(np.int32)


def words_per_item(values: np.ndarray | None, batch: int) -> list[list[str]]:
    """An optional ``[b, n]`` string input as one word list per item (empty when absent)."""
    if values is None:
        return [[] for _ in range(batch)]
    return [as_texts(row) for row in values.reshape(batch, -1)]


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        params = model_parameters(json.loads(args["model_config"]))
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], legacy=False)
        self.add_special_tokens = params.get("add_special_tokens", "true").lower() == "true"
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos if eos is not None else 0)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_id)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # one bad request must not fail the batch
                error = pb_utils.TritonError(f"preprocessing: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def _one(self, request: Any) -> Any:
        queries = _input(request, "QUERY")
        if queries is None:
            raise ValueError("text_input is required")
        batch = queries.shape[0]
        texts = as_texts(queries)
        sequences = [
            self.tokenizer.encode(t, add_special_tokens=self.add_special_tokens) for t in texts
        ]
        input_ids, input_lengths = pad_ids(sequences, self.pad_id)
        output_len = _input(request, "REQUEST_OUTPUT_LEN")
        if output_len is None:
            raise ValueError("max_tokens is required")
        stop = _input(request, "STOP_WORDS_DICT")
        bad = _input(request, "BAD_WORDS_DICT")
        tensors = {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": input_lengths,
            "REQUEST_OUTPUT_LEN": output_len.reshape(batch, 1).astype(np.int32),
            "STOP_WORDS_IDS": word_list(self.tokenizer, words_per_item(stop, batch)),
            "BAD_WORDS_IDS": word_list(self.tokenizer, words_per_item(bad, batch)),
            "OUT_END_ID": per_item(_input(request, "END_ID"), batch, self.end_id),
            "OUT_PAD_ID": per_item(_input(request, "PAD_ID"), batch, self.pad_id),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()]
        )
