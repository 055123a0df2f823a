"""Upstream's Triton CosyVoice model contract: check a served model's config, build requests, read responses.

The contract is that of `runtime/triton_trtllm/model_repo/cosyvoice2/config.pbtxt` (and `cosyvoice3`): a decoupled
Python-backend model with `max_batch_size` > 0, so every tensor carries a leading batch dimension of 1. Inputs:
`reference_wav` FP32 [1, N] at 16 kHz, `reference_wav_len` INT32 [1, 1], `reference_text` BYTES [1, 1] (the
reference's transcript; empty for cross-lingual), `target_text` BYTES [1, 1]. Output: `waveform` FP32, one piece
per response, ending with a flags-only response carrying `triton_final_response` (asked for with
`triton_enable_empty_final_response`, as upstream's `client_grpc.py` does).

Requests are built from tritonclient's generated protobuf classes rather than through `tritonclient.grpc.aio`'s
`stream_infer`: that one refuses every `triton_`-prefixed parameter, so it cannot ask for the final-response flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from tritonclient.grpc import InferResult, model_config_pb2, service_pb2
from tritonclient.utils import serialize_byte_tensor

REFERENCE_RATE = 16000
"""Rate of `reference_wav` (upstream's audio tokenizer and speaker embedding work at 16 kHz)."""

INPUTS = {
    "reference_wav": "TYPE_FP32",
    "reference_wav_len": "TYPE_INT32",
    "reference_text": "TYPE_STRING",
    "target_text": "TYPE_STRING",
}
"""Input names and the data types upstream's config declares for them."""

OUTPUT = "waveform"
FINAL = "triton_final_response"
ASK_FINAL = "triton_enable_empty_final_response"


class ContractError(ValueError):
    """The served model does not follow upstream's contract (one line saying what differs)."""


@dataclass(frozen=True)
class Contract:
    """What a served model's config says about how to call it."""

    batched: bool
    """max_batch_size > 0: every tensor gets a leading batch dimension of 1 (upstream: 16)."""

    inputs: frozenset[str]
    """Input names the model declares."""


def check_config(config: Any, model: str) -> Contract:
    """Check a `ModelConfig` against upstream's contract; ContractError names the first difference."""
    if not config.model_transaction_policy.decoupled:
        raise ContractError(
            f"model {model!r} is not decoupled, so it cannot stream "
            "(upstream's run.sh stage 2 with DECOUPLED_MODE=True)"
        )
    declared = {tensor.name: model_config_pb2.DataType.Name(tensor.data_type) for tensor in config.input}
    for name in ("target_text", "reference_wav", "reference_wav_len", "reference_text"):
        if name not in declared:
            raise ContractError(f"model {model!r} has no input {name!r} (not upstream's CosyVoice model?)")
        if declared[name] != INPUTS[name]:
            raise ContractError(f"model {model!r}: input {name!r} is {declared[name]}, expected {INPUTS[name]}")
    outputs = {tensor.name: model_config_pb2.DataType.Name(tensor.data_type) for tensor in config.output}
    if outputs.get(OUTPUT) != "TYPE_FP32":
        raise ContractError(f"model {model!r} has no FP32 output {OUTPUT!r}")
    return Contract(batched=config.max_batch_size > 0, inputs=frozenset(declared))


def _add(request: Any, name: str, datatype: str, array: np.ndarray, batched: bool) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend([1, *array.shape] if batched else array.shape)
    if datatype == "BYTES":
        request.raw_input_contents.append(serialize_byte_tensor(array).item())
    else:
        request.raw_input_contents.append(array.tobytes())


def build_request(
    model: str,
    contract: Contract,
    target_text: str,
    reference: Optional[np.ndarray],
    reference_text: str,
    request_id: str,
) -> Any:
    """A `ModelInferRequest` for one synthesis; without `reference` only `target_text` is sent (the deployment's
    cached speaker, upstream's `use_spk2info_cache`)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    if reference is not None:
        wav = np.ascontiguousarray(reference, dtype="<f4").reshape(-1)
        _add(request, "reference_wav", "FP32", wav, contract.batched)
        _add(request, "reference_wav_len", "INT32", np.array([len(wav)], dtype="<i4"), contract.batched)
        _add(
            request,
            "reference_text",
            "BYTES",
            np.array([reference_text.encode("utf-8")], dtype=object),
            contract.batched,
        )
    _add(request, "target_text", "BYTES", np.array([target_text.encode("utf-8")], dtype=object), contract.batched)
    request.parameters[ASK_FINAL].bool_param = True
    return request


def is_final(response: Any) -> bool:
    """Whether a `ModelStreamInferResponse` carries the final-response flag (the request is complete)."""
    parameters = response.infer_response.parameters
    return FINAL in parameters and parameters[FINAL].bool_param


def read_response(response: Any) -> tuple[Optional[np.ndarray], bool]:
    """(waveform samples or None, final) from one `ModelStreamInferResponse` without an error message."""
    infer = response.infer_response
    final = is_final(response)
    if not infer.outputs:
        return None, final
    wave = InferResult(infer).as_numpy(OUTPUT)
    if wave is None:
        return None, final
    return np.asarray(wave, dtype=np.float32).reshape(-1), final
