"""``otaro export --format onnx``: checkpoint(s) -> one artifact folder.

Order of work (every user mistake is found in step 1, before anything is computed or written):

1. read the SEFP checkpoint and every variant source; check formats, architectures, shapes;
2. trace the float decoder once per source model (optimum), find each linear's MatMul;
3. rewrite: the single SEFP model, then each variant (MatMulNBits);
4. validate every bit-width and variant against torch (unless ``validate=False``);
5. write the manifest last, inside a temporary folder renamed into place at the very end.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from otaro import __version__
from otaro.errors import OtaroError
from otaro.export import fused, genai_builder, rewrite, trace, validate
from otaro.runtime.decoder import PADDING_KEY
from otaro.export.genai import genai_config
from otaro.export.tokenizer_files import fix_tokenizer_folder
from otaro.formats import IntFormat, SEFPFormat
from otaro.formats import onnx_ops as ops
from otaro.formats.intq import IntTensor
from otaro.formats.pack import int_to_matmulnbits, sefp_to_matmulnbits
from otaro.formats.sefp import SEFPTensor
from otaro.io import atomic_dir, check_writable_output, sha256_file, write_json
from otaro.runtime.artifact import FORMAT_VERSION, MANIFEST, check_name

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
COPIED_FILES = ("config.json", "generation_config.json")
TRACE_DIR = ".trace"  # inside the partial output folder; removed before the manifest is written
EMBEDDING = "<embedding>"  # key of the quantized embedding's Gather among the located nodes
# "fused": onnxruntime-genai's model builder (GroupQueryAttention, ~11 nodes per block; llama
# family, export/fused.py); "traced": optimum's trace (every architecture we support); "auto":
# fused where it applies and the builder is installed, else traced.
GRAPHS = ("auto", "fused", "traced")
_SEFP_SPEC = re.compile(r"^sefp:(\d(?:,\d)*)$")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    kind: str  # "sefp" (fixed precision of the main checkpoint) | "int" (another checkpoint)
    bits: int | None = None
    source: Path | None = None


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    output: Path
    variants: tuple[str, ...] = ()
    default_bits: int | None = None  # None: the checkpoint's default (8 unless set)
    accuracy_level: int = 4
    validate: bool = True
    validate_tokens: int = 8
    overwrite: bool = False
    threads: int | None = None
    graph: str = "auto"  # GRAPHS: the decoder graph the quantized linears are written into

    def __post_init__(self):
        from otaro.io import refuse_output_over_inputs

        # Replacing an input with --overwrite would delete the checkpoint being exported.
        sources = [v.source for v in parse_variants(self.variants) if v.source is not None]
        refuse_output_over_inputs(self.output, [self.checkpoint, *sources])


def parse_variants(specs: tuple[str, ...]) -> list[VariantSpec]:
    """``sefp:4`` / ``sefp:2,4`` (fixed-precision copies of the SEFP model), ``PATH`` or
    ``NAME=PATH`` (an integer checkpoint from ``otaro quantize``: RTN, GPTQ, AWQ)."""
    out: list[VariantSpec] = []
    for spec in specs:
        m = _SEFP_SPEC.match(spec)
        if m:
            out += [VariantSpec(f"sefp-b{b}", "sefp", bits=int(b)) for b in m[1].split(",")]
            continue
        if spec.startswith("sefp"):
            raise OtaroError(f"variant {spec!r}: write fixed SEFP precisions as sefp:B or sefp:B,B (B in 2-8)")
        name, sep, path = spec.partition("=")
        src = Path(path if sep else spec)
        out.append(VariantSpec(check_name(name, "variant name") if sep else "", "int", source=src))
    return out  # duplicate names are refused once every name is known (ExportConfig sources)


def claimed_methods(name: str) -> set[str]:
    """The quantization methods a variant name claims: its runs of letters that name a method
    (``gptq``, ``awq``, ``rtn``, ...). ``gptq``, ``gptq4``, ``int4-gptq`` claim gptq; ``int4`` nothing."""
    from otaro.methods import METHODS

    known = set(METHODS) | {"gptq", "awq", "rtn"}
    return {t for t in re.findall(r"[a-z]+", name.lower()) if t in known}


def check_variant_claim(v: VariantSpec) -> None:
    """A NAME=PATH variant whose name claims a method must come from a checkpoint that records it
    (``gptq=`` on an RTN checkpoint is refused); read from the manifest alone, before any work."""
    from otaro import checkpoint

    claims = claimed_methods(v.name)
    if not claims or v.source is None or not checkpoint.is_checkpoint(v.source):
        return  # nothing claimed, or _load_checkpoint reports the missing/foreign folder
    method = checkpoint.read_manifest(v.source).get("method")
    # A checkpoint with no method record was written by checkpoint.save after a plain convert():
    # round-to-nearest (every method run through `otaro quantize` records its name and config).
    recorded = method.get("name") if isinstance(method, dict) else ("rtn" if method is None else None)
    if claims != {recorded}:
        raise OtaroError(f"variant name {v.name!r} claims {'+'.join(sorted(claims))}, but {v.source} records "
                         f"{'method ' + recorded if recorded else 'no method'}: name the variant after what made it")


def _refuse_multimodal(path: Path, role: str) -> None:
    """A checkpoint of a multimodal wrapper (LLaVA) has no decoder graph here (optimum traces
    causal LMs; the vision tower and projector have no ONNX path): one line, read from its
    config.json before any checkpoint is loaded."""
    from otaro.arch.multimodal import refuse_multimodal
    from otaro.sources import model_type_of

    refuse_multimodal(model_type_of(path), "otaro export", f"the {role} {path} is one, and the exported graph is a "
                      "causal LM's (no vision tower or projector); `otaro eval` evaluates the checkpoint")


def _load_checkpoint(path: Path, role: str):
    from otaro import checkpoint

    if not path.exists():
        raise OtaroError(f"{role} {path} does not exist")
    if not checkpoint.is_checkpoint(path):
        raise OtaroError(f"{role} {path} is not an otaro checkpoint (make one with `otaro quantize` or `otaro finetune`)")
    model = checkpoint.load(path)
    return model, model.otaro_manifest, checkpoint.load_tokenizer(path)


def _layer_shapes(manifest: dict) -> dict[str, tuple[int, int]]:
    return {n: (l["in_features"], l["out_features"]) for n, l in manifest["layers"].items()}


def _head_layers(manifest: dict) -> set[str]:
    return {manifest["head"]["layer"]} if manifest.get("head") else set()


def _sefp_tensor(layer, fmt: SEFPFormat) -> SEFPTensor:
    return SEFPTensor(layer.mantissa.numpy(), layer.shared.numpy(), layer.in_features, fmt)


def _int_tensor(layer) -> IntTensor:
    return IntTensor(layer.qweight.numpy().astype(np.int16), layer.scales.numpy().astype(np.float32),
                     layer.zeros.numpy().astype(np.int16), layer.in_features, layer.fmt)


def _nbits(B, scales, zp, layer, container: int, G: int) -> rewrite.NBitsWeight:
    return rewrite.NBitsWeight(B, scales, zp, layer.in_features, layer.out_features, container, G)


def _linears(located: dict) -> dict:
    return {k: v for k, v in located.items() if k != EMBEDDING}


def _files(root: Path, names) -> dict[str, dict]:
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in sorted(names)}


def _copy_side_files(trace_dir: Path, dest: Path, tokenizer, hf_config: dict, graph, accuracy_level: int) -> list[str]:
    names = []
    for n in COPIED_FILES:
        if (trace_dir / n).is_file():
            shutil.copyfile(trace_dir / n, dest / n)
            names.append(n)
    if tokenizer is not None:
        names += [Path(p).name for p in tokenizer.save_pretrained(str(dest)) if Path(p).parent == dest]
        fix_tokenizer_folder(dest)  # a GGUF-converted byte-level BPE: the decoder genai misreads
    try:
        gcfg = genai_config(hf_config, graph, accuracy_level=accuracy_level)
    except ValueError as e:
        raise OtaroError(str(e)) from None
    write_json(dest / "genai_config.json", gcfg)
    names.append("genai_config.json")
    return sorted(set(names))


def _decoder_metadata(config, graph: str = "traced") -> dict[str, str]:
    """What a KV-cache loop must know beyond the graph's I/O (otaro.runtime.decoder reads it)."""
    from otaro.arch.rope import RESET_KEY, cache_reset_length

    reset = cache_reset_length(config)
    meta = {} if reset is None else {RESET_KEY: str(reset)}
    if graph == "fused":
        meta[PADDING_KEY] = "right"  # GroupQueryAttention reads lengths from the mask (export/fused.py)
    return meta


def _tool_versions() -> dict[str, str]:
    import onnxruntime
    import optimum
    import torch
    import transformers

    return {"otaro": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "optimum": getattr(optimum, "__version__", "?"),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _float_bytes(proto_path: Path, quantized_inits: set[str]) -> int:
    """Bytes of what every precision holds besides its packed linears: float initializers
    (norms, biases; a float embedding and head) and a quantized embedding's code."""
    proto = onnx.load(str(proto_path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        if t.name in quantized_inits:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _precision_sizes(fmt: SEFPFormat, layers: dict[str, tuple[int, int]], float_bytes: int, head=None) -> dict[str, dict]:
    """What a runtime holds at each b (MatMulNBits container + fp32 scales + the float rest; a
    quantized head at its own bits): also the size of a separate per-bit file, the model-zoo
    alternative."""
    def nbytes(K, N, b):
        c = fmt.container_bits(b)
        return -(-K // fmt.group_size) * N * (fmt.group_size * (c or 16) // 8 + 4)

    out = {}
    for b in fmt.bits:
        c = fmt.container_bits(b)
        w = sum(nbytes(K, N, head.bits if head is not None and n == head.layer else b) for n, (K, N) in layers.items())
        out[str(b)] = {"container_bits": c, "weight_bytes": w, "model_bytes": w + float_bytes}
    return out


class _Exporter:
    def __init__(self, cfg: ExportConfig, progress: Callable[[str], None]):
        self.cfg, self.say = cfg, progress

    # -- step 1 -------------------------------------------------------------------------
    def read_inputs(self) -> None:
        cfg = self.cfg
        if cfg.accuracy_level not in ACCURACY_LEVELS:
            raise OtaroError(f"accuracy level {cfg.accuracy_level} is not one of {list(ACCURACY_LEVELS)}")
        if cfg.output.exists() and not cfg.overwrite:
            raise OtaroError(f"output folder {cfg.output} already exists (pass --overwrite to replace it)")
        if cfg.graph not in GRAPHS:
            raise OtaroError(f"unknown graph {cfg.graph!r}: choose one of {list(GRAPHS)}")
        check_writable_output(cfg.output)
        self.specs = parse_variants(cfg.variants)
        for path, role in [(cfg.checkpoint, "checkpoint")] + [(v.source, "variant source") for v in self.specs
                                                              if v.source is not None]:
            _refuse_multimodal(path, role)  # before any checkpoint is loaded
        for v in self.specs:  # names tell the truth: refused before any checkpoint is loaded
            if v.kind == "int" and v.name:
                check_variant_claim(v)
        self.model, self.manifest, self.tokenizer = _load_checkpoint(cfg.checkpoint, "checkpoint")
        self.graph = self._choose_graph(self.manifest["model_type"])
        self.fmt = self.model.otaro.fmt
        if not isinstance(self.fmt, SEFPFormat):
            raise OtaroError(f"{cfg.checkpoint} holds {self.fmt.name} weights; the exported model must be SEFP "
                             f"(pass integer checkpoints as variants: --variant {cfg.checkpoint})")
        self.bits = tuple(self.fmt.bits)
        self.default_bits = cfg.default_bits or self.manifest.get("default_bits") or self.fmt.top_bits
        if self.default_bits not in self.bits:
            raise OtaroError(f"default bits {self.default_bits} is not one of the format's {list(self.bits)}")
        shapes = _layer_shapes(self.manifest)
        self.sources = {}
        for i, v in enumerate(self.specs):
            if v.kind == "sefp":
                self.fmt.check_bits(v.bits)
                continue
            model, man, tok = _load_checkpoint(v.source, "variant source")
            fmt = model.otaro.fmt
            if not isinstance(fmt, IntFormat):
                raise OtaroError(f"variant source {v.source} holds {fmt.name} weights; variants from other "
                                 f"checkpoints must be integer (GPTQ/AWQ/RTN); use sefp:B for SEFP precisions")
            # A quantized head (otaro.head) is the SEFP model's own; integer checkpoints keep theirs float.
            ours = {n: v for n, v in shapes.items() if n not in _head_layers(self.manifest)}
            theirs = {n: v for n, v in _layer_shapes(man).items() if n not in _head_layers(man)}
            if man["model_type"] != self.manifest["model_type"] or theirs != ours:
                raise OtaroError(f"variant source {v.source} is a different model than {cfg.checkpoint} "
                                 f"(architecture or layer shapes differ)")
            method = (man.get("method") or {}).get("name")
            name = v.name or check_name(f"{fmt.name}-{method}" if method else fmt.name, "variant name")
            self.specs[i] = VariantSpec(name, "int", source=v.source)
            self.sources[name] = (model, man, tok)
        names = [v.name for v in self.specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise OtaroError(f"variant {dup[0]!r} is requested twice (name distinct sources with NAME=PATH)")

    def _choose_graph(self, model_type: str) -> str:
        if self.cfg.graph == "fused":
            fused.check_supported(model_type)  # refused before any tracing
            return "fused"
        if self.cfg.graph == "auto" and fused.supported(model_type):
            need = genai_builder.available()
            if need is None:
                return "fused"
            self.say(f"using the optimum trace: {need.split(', or export')[0]}")
        return "traced"

    # -- steps 2-3 ----------------------------------------------------------------------
    def trace(self, model, where: Path, tokenizer=None):
        fmodel = trace.float_copy(model)
        if self.graph == "fused":
            path = fused.build_decoder(fmodel, tokenizer, where)
        else:
            path = trace.trace_decoder(fmodel, where)
        proto = onnx.load(str(path), load_external_data=False)
        full = onnx.load(str(path))
        located = trace.locate_linears(full, fmodel, list(model.otaro.layers))
        head = model.otaro.head
        if head is not None:
            located = {**located, EMBEDDING: trace.locate_embedding(full, fmodel, head.embedding)}
        return path, fmodel.config.to_dict(), proto.graph, located

    def write_main(self, out: Path, scratch: Path) -> dict:
        self.say("building the fused float decoder (onnxruntime-genai's model builder)" if self.graph == "fused"
                 else "tracing the float decoder (optimum)")
        self.traced, self.hf_config, graph, self.located = self.trace(self.model, scratch / "main", self.tokenizer)
        self.say(f"rewriting {len(self.located)} linears as {ops.SEFP_OP} ({self.fmt.name}, default {self.default_bits} bits)")
        layers = self.model.otaro.layers
        proto = onnx.load(str(self.traced))
        tensors = {n: _sefp_tensor(self.model.get_submodule(n), self.fmt) for n in layers}
        head = self.model.otaro.head
        rewrite.rewrite_sefp(proto, _linears(self.located), tensors, self.fmt, self.default_bits,
                             head=(head.layer, head.bits) if head is not None else None)
        self._rewrite_embedding(proto, self.located)
        self.tied = rewrite.share_tied_head(proto)
        rewrite.finalize(proto, {"otaro.artifact": str(FORMAT_VERSION), "otaro.format": self.fmt.name,
                                 "otaro.bits_input": ops.BITS_INPUT, "otaro.default_bits": str(self.default_bits),
                                 **_decoder_metadata(self.model.config, self.graph)})
        files = rewrite.save(proto, out / "model.onnx")
        side = _copy_side_files(self.traced.parent, out, self.tokenizer, self.hf_config, proto.graph,
                                self.cfg.accuracy_level)
        quantized = {f"{n}.mantissa" for n in layers} | {f"{n}.scale8" for n in layers}
        # The code a quantized embedding gathers from is held at every precision (the tied
        # head's own): it counts with the fixed part, not with what a precision packs.
        gathered = {i for n in proto.graph.node if n.op_type.startswith(ops.GATHER_OP) for i in n.input[1:3]}
        self.float_bytes = _float_bytes(out / "model.onnx", quantized - gathered)
        return {"model_files": [f.name for f in files], "side_files": side}

    def _rewrite_embedding(self, proto, located) -> None:
        head = self.model.otaro.head
        if head is None:
            return
        emb = self.model.get_submodule(head.embedding)
        codes = head.layer if head.tied else head.embedding
        m, sh = emb.codes()
        tensor = SEFPTensor(m.numpy(), sh.numpy(), emb.embedding_dim, self.fmt)
        rewrite.rewrite_embedding(proto, located[EMBEDDING], codes, tensor, self.fmt)

    def _bits_of(self, name: str, bits: int) -> int:
        """A layer's bits in a fixed-precision copy: the head keeps its own (otaro.head)."""
        head = self.model.otaro.head
        return head.bits if head is not None and name == head.layer else bits

    def write_variant(self, v: VariantSpec, out: Path, scratch: Path) -> dict:
        dest = out / "variants" / v.name
        dest.mkdir(parents=True)
        if v.kind == "sefp":
            model, traced, located, hf, tok = self.model, self.traced, self.located, self.hf_config, self.tokenizer
            weights = {}
            for n in model.otaro.layers:
                layer = model.get_submodule(n)
                B, s, c = sefp_to_matmulnbits(_sefp_tensor(layer, self.fmt), self._bits_of(n, v.bits))
                weights[n] = _nbits(B, s, None, layer, c, self.fmt.group_size)
            fmt_name, bits, container = self.fmt.name, v.bits, self.fmt.container_bits(v.bits)
        else:
            model, man, tok = self.sources[v.name]
            self.say(f"tracing variant {v.name}")
            traced, hf, _, located = self.trace(model, scratch / v.name, tok)
            fmt = model.otaro.fmt
            weights = {}
            for n in model.otaro.layers:
                layer = model.get_submodule(n)
                B, s, zp = int_to_matmulnbits(_int_tensor(layer))
                weights[n] = _nbits(B, s, zp, layer, fmt.container_bits(), fmt.group_size)
            fmt_name, bits, container = fmt.name, fmt.bits, fmt.container_bits()
        if v.kind == "sefp" and container is None:
            raise OtaroError(f"variant {v.name}: {self.fmt.name} at {v.bits} bits has no MatMulNBits container")
        self.say(f"writing variant {v.name} (MatMulNBits, {container}-bit container, accuracy_level {self.cfg.accuracy_level})")
        proto = onnx.load(str(traced))
        rewrite.rewrite_matmulnbits(proto, _linears(located), weights, self.cfg.accuracy_level)
        if v.kind == "sefp":
            self._rewrite_embedding(proto, located)
        rewrite.share_tied_head(proto)
        rewrite.finalize(proto, {"otaro.artifact": str(FORMAT_VERSION), "otaro.format": fmt_name,
                                 "otaro.variant": v.name, **_decoder_metadata(model.config, self.graph)})
        files = rewrite.save(proto, dest / "model.onnx")
        side = _copy_side_files(traced.parent, dest, tok, hf, proto.graph, None)
        rec = {"name": v.name, "path": f"variants/{v.name}", "kind": "sefp-fixed" if v.kind == "sefp" else "int",
               "format": fmt_name, "bits": bits, "container_bits": container,
               "accuracy_level": self.cfg.accuracy_level,
               "source": str(self.cfg.checkpoint if v.kind == "sefp" else v.source),
               "files": _files(dest, [f.name for f in files] + side)}
        if v.kind == "int":
            man = self.sources[v.name][1]
            rec["method"] = man.get("method") or {}  # name and config, as the checkpoint records them
            rec["checkpoint_layout"] = f"hf-{man['hf']['layout']}" if man.get("hf") else "otaro"
        return rec

    # -- step 4 -------------------------------------------------------------------------
    def validate(self, out: Path, variants: list[dict]) -> dict:
        from otaro.progress import progress

        cfg = self.cfg
        prompt = validate.prompt_ids(self.tokenizer, int(self.hf_config["vocab_size"]))
        jobs = [("main", out / "model.onnx", self.model, b, True) for b in self.bits]
        for v in variants:
            model = self.model if v["kind"] == "sefp-fixed" else self.sources[v["name"]][0]
            jobs.append((v["name"], out / v["path"] / "model.onnx", model, v["bits"], False))
        checks = []
        with progress(total=len(jobs), desc="validating", unit="model") as bar:
            for name, path, model, b, sefp_bits in jobs:
                if hasattr(model, "set_precision") and model.otaro.fmt.family == "sefp":
                    model.set_precision(b)
                bar.set_postfix_str(f"{name} b={b}")
                checks.append(validate.check(name, path, model, b, prompt, cfg.validate_tokens, cfg.accuracy_level,
                                             sefp_bits=sefp_bits, threads=cfg.threads))
                bar.update(1)
        if hasattr(self.model, "set_precision"):
            self.model.set_precision(self.default_bits)
        failed = [c for c in checks if not c.passed]
        if failed:
            lines = "; ".join(f"{c.model} at {c.bits} bits: max |Δlogit| {c.max_abs_diff:.2e} (tolerance "
                              f"{c.tolerance:.2e}), greedy tokens {'equal' if c.greedy_equal else 'differ'}"
                              for c in failed)
            raise OtaroError(f"validation against torch failed — {lines}. Nothing was written; "
                             f"--no-validate exports anyway")
        return {"skipped": False, "exact_accuracy_level": validate.EXACT_LEVEL, "relative_tolerance": validate.REL_TOL,
                "prompt_tokens": len(prompt), "new_tokens": cfg.validate_tokens,
                "results": [c.record() for c in checks]}

    # -- all ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.read_inputs()
        cfg = self.cfg
        t0 = _dt.datetime.now(_dt.timezone.utc)
        with atomic_dir(cfg.output, overwrite=cfg.overwrite) as out:
            # Traces (~100 MB for a small model) live inside the partial folder, not in /tmp: a
            # killed export leaves one folder, which the next write of this output removes.
            scratch = out / TRACE_DIR
            main = self.write_main(out, scratch)
            variants = [self.write_variant(v, out, scratch) for v in self.specs]
            validation = self.validate(out, variants) if cfg.validate else {"skipped": True}
            shapes = _layer_shapes(self.manifest)
            manifest = {
                "otaro_artifact": FORMAT_VERSION,
                "format": "onnx",
                "created": t0.isoformat(timespec="seconds"),
                "export_seconds": round((_dt.datetime.now(_dt.timezone.utc) - t0).total_seconds(), 2),
                "source": {"checkpoint": str(cfg.checkpoint), "method": self.manifest.get("method"),
                           "source_model": self.manifest.get("source")},
                "architecture": {"arch": self.manifest["arch"], "model_type": self.manifest["model_type"],
                                 "num_hidden_layers": self.hf_config.get("num_hidden_layers"),
                                 "vocab_size": self.hf_config.get("vocab_size")},
                "model": {"file": "model.onnx", "data": "model.onnx" + rewrite.DATA_SUFFIX,
                          "opset": ops.OPSET, "ir_version": ops.IR_VERSION,
                          "files": _files(out, main["model_files"])},
                "sefp": {"format": self.fmt.name, "group_size": self.fmt.group_size, "rounding": self.fmt.rounding,
                         "scale": self.fmt.scale, "top_bits": self.fmt.top_bits,
                         "exponent_bits": self.fmt.exponent_bits,
                         "domain": ops.DOMAIN, "function": ops.function_name(self.fmt), "bits_input": ops.BITS_INPUT,
                         "layout": "mantissa int8 [K, N]; scale8 float32 [ceil(K/G), N] = "
                                   + ("2^(E-6-x)" if self.fmt.scale == "pow2" else "fp16 scale * 2^-x")},
                "bits": list(self.bits),
                "trained_bits": self.manifest.get("trained_bits"),
                "default_bits": self.default_bits,
                "accuracy_level": cfg.accuracy_level,
                "graph": self.graph,
                "tied_head": self.tied,
                "head": self.model.otaro.head.record() if self.model.otaro.head is not None else None,
                "layers": {n: {"in_features": K, "out_features": N, "node": self.located[n][1]}
                           for n, (K, N) in shapes.items()},
                "float_bytes": self.float_bytes,
                "precisions": _precision_sizes(self.fmt, shapes, self.float_bytes, self.model.otaro.head),
                "files": _files(out, main["side_files"]),
                "variants": variants,
                "validation": validation,
                "tools": _tool_versions(),
            }
            for rec in manifest["layers"].values():
                rec.pop("node")  # initializer names of the traced graph mean nothing to a reader
            shutil.rmtree(scratch, ignore_errors=True)
            write_json(out / MANIFEST, manifest)
        return manifest


def export(cfg: ExportConfig, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Write the artifact folder; returns its manifest."""
    return _Exporter(cfg, progress).run()
