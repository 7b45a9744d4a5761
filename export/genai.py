"""``genai_config.json``: what onnxruntime-genai needs to run an exported folder (torch-free).

genai has no architecture-specific code for an optimum-style graph beyond the I/O names, so we
describe the graph we wrote: names from its inputs, KV heads and head size from the past-KV
input shapes, token ids from the transformers config.
"""

from __future__ import annotations

from typing import Any

import onnx

# genai's model "type" for each transformers model_type we export. Types genai does not know
# (gpt_neox) run as "llama": for an optimum decoder the type only selects defaults that the
# explicit I/O names below override.
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma": "gemma",
               "phi3": "phi3", "gpt_neox": "llama"}
from otaro.runtime.backends import ACCURACY_KEY  # noqa: E402,F401  (the runtime owns it; re-exported)


def _token_id(value: Any) -> int | list[int] | None:
    if isinstance(value, list):
        return value[0] if len(value) == 1 else value
    return value


def _check_ids(config: dict, vocab: int) -> None:
    # genai refuses a config whose special ids fall outside the vocabulary; say so at export
    # time, naming the field, rather than when the user's app first loads the model.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = config.get(key)
        for i in v if isinstance(v, list) else [v]:
            if i is not None and not 0 <= int(i) < vocab:
                raise ValueError(f"config.json {key} = {i} is outside the vocabulary (size {vocab}); "
                                 f"onnxruntime-genai cannot load such a model: fix config.json and re-export")


def genai_config(config: dict, graph: onnx.GraphProto, filename: str = "model.onnx",
                 accuracy_level: int | None = None, max_length: int | None = None) -> dict:
    _check_ids(config, int(config["vocab_size"]))
    inputs = {i.name: i for i in graph.input}
    past = inputs.get("past_key_values.0.key")
    if past is None:
        raise ValueError("the graph has no past_key_values.0.key input: not a KV-cache decoder")
    dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
    n_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    context = int(config.get("max_position_embeddings") or 2048)
    io_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                 "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in inputs:
        io_inputs["position_ids"] = "position_ids"
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if accuracy_level is not None:
        # Applies to the DQ+MatMul -> MatMulNBits fusion onnxruntime does on the SEFP model.
        session[ACCURACY_KEY] = str(accuracy_level)
    eos = _token_id(config.get("eos_token_id"))
    pad = _token_id(config.get("pad_token_id"))
    return {
        "model": {
            "type": GENAI_TYPES.get(config.get("model_type"), "llama"),
            "vocab_size": int(config["vocab_size"]),
            "context_length": context,
            "bos_token_id": _token_id(config.get("bos_token_id")) if config.get("bos_token_id") is not None else 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else (eos or 0)),
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": dims[3],
                "hidden_size": int(config["hidden_size"]),
                "num_attention_heads": int(config["num_attention_heads"]),
                "num_hidden_layers": n_layers,
                "num_key_value_heads": dims[1],
                "inputs": io_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "max_length": min(context, max_length or context),
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention (the fused graph) updates a max_length cache in place, as the
            # runtime's SharedKV does; the traced graph's Concat attention cannot.
            "past_present_share_buffer": any(n.op_type == "GroupQueryAttention" for n in graph.node),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
