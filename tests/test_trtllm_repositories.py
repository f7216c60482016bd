"""The TensorRT-LLM Triton repositories triage writes: every config parses with Triton's own
protobuf and carries the settings (queue policy first), every parameter the tensorrtllm backend
reads without a default, the ensemble is wired consistently and uses NVIDIA's stock names, and the python models' logic works (without transformers or
tensorrt_llm, through a stand-in ``triton_python_backend_utils``)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.repository import (
    REQUIRED_ENGINE_PARAMETERS,
    TEMPLATES,
    RepositoryError,
    check_engine_repository,
    read_config,
    write_config,
    write_repository,
)
from build_engines.settings import BuildSettings

REJECT = model_config_pb2.ModelQueuePolicy.REJECT
ENGINE_TEMPLATES = TEMPLATES / "inflight_batcher_llm"
LLMAPI_MODEL = TEMPLATES / "llmapi" / "tensorrt_llm"
SCHEDULED = ("preprocessing", "tensorrt_llm", "postprocessing")
UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
STOCK = json.loads((UPSTREAM / "build_stock_names.json").read_text())
"""NVIDIA's stock all_models names (upstream paths and commits inside)."""
REQUIRED = json.loads((UPSTREAM / "required_parameters.json").read_text())
"""Parameters the tensorrtllm backend reads without a default (upstream paths and commits)."""


def settings(tmp_path: Path, **kw: Any) -> BuildSettings:
    model = tmp_path / "hf-model"
    model.mkdir(exist_ok=True)
    base: dict[str, Any] = {
        "model_dir": model,
        "output_dir": tmp_path / "out",
        "tp_size": 2,
        "max_batch_size": 24,
        "triton": {
            "max_queue_size": 17,
            "queue_timeout_ms": 1234,
            "decoupled": False,
            "gpu_device_ids": [2, 3],
            "tokenizer_dir": str(tmp_path / "tok"),
        },
    }
    return BuildSettings(**{**base, **kw})


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.fixture
def engine_repo(tmp_path: Path) -> Path:
    return write_repository(settings(tmp_path))


def configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}


# ---------------------------------------------------------------- parse and settings


def test_every_template_parses_as_is() -> None:
    paths = sorted(TEMPLATES.rglob("config.pbtxt"))
    assert len(paths) == 5
    for path in paths:
        assert parse(path).name == path.parent.name


def test_a_typo_fails_to_parse(tmp_path: Path) -> None:
    bad = tmp_path / "config.pbtxt"
    text = (ENGINE_TEMPLATES / "tensorrt_llm" / "config.pbtxt").read_text()
    bad.write_text(text.replace("max_queue_size:", "max_queue_sise:"))
    with pytest.raises(text_format.ParseError, match="max_queue_sise"):
        read_config(bad)


def test_engine_repository_parses_and_carries_the_queue_policy(
    engine_repo: Path, tmp_path: Path
) -> None:
    found = configs(engine_repo)
    assert sorted(found) == ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm"]
    for name in SCHEDULED:
        policy = found[name].dynamic_batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (17, 1_234_000)
        assert policy.timeout_action == REJECT
        assert found[name].max_batch_size == 24
    # an ensemble is scheduled by its steps: Triton allows it no dynamic_batching / queue
    assert not found["ensemble"].HasField("dynamic_batching")
    assert found["ensemble"].max_batch_size == 24
    for name in found:
        assert (engine_repo / name / "1").is_dir()


def test_tensorrt_llm_model_settings(engine_repo: Path, tmp_path: Path) -> None:
    engine = configs(engine_repo)["tensorrt_llm"]
    assert engine.backend == "tensorrtllm"
    assert engine.model_transaction_policy.decoupled is False
    p = params(engine)
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["gpt_model_path"] == str(tmp_path / "out" / "engine")
    assert p["gpu_device_ids"] == "2,3"
    assert "participant_ids" not in p  # leader mode
    assert p["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert (p["enable_chunked_context"], p["enable_kv_cache_reuse"]) == ("true", "true")
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.9"
    assert p["exclude_input_in_output"] == "true"
    assert p["executor_worker_path"].endswith("trtllmExecutorWorker")


def test_orchestrator_participant_ids_and_no_timeout(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        triton={"participant_ids": [1, 2], "queue_timeout_ms": None, "decoupled": True},
    )
    found = configs(write_repository(s))
    engine = found["tensorrt_llm"]
    assert params(engine)["participant_ids"] == "1,2"
    assert params(engine)["gpu_device_ids"] == "0,1"
    assert engine.model_transaction_policy.decoupled is True
    assert not engine.dynamic_batching.default_queue_policy.default_timeout_microseconds


def test_tokenizer_models(engine_repo: Path, tmp_path: Path) -> None:
    found = configs(engine_repo)
    for name, flag in (
        ("preprocessing", "add_special_tokens"),
        ("postprocessing", "skip_special_tokens"),
    ):
        assert found[name].backend == "python"
        assert params(found[name])["tokenizer_dir"] == str(tmp_path / "tok")
        assert params(found[name])[flag] == "true"
        assert (engine_repo / name / "1" / "model.py").is_file()


# ---------------------------------------------------------------- the ensemble's wiring


def test_ensemble_steps_are_wired_consistently(engine_repo: Path) -> None:
    found = configs(engine_repo)
    ensemble = found["ensemble"]
    types_ = {i.name: i.data_type for i in ensemble.input}
    available = dict(types_)
    for step in ensemble.ensemble_scheduling.step:
        model = found[step.model_name]
        inputs = {i.name: i for i in model.input}
        outputs = {o.name: o for o in model.output}
        for key, value in step.input_map.items():
            assert key in inputs, f"{step.model_name} has no input {key}"
            assert value in available, f"{step.model_name}.{key} <- unknown tensor {value}"
            assert available[value] == inputs[key].data_type, f"{step.model_name}.{key} type"
        required = {n for n, i in inputs.items() if not i.optional}
        assert required <= set(step.input_map), f"{step.model_name} misses {required}"
        for key, value in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            available[value] = outputs[key].data_type
    for output in ensemble.output:
        assert available.get(output.name) == output.data_type


def test_ensemble_and_llmapi_use_the_stock_ensemble_names(
    engine_repo: Path, tmp_path: Path
) -> None:
    """Every input of the generated ensemble and of the LLM-API model is an input of NVIDIA's
    stock ensemble, with its data type and optionality: no private renames (random_seed,
    min_length, ...), so a client of a stock ensemble works unchanged."""
    stock = {i["name"]: i for i in STOCK["models"]["ensemble"]["inputs"]}
    llmapi = configs(write_repository(settings(tmp_path, serving="llmapi")))["tensorrt_llm"]
    for model in (configs(engine_repo)["ensemble"], llmapi):
        for given in model.input:
            assert given.name in stock, f"{model.name}: {given.name} is not a stock input"
            wanted = stock[given.name]
            assert model_config_pb2.DataType.Name(given.data_type) == wanted["data_type"]
            assert given.optional == wanted["optional"], given.name
        stock_outputs = set(STOCK["models"]["ensemble"]["outputs"])
        outputs = [o.name for o in model.output]
        assert outputs[0] == "text_output" and set(outputs) <= stock_outputs, outputs
        names = {i.name for i in model.input}
        assert {"text_input", "max_tokens", "stream", "seed", "min_tokens"} <= names
        # the provider may send exclude_input_in_output (engine-path deployments)
        assert "exclude_input_in_output" in names
    # the request's reused KV-cache blocks, for usage.prompt_tokens_details.cached_tokens
    ensemble = configs(engine_repo)["ensemble"]
    assert [o.name for o in ensemble.output] == ["text_output", "kv_cache_reused_blocks"]
    assert "return_perf_metrics" in {i.name for i in ensemble.input}


@pytest.mark.parametrize("name", ["preprocessing", "tensorrt_llm", "postprocessing"])
def test_scheduled_models_use_the_stock_names(engine_repo: Path, name: str) -> None:
    stock = STOCK["models"][name]
    stock_inputs = {i["name"]: i for i in stock["inputs"]}
    config = configs(engine_repo)[name]
    for given in config.input:
        assert given.name in stock_inputs, f"{name}: {given.name} is not a stock input"
        wanted = stock_inputs[given.name]["data_type"]
        assert model_config_pb2.DataType.Name(given.data_type) == wanted, given.name
    for output in config.output:
        assert output.name in stock["outputs"], f"{name}: {output.name} is not a stock output"


# ---------------------------------------------------------------- parameters the backend needs


def test_required_parameters_are_upstreams() -> None:
    upstream = [p["name"] for p in REQUIRED["required"] + REQUIRED["required_in_effect"]]
    assert sorted(REQUIRED_ENGINE_PARAMETERS) == sorted(upstream)
    for source in REQUIRED["sources"]:
        assert len(source["commit"]) == 40 and source["path"]


def test_generated_engine_config_has_every_required_parameter(
    engine_repo: Path, tmp_path: Path
) -> None:
    p = params(configs(engine_repo)["tensorrt_llm"])
    for name in REQUIRED_ENGINE_PARAMETERS:
        assert name in p, name
    # guided decoding off: the backend turns it off on empty values
    assert (p["guided_decoding_backend"], p["xgrammar_tokenizer_info_path"]) == ("", "")
    assert p["tokenizer_dir"] == str(tmp_path / "tok")
    assert p["gpt_model_type"] in REQUIRED["required"][0]["accepted"]
    assert check_engine_repository(engine_repo) == []


@pytest.mark.parametrize(
    "name", [p["name"] for p in REQUIRED["required"] + REQUIRED["required_in_effect"]]
)
def test_the_checker_names_a_removed_parameter(engine_repo: Path, name: str) -> None:
    path = engine_repo / "tensorrt_llm" / "config.pbtxt"
    config = read_config(path)
    del config.parameters[name]
    write_config(config, path)
    problems = check_engine_repository(engine_repo)
    assert len(problems) == 1
    assert f"parameter {name} missing" in problems[0]
    assert "tensorrt_llm/config.pbtxt" in problems[0]


def test_the_checker_refuses_an_empty_engine_path(engine_repo: Path) -> None:
    path = engine_repo / "tensorrt_llm" / "config.pbtxt"
    config = read_config(path)
    config.parameters["gpt_model_path"].string_value = ""
    write_config(config, path)
    (problem,) = check_engine_repository(engine_repo)
    assert "gpt_model_path (empty)" in problem


def test_a_template_without_a_required_parameter_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import build_engines.repository as repository

    real = repository.engine_configs

    def lacking(s: BuildSettings) -> dict[str, model_config_pb2.ModelConfig]:
        out = real(s)
        del out["tensorrt_llm"].parameters["guided_decoding_backend"]
        return out

    monkeypatch.setattr(repository, "engine_configs", lacking)
    with pytest.raises(RepositoryError, match="guided_decoding_backend"):
        write_repository(settings(tmp_path))


# ---------------------------------------------------------------- the LLM-API repository


def test_llmapi_repository(tmp_path: Path) -> None:
    s = settings(
        tmp_path, serving="llmapi", tp_size=2, pp_size=1, max_seq_len=4097, max_input_len=4096
    )
    repo = write_repository(s)
    (config,) = configs(repo).values()
    assert (config.name, config.backend) == ("tensorrt_llm", "python")
    assert config.model_transaction_policy.decoupled is False
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.timeout_action) == (17, REJECT)
    assert params(config) == {
        "gpu_device_ids": "2,3",
        "max_active": "24",
        "engine_queue_size": "17",
    }
    model_yaml = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model_yaml["model"] == str(tmp_path / "hf-model")
    assert model_yaml["tokenizer"] == str(tmp_path / "tok")
    assert model_yaml["backend"] == "pytorch"
    assert (model_yaml["tensor_parallel_size"], model_yaml["pipeline_parallel_size"]) == (2, 1)
    assert (model_yaml["max_batch_size"], model_yaml["max_seq_len"]) == (24, 4097)
    assert model_yaml["kv_cache_config"] == {
        "free_gpu_memory_fraction": 0.9,
        "enable_block_reuse": True,
    }
    assert (repo / "tensorrt_llm" / "1" / "model.py").is_file()


def test_llmapi_model_name(tmp_path: Path) -> None:
    s = settings(tmp_path, serving="llmapi", triton={"llmapi_model_name": "llama_tp2"})
    repo = write_repository(s)
    assert configs(repo)["llama_tp2"].name == "llama_tp2"


# ---------------------------------------------------------------- python models, no GPU


class Tensor:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = np.asarray(value)

    def as_numpy(self) -> np.ndarray:
        return self.value


class Response:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: Any = None) -> None:
        self.tensors = {t.name: t.value for t in output_tensors or []}
        self.error = error


class TritonError:
    def __init__(self, message: str) -> None:
        self.message = message


class Request:
    def __init__(self, **inputs: Any) -> None:
        self.inputs = {k: Tensor(k, v) for k, v in inputs.items()}
        self.sent: list[tuple[Any, int]] = []

    def get_response_sender(self) -> Request:
        return self

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = Response  # type: ignore[attr-defined]
    module.TritonError = TritonError  # type: ignore[attr-defined]
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    """Words ↔ ids; "▁"-prefixed pieces like SentencePiece; eos 2, no pad."""

    eos_token_id = 2
    pad_token_id = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        words = {v: k for k, v in self.vocab.items()}
        return " ".join(words[i] for i in ids if i in words)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return "\u2581" + {v: k for k, v in self.vocab.items()}.get(token_id, "")


def test_all_python_models_compile() -> None:
    paths = sorted(p.relative_to(TEMPLATES).as_posix() for p in TEMPLATES.rglob("model.py"))
    # every python model of the templates (an empty glob must not pass)
    assert paths == [
        "inflight_batcher_llm/postprocessing/1/model.py",
        "inflight_batcher_llm/preprocessing/1/model.py",
        "llmapi/tensorrt_llm/1/model.py",
    ]
    for path in paths:
        compile((TEMPLATES / path).read_text(), path, "exec")


def test_preprocessing(pb_utils: types.ModuleType) -> None:
    pre = load(ENGINE_TEMPLATES / "preprocessing" / "1" / "model.py", "pre_model")
    tok = WordTokenizer()
    words = pre.word_list(tok, [["stop here", "end"], []])
    assert words.shape == (2, 2, 3) and words.dtype == np.int32
    assert words[0].tolist() == [[10, 11, 12], [2, 3, -1]]
    assert words[1].tolist() == [[0, 0, 0], [-1, -1, -1]]
    assert pre.word_list(tok, [[]]).shape == (1, 2, 0)

    model = pre.TritonPythonModel()
    model.tokenizer, model.add_special_tokens, model.end_id, model.pad_id = tok, True, 2, 2
    request = Request(
        QUERY=np.array([[b"hello big world"]], dtype=object),
        REQUEST_OUTPUT_LEN=np.array([[16]], dtype=np.int32),
        STOP_WORDS_DICT=np.array([[b"world", b"big"]], dtype=object),
        PAD_ID=np.array([[0]], dtype=np.int32),
    )
    (response,) = model.execute([request])
    assert response.error is None
    out = response.tensors
    assert out["INPUT_ID"].tolist() == [[1, 13, 14, 15]]
    assert out["REQUEST_INPUT_LEN"].tolist() == [[4]]
    assert out["REQUEST_OUTPUT_LEN"].tolist() == [[16]]
    assert out["STOP_WORDS_IDS"].tolist() == [[[15, 14], [1, 2]]]
    assert out["BAD_WORDS_IDS"].shape == (1, 2, 0)
    assert (out["OUT_END_ID"].tolist(), out["OUT_PAD_ID"].tolist()) == ([[2]], [[0]])
    (bad,) = model.execute([Request(QUERY=np.array([[b"x"]], dtype=object))])
    assert "max_tokens is required" in bad.error.message


def test_postprocessing_keeps_word_start_spaces(pb_utils: types.ModuleType) -> None:
    post = load(ENGINE_TEMPLATES / "postprocessing" / "1" / "model.py", "post_model")
    tok = WordTokenizer()
    ids = tok.encode("tensor parallel heads", add_special_tokens=False)
    model = post.TritonPythonModel()
    model.tokenizer, model.skip_special_tokens = tok, True
    tokens = np.array([[[*ids, 0, 0]]], dtype=np.int32)  # [batch 1, beam 1, 5] padded
    request = Request(TOKENS_BATCH=tokens, SEQUENCE_LENGTH=np.array([[2]], dtype=np.int32))
    (response,) = model.execute([request])
    assert response.tensors["OUTPUT"].tolist() == [[b" tensor parallel"]]
    # streamed chunks concatenate to the whole text
    chunks = [post.decode_chunk(tok, [i], True) for i in ids]
    assert "".join(chunks) == " " + tok.decode(ids)
    assert post.decode_chunk(tok, [], True) == ""


def test_llmapi_model_logic(pb_utils: types.ModuleType) -> None:
    llm = load(LLMAPI_MODEL / "1" / "model.py", "llmapi_model")
    inputs = {
        "max_tokens": np.array([8], dtype=np.int32),
        "seed": np.array([7], dtype=np.uint64),
        "min_tokens": np.array([8], dtype=np.int32),
        "top_k": np.array([5], dtype=np.int32),
        "stop_words": np.array([b"</s>", b""], dtype=object),
    }
    assert llm.sampling_arguments(inputs) == {
        "max_tokens": 8,
        "seed": 7,
        "min_tokens": 8,
        "top_k": 5,
        "stop": ["</s>"],
    }
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        llm.sampling_arguments({"max_tokens": np.array([0])})
    with pytest.raises(ValueError, match="beam_width"):
        llm.sampling_arguments({"max_tokens": np.array([1]), "beam_width": np.array([2])})
    assert llm.llm_arguments({"model": "/m", "triton_config": {"decoupled": True}}) == {
        "model": "/m"
    }
    yaml_args = yaml.safe_load((LLMAPI_MODEL / "1" / "model.yaml").read_text())
    assert "triton_config" not in llm.llm_arguments(yaml_args)
    limit = llm.InflightLimit(2)
    assert [limit.try_acquire() for _ in range(3)] == [True, True, False]
    limit.release()
    assert limit.try_acquire()


def test_llmapi_overflow_is_the_executors_message(pb_utils: types.ModuleType) -> None:
    llm = load(LLMAPI_MODEL / "1" / "model.py", "llmapi_overflow")
    model = llm.TritonPythonModel()
    model._sampling_params = dict
    model.limit, model.queue_size = llm.InflightLimit(0), 5
    request = Request(
        text_input=np.array([b"hi"], dtype=object), max_tokens=np.array([4], dtype=np.int32)
    )
    assert model.execute([request, Request(text_input=np.array([b"no max"], dtype=object))]) is None
    (response, flags) = request.sent[0]
    assert flags == 1
    message = response.error.message
    assert message == "Maximum queue size of 5 has been reached, please try again later"
    # the gateway classifies it as engine overflow (503, retry elsewhere)
    from plugins.triton_provider.errors import ErrorKind, classify_upstream_error  # litellm

    assert classify_upstream_error(400, message).kind == ErrorKind.ENGINE_QUEUE_FULL


def test_model_yaml_template_matches_the_settings_keys() -> None:
    data = yaml.safe_load((LLMAPI_MODEL / "1" / "model.yaml").read_text())
    assert {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size"} <= set(data)
    assert json.loads(json.dumps(data)) == data  # plain YAML, no tags
