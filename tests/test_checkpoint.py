import json

import pytest
import torch
from safetensors.torch import load_file

from otaro import checkpoint
from otaro.arch import ARCHS
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import CheckpointError, OtaroError
from otaro.modules import convert, quant_layers

X = torch.tensor([[1, 5, 9, 200, 31]])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("fmt", ["sefp-g64-trunc", "sefp-g16-nearest", "ssfp-g64-nearest", "int4-g32-asym", "int3-g128-sym"])
def test_round_trip_is_bit_exact_for_every_arch(tmp_path, arch, fmt):
    model = convert(tiny_model(arch), fmt)
    checkpoint.save(model, tmp_path / "ck", tokenizer=tiny_tokenizer())
    loaded = checkpoint.load(tmp_path / "ck")
    assert type(loaded) is type(model)  # a transformers model, usable with .generate
    bits_list = model.otaro.fmt.bits if model.otaro.fmt.family == "sefp" else (model.otaro.fmt.bits,)
    for b in bits_list:
        model.set_precision(b)
        loaded.set_precision(b)
        assert torch.equal(model(X).logits, loaded(X).logits), b
    assert checkpoint.load_tokenizer(tmp_path / "ck") is not None


def test_master_weights_are_encoded_on_save(tmp_path):
    master = convert(tiny_model("llama"), "sefp-g64-trunc", packed=False)
    packed = convert(tiny_model("llama"), "sefp-g64-trunc", packed=True)
    checkpoint.save(master, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / checkpoint.WEIGHTS))
    for name, layer in quant_layers(packed).items():
        assert torch.equal(state[f"{name}.mantissa"], layer.mantissa)
        assert torch.equal(state[f"{name}.exponent"], layer.exponent)
        assert f"{name}.weight" not in state


def test_manifest_records_the_format_and_tied_weights(tmp_path):
    model = convert(tiny_model("llama"), "sefp-g128-midpoint")
    checkpoint.save(model, tmp_path / "ck", trained_bits=(2, 4, 8))
    m = checkpoint.read_manifest(tmp_path / "ck")
    assert m["format"]["name"] == "sefp-g128-midpoint" and m["format"]["group_size"] == 128
    assert m["trained_bits"] == [2, 4, 8]
    assert m["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.embed_tokens.weight" in m["high_precision"]
    loaded = checkpoint.load(tmp_path / "ck")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.fixture
def saved(tmp_path):
    checkpoint.save(convert(tiny_model("llama"), "sefp-g64-trunc"), tmp_path / "ck")
    return tmp_path / "ck"


def _edit_manifest(path, **changes):
    m = json.loads((path / checkpoint.MANIFEST).read_text())
    m.update(changes)
    (path / checkpoint.MANIFEST).write_text(json.dumps(m))


def test_truncated_weights_are_detected(saved):
    w = saved / checkpoint.WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(saved)


def test_flipped_byte_is_detected(saved):
    w = saved / checkpoint.WEIGHTS
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(saved)


def test_foreign_and_missing_folders(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not an otaro checkpoint"):
        checkpoint.load(tmp_path / "plain")
    (saved / checkpoint.MANIFEST).write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not an otaro checkpoint manifest"):
        checkpoint.load(saved)
    (saved / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(saved)


def test_newer_version_and_path_traversal_are_refused(saved):
    _edit_manifest(saved, otaro_checkpoint=99)
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.load(saved)
    _edit_manifest(saved, otaro_checkpoint=1, weights={"file": "../../etc/passwd.safetensors", "sha256": "x"})
    with pytest.raises(CheckpointError, match="plain .safetensors file name"):
        checkpoint.load(saved)


def test_weights_of_another_model_are_refused(tmp_path, saved):
    other = tmp_path / "other"
    checkpoint.save(convert(tiny_model("qwen2"), "sefp-g64-trunc"), other)
    # swap in the other model's weights with a matching checksum: names/shapes must still be checked
    (saved / checkpoint.WEIGHTS).write_bytes((other / checkpoint.WEIGHTS).read_bytes())
    m = json.loads((saved / checkpoint.MANIFEST).read_text())
    m["weights"]["sha256"] = json.loads((other / checkpoint.MANIFEST).read_text())["weights"]["sha256"]
    (saved / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="does not match the model"):
        checkpoint.load(saved)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, saved):
    model = convert(tiny_model("llama"), "sefp-g64-trunc")
    with pytest.raises(OtaroError, match="already exists"):
        checkpoint.save(model, saved)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_json", boom)
    with pytest.raises(RuntimeError):
        checkpoint.save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    with pytest.raises(RuntimeError):
        checkpoint.save(model, saved, overwrite=True)
    assert checkpoint.load(saved) is not None  # the old checkpoint survived the failed overwrite


@pytest.mark.parametrize("v1_rounding, now", [("nearest", "halfup"), ("trunc", "trunc"), ("midpoint", "midpoint")])
def test_format_v1_checkpoints_still_load_and_decode_as_they_were_made(tmp_path, v1_rounding, now):
    """A checkpoint written before format v2 names its rounding by the v1 meaning: v1 "nearest"
    (round half up) is the table's legacy "halfup" row today, and decodes bit for bit as before."""
    model = convert(tiny_model("llama"), f"sefp-g16-{now}")
    checkpoint.save(model, tmp_path / "ck")
    m = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
    rec = {k: v for k, v in m["format"].items() if k != "scale"}
    rec.update(name=f"sefp-g16-{v1_rounding}", rounding=v1_rounding, exponent_bits=8)
    _edit_manifest(tmp_path / "ck", otaro_checkpoint=1, format=rec)
    loaded = checkpoint.load(tmp_path / "ck")
    assert loaded.otaro.fmt.name == f"sefp-g16-{now}"
    for b in (2, 4, 7, 8):
        model.set_precision(b)
        loaded.set_precision(b)
        assert torch.equal(model(X).logits, loaded(X).logits), b


def test_ssfp_checkpoint_stores_fp16_scales(tmp_path):
    model = convert(tiny_model("llama"), "ssfp-g32-nearest")
    checkpoint.save(model, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / checkpoint.WEIGHTS))
    name, layer = next(iter(quant_layers(model).items()))
    assert state[f"{name}.scale"].dtype == torch.float16 and f"{name}.exponent" not in state
    loaded = checkpoint.load(tmp_path / "ck")
    for b in (3, 8):
        model.set_precision(b)
        loaded.set_precision(b)
        assert torch.equal(model(X).logits, loaded(X).logits)
