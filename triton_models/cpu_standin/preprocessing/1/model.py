"""CPU stand-in for the stock ``preprocessing`` step of NVIDIA's ensemble (python, not decoupled).

The stock step tokenizes ``QUERY`` into ``INPUT_ID`` / ``REQUEST_INPUT_LEN`` for the
``tensorrt_llm`` step. Here a token is a word or a punctuation mark (``\\w+|[^\\w\\s]``, the
gateway's rule too) and its id a CRC32 of it (31 bits); the stop words go on as text
(``STOP_WORDS``), which the stand-in engine matches against the text it generates. Like any
non-decoupled model, Triton counts its ``nv_inference_request_success`` when ``execute``
returns: the requests handed to the engine step.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _text(request: Any, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [
        v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)
    ]


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            query = " ".join(_text(request, "QUERY"))
            ids = [zlib.crc32(t.encode()) & 0x7FFFFFFF for t in TOKEN_RE.findall(query)] or [0]
            out_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN")
            stops = [s for s in _text(request, "STOP_WORDS_DICT") if s] or [""]
            tensors = [
                pb_utils.Tensor("INPUT_ID", np.array([ids], dtype=np.int32)),
                pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], dtype=np.int32)),
                pb_utils.Tensor(
                    "REQUEST_OUTPUT_LEN", out_len.as_numpy().reshape(1, 1).astype(np.int32)
                ),
                pb_utils.Tensor(
                    "STOP_WORDS", np.array([[s.encode() for s in stops]], dtype=np.object_)
                ),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
