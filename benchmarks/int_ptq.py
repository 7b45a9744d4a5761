"""Integer post-training quantization on SmolLM2-135M: our RTN / GPTQ / AWQ against
onnxruntime's RTN / GPTQ / HQQ, and the multi-task methods on two LoRA tasks (issue 10).

Judged as ``benchmarks/quality.py`` judges (its helpers are imported, not copied): per-token KL
divergence to the fp32 model, top-1 agreement with it and perplexity, over the same token
windows of Brown k-r (``brown-eval``) and Jane Austen, against fp32 reference log-probs computed
once per text (``otaro.evaluation.reference``). Every row is int{b}-g{G}-asym, b in {2, 3, 4, 8},
G in {64, 128} (g32 is left out: SmolLM2's weights come from a Q4_1 GGUF and sit exactly on a
4-bit asymmetric g32 grid, docs/FACTS.md).

* **Ours** (``otaro.methods``): ``rtn``, ``gptq`` (act-order, static groups, sequential on the
  quantized prefix), ``awq`` (scales folded into the norms, clip search), calibrated on Brown a-j
  (``brown-train``), scored with our torch path.
* **onnxruntime's** ``MatMulNBitsQuantizer`` on a float ONNX export of the same model (optimum,
  ``text-generation-with-past``, via ``otaro.export.trace``): ``DefaultWeightOnlyQuantConfig``
  (RTN), ``GPTQWeightOnlyQuantConfig`` (GPTQ, the same calibration windows; its solver and packer
  driven in one pass, see ``ort_gptq_one_pass``; ``ort-gptq-fixed``: with its error feedback
  bug fixed, see ``_lower_factor``) and ``HQQWeightOnlyQuantConfig`` (HQQ), only the MatMuls of the 30
  blocks (the tied lm_head stays fp32, as ours), scored by running the quantized graph with
  onnxruntime over the same windows (full windows, empty past) at ``accuracy_level`` 1 (fp32
  activations, no int8 rounding).
* **Two tasks**: Brown and Austen, each with a LoRA trained by PEFT from the fp32 model (a few
  hundred CPU steps at most); one quantized base for both by ``mlgptq`` / ``mlawq`` against
  their tweaked baselines ``gptq-pooled`` / ``awq-pooled``, and per-task GPTQ (one base per
  task, calibrated on that task with its LoRA active). Each task is scored with its adapter
  (the AWQ variants with the adapters rescaled by the fold) against fp32 base + that adapter.

Writes benchmarks/results/int_ptq.json, int_ptq.png and the ``int_ptq`` section of
benchmarks/RESULTS.md (``--quick``: a tiny random model, seconds, into ``--out`` only), prints
a check mark per goal. Every measured row is cached under ~/.cache/otaro/bench/int_ptq, keyed by
the settings, so an interrupted run resumes and a later run with other ``--bits/--groups/
--methods`` adds its rows to the same table.

Usage: python benchmarks/int_ptq.py [--bits 2,3,4,8] [--groups 64,128] [--methods rtn,gptq,...]
       [--windows N] [--calib-samples N] [--no-tasks] [--lora-steps N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (the quality benchmark's quantize / evaluate / cache / averaging)

MODEL = quality.MODEL
TEXTS = quality.TEXTS
CALIB = quality.CALIB
OURS = ("rtn", "gptq", "awq")
ORT = ("ort-rtn", "ort-gptq", "ort-gptq-fixed", "ort-hqq")
ALL_METHODS = OURS + ORT
# NAME[H]: a multi-task method with --ml-hessian H (bare: otaro's default)
TASK_METHODS = ("rtn", "gptq-pooled", "mlgptq", "mlgptq[max-psd]", "mlgptq[max]", "awq-pooled", "mlawq",
                "mlawq[max-psd]", "mlawq[max]", "gptq-per-task")


def task_method(name: str) -> tuple[str, str | None, str]:
    """(otaro method, --ml-hessian or None, cache name) of a TASK_METHODS entry. The literal max
    keeps the bare cache name: it was the only combination when those rows were measured."""
    base, _, rest = name.partition("[")
    if base not in ("mlgptq", "mlawq"):
        return ("mlgptq" if base == "gptq-per-task" else base), None, base
    from otaro.quantize import QuantizeConfig

    h = rest.rstrip("]") or QuantizeConfig.__dataclass_fields__["ml_hessian"].default
    return base, h, base if h == "max" else f"{base}[{h}]"
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
# bump when a change alters measured numbers, so old cache entries are not mixed in
SCHEMA = 1
CACHE_ROOT = Path.home() / ".cache" / "otaro" / "bench" / "int_ptq"
GOAL_BITS, GOAL_GROUP = 4, 128

log = logging.getLogger("int_ptq")


@dataclass(frozen=True)
class Row:
    method: str  # one of ALL_METHODS
    bits: int
    group: int

    @property
    def fmt(self) -> str:
        return f"int{self.bits}-g{self.group}-asym"

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.method.startswith("ort-") else "otaro"

    @property
    def label(self) -> str:
        return f"{self.method} g{self.group}"


class Cache(quality.Cache):
    """quality.Cache (key -> value, persisted after every put), under our own folder."""

    def __init__(self, key: str, root: Path):
        self.path = Path(root) / f"{key}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    src: object  # .model, .tokenizer
    model_name: str
    windows: list  # Windows per text
    calib: object  # [n, L] calibration windows (brown-train)
    ref: object  # LogprobCache of the fp32 model on `windows`
    ref_scores: list
    shapes: list  # (out, in) of every quantized linear
    linear_names: list
    key: str
    blocks: int


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def setup(args) -> Setup:
    from otaro.arch import get_adapter, get_layers
    from otaro.evaluation import reference as refs
    from otaro.evaluation.data import make_windows, read_text
    from otaro.methods.calib import calibration_windows
    from otaro.sources import load_source

    name = "tiny-llama" if args.quick else MODEL
    src = load_source(name)
    src.model.eval()
    max_pos = getattr(src.model.config, "max_position_embeddings", None)
    windows = [make_windows(src.tokenizer, text, args.seq_len, args.windows, label, max_pos)
               for label, text in (read_text(t) for t in TEXTS)]
    calib = calibration_windows(src.tokenizer, list(CALIB), args.calib_samples, args.calib_len, seed=0,
                                max_positions=max_pos)
    adapter = get_adapter(src.model)
    names, shapes = [], []
    for i, layer in enumerate(get_layers(src.model, adapter)):
        for rel in adapter.linear_names:
            lin = layer.get_submodule(rel)
            names.append(f"{adapter.layers_path}.{i}.{rel}")
            shapes.append((lin.out_features, lin.in_features))
    key = hashlib.sha256(json.dumps([SCHEMA, name, args.seq_len, args.windows, args.calib_samples,
                                     args.calib_len]).encode()).hexdigest()[:12]
    print(f"reference log-probs: {sum(len(w.tokens) for w in windows)} windows of {args.seq_len} tokens", flush=True)
    ref, ref_scores = refs.compute(src.model, windows, args.batch_size)
    return Setup(src, name, windows, calib, ref, ref_scores, shapes, names, key, len(get_layers(src.model, adapter)))


def layout_bpw(shapes, bits: int, group: int, scale_bits: int, zero_bits: int) -> float:
    """Stored bits per weight of the quantized linears when every row is cut into ceil(K/G)
    groups, the last one zero-padded to G (what both our formats and MatMulNBits do when G does
    not divide K): padded codes + one scale and one zero point per group."""
    total = sum(o * k for o, k in shapes)
    stored = sum(o * math.ceil(k / group) * (group * bits + scale_bits + zero_bits) for o, k in shapes)
    return stored / total


# --------------------------------------------------------------------------- our methods


def run_ours(row: Row, S: Setup, args) -> dict:
    q = quality.Row(row.label, row.method, row.fmt, False, (row.bits,))
    t = time.perf_counter()
    model = quality.quantize(q, S.src, S.calib, args)
    tq = time.perf_counter() - t
    rows = quality.evaluate(model, q, S.windows, S.ref, args.batch_size)
    bpw = layout_bpw(S.shapes, row.bits, row.group, 16, row.bits)
    for r in rows:
        r["bits_per_weight_effective"] = bpw
    return {"rows": rows, "quantize_s": tq, "eval_s": time.perf_counter() - t - tq,
            "layout": "otaro IntLinear: fp16 scale + b-bit zero per group, last group of a ragged row zero-padded"}


# --------------------------------------------------------------------------- onnxruntime


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime's quantizer logs one INFO line per node; keep warnings."""
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor",
             "onnxruntime.quantization")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # its progress bars
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class OrtModel:
    """The fp32 ONNX export (cached), which MatMuls are ours to quantize, and how to run it."""

    def __init__(self, S: Setup, args):
        import onnx

        from otaro.export.trace import locate_linears, trace_decoder

        self.dir = Path(args.cache_dir) / "onnx" / S.model_name
        self.path = self.dir / "model.onnx"
        if not self.path.is_file():
            t = time.perf_counter()
            print(f"exporting the fp32 model to ONNX (optimum) into {self.dir}", flush=True)
            import shutil

            partial = self.dir.with_name(self.dir.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            trace_decoder(copy.deepcopy(S.src.model).float().eval(), partial)
            shutil.rmtree(self.dir, ignore_errors=True)
            partial.rename(self.dir)
            self.export_s = time.perf_counter() - t
        else:
            self.export_s = None
        proto = onnx.load(str(self.path))
        found = locate_linears(proto, S.src.model, S.linear_names)  # checked by value, bit for bit
        self.targets = [proto.graph.node[k].name for k, _ in found.values()]
        self.distinct_inputs = len({proto.graph.node[k].input[0] for k, _ in found.values()})
        inits = {i.name for i in proto.graph.initializer}
        self.exclude = [n.name for n in proto.graph.node
                        if n.op_type == "MatMul" and n.name not in set(self.targets) and any(i in inits for i in n.input)]
        self.threads = args.threads
        del proto

    def load(self):
        import onnx

        return onnx.load(str(self.path))

    def session(self, proto):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])

    @staticmethod
    def feeds(decoder, ids):
        """One full window, empty past (no KV cache needed for whole-window logits)."""
        import numpy as np

        x = np.asarray(ids, dtype=np.int64)
        if x.ndim == 1:
            x = x[None]
        f = {"input_ids": x, "attention_mask": np.ones_like(x), **decoder.empty_past(x.shape[0])}
        if decoder.io.has_position_ids:
            f["position_ids"] = np.arange(x.shape[1], dtype=np.int64)[None].repeat(x.shape[0], 0)
        return f


def score_onnx(session, windows, reference):
    """``otaro.evaluation.metrics.score`` for an onnxruntime session: the same windows (BOS first
    if the model expects one), the same logits positions, the same NLL and fidelity."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from otaro.evaluation.metrics import Score, fidelity, summarize_fidelity
    from otaro.runtime.decoder import Decoder

    dec = Decoder(session)
    seq_len = windows.tokens.shape[1]
    nll, count, kls, tops = 0.0, 0, [], []
    for i in range(len(windows.tokens)):
        inputs = windows.model_inputs(i, i + 1).numpy()
        logits = session.run(["logits"], OrtModel.feeds(dec, inputs))[0]
        logits = torch.from_numpy(np.ascontiguousarray(logits[:, -seq_len:-1])).float()
        target = windows.tokens[i : i + 1, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
        kl, top1 = fidelity(torch.as_tensor(reference[i : i + 1]), logits)
        kls.append(kl.reshape(-1).numpy())
        tops.append(top1.reshape(-1).numpy())
    return Score(nll, count, sum(windows.predicted_bytes), **summarize_fidelity(np.concatenate(kls), np.concatenate(tops)))


def _set_accuracy_level(proto, level: int) -> int:
    import onnx

    n = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        n += 1
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = level
                break
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return n


def _stored_bpw(proto, shapes) -> float | None:
    """Bits per weight measured from the MatMulNBits initializers (codes, scales, zero points)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    stored = sum(numpy_helper.to_array(inits[i]).nbytes * 8 for n in nodes for i in list(n.input)[1:] if i in inits)
    return stored / sum(o * k for o, k in shapes)


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration windows."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r

    def rewind(self):
        self.i = 0


def calib_feeds(om: OrtModel, calib, fp32_session):
    from otaro.runtime.decoder import Decoder

    dec = Decoder(fp32_session)
    return [OrtModel.feeds(dec, calib[i : i + 1].numpy()) for i in range(len(calib))]


@contextlib.contextmanager
def _lower_factor():
    """onnxruntime 1.32's ``weight_only.gptq`` takes ``cholesky(inv(H)).T`` (the upper factor U)
    and then feeds the error back through ``Hinv1[i:, i]`` and ``Hinv[i2:, i1:i2]``, the part of U
    *below* its diagonal: zeros, so it never compensates anything and returns RTN on its group
    parameters. Handing it the lower factor (its ``.T`` then gives L = Uᵀ, whose column i below
    the diagonal is U's row i) makes those lines the reference GPTQ update. Used for the
    ``ort-gptq-fixed`` rows only; numpy's cholesky is restored on exit."""
    import numpy as np

    real = np.linalg.cholesky
    np.linalg.cholesky = lambda a: real(a).T
    try:
        yield
    finally:
        np.linalg.cholesky = real


def ort_solver_check(K: int = 576, N: int = 256, tokens: int = 4096, bits: int = 4, group: int = 128,
                     seed: int = 0) -> dict:
    """onnxruntime's ``weight_only.gptq`` as shipped, with ``_lower_factor``, and our ``gptq_solve``
    on one isolated problem (a random [K, N] weight, a correlated Hessian with a few outlier
    channels, as activations have): the output error tr(ΔWᵀ H ΔW) of each, and of RTN (its solver
    with H = I). Separates the solver from the Hessians in the whole-model rows. A second, fast."""
    import numpy as np
    import torch
    from onnxruntime.quantization.neural_compressor import weight_only as W

    from otaro.formats import get_format
    from otaro.methods.gptq import gptq_solve
    from otaro.methods.int_quantizer import IntColumnQuantizer

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, K)) @ (0.3 * rng.standard_normal((K, K)) + np.eye(K))
    X[:, :5] *= 20
    H = 2 / tokens * X.T @ X
    Wt = (0.05 * rng.standard_normal((K, N))).astype(np.float32)  # MatMul layout [K, N]

    def err(Q):
        D = (Q - Wt).astype(np.float64)
        return float(np.trace(D.T @ H @ D))

    kw = dict(num_bits=bits, group_size=group, scheme="asym")
    out = {"shape": [K, N], "tokens": tokens, "bits": bits, "group": group,
           "rtn": err(W.gptq(Wt.copy(), np.eye(K), percdamp=0.0, **kw)),
           "ort-gptq": err(W.gptq(Wt.copy(), H.copy(), **kw))}
    with _lower_factor():
        out["ort-gptq-fixed"] = err(W.gptq(Wt.copy(), H.copy(), **kw))
    q = IntColumnQuantizer(get_format(f"int{bits}-g{group}-asym"))
    gptq_solve(torch.from_numpy(Wt.T.copy()), torch.from_numpy(H), q)
    scale = q.scale.repeat_interleave(group, 1)[:, :K]
    zero = q.zero.repeat_interleave(group, 1)[:, :K].float()
    out["gptq"] = err(((q.codes[:, :K].float() - zero) * scale).numpy().T)
    return out


def ort_gptq_one_pass(proto, feeds, targets: list[str], bits: int, group: int, percdamp=0.01, blocksize=128,
                      actorder=False, mse=False, perchannel=True, accuracy_level=1, threads=2, fixed=False):
    """onnxruntime's GPTQ (``neural_compressor.weight_only.gptq_quantize``, what
    ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` runs) with its data collection
    reordered: it runs the whole fp32 model once per distinct MatMul input *and* calibration
    window (121 × 32 forwards here, hours on 2 cores); this runs each window once and accumulates
    every input's H with its formula. Everything else is its code: the H of the fp32 model (not
    the quantized prefix), its ``gptq`` solver (on a copy of H per MatMul, as its one array per
    weight), its padding and
    ``quant_tensor`` repacking into MatMulNBits at 4 bits, fp32 fake-quantized weights at other b
    (its code has no MatMulNBits path for them). ``--quick`` checks the result is identical to
    the stock quantizer's."""
    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor import weight_only as W
    from onnxruntime.quantization.neural_compressor.onnx_model import ONNXModel

    model = ONNXModel(proto)
    org_output = copy.deepcopy(model.model.graph.output)
    model.remove_tensors_from_outputs([i.name for i in org_output])
    tset = set(targets)
    output_names = list(dict.fromkeys(n.input[0] for n in model.nodes() if n.op_type == "MatMul" and n.name in tset))
    model.add_tensors_to_outputs(output_names)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(model.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    Hs, ns = {}, {}
    for data in feeds:
        outs = session.run(output_names, data)
        for name, inp in zip(output_names, outs):
            H = Hs.get(name)
            if H is None:
                H = np.zeros((inp.shape[-1], inp.shape[-1]))
                ns[name] = 0
            # gptq_quantize's accumulation, line for line (nsamples counts the batch dimension)
            tmp = inp.shape[0]
            inp = np.reshape(inp, (-1, inp.shape[-1]))
            H = H * (ns[name] / (ns[name] + tmp))
            ns[name] += tmp
            inp = np.sqrt(2 / ns[name]) * inp
            Hs[name] = H + np.matmul(inp.T, inp)
    del session
    for input_name in output_names:
        nodes = [n for n in model.input_name_to_nodes[input_name]
                 if n.op_type == "MatMul" and n.name in tset and model.get_initializer(n.input[1]) is not None]
        H = Hs[input_name]
        for node in nodes:
            weight = numpy_helper.to_array(model.get_initializer(model.get_node(node.name).input[1])).copy()
            dtype = weight.dtype
            with _lower_factor() if fixed else contextlib.nullcontext():
                q_weight = W.gptq(weight, H.copy(), num_bits=bits, group_size=group, scheme="asym",
                                  blocksize=blocksize, percdamp=percdamp, actorder=actorder, mse=mse,
                                  perchannel=perchannel)
            weight_tensor = model.get_initializer(node.input[1])
            init_share_num = model.get_initializer_share_num(node.input[1])
            if bits == 4:
                org_shape = weight.shape
                k_blocks = (org_shape[0] + group - 1) // group
                q_weight = W.pad_tensor(q_weight, group, k_blocks)
                q_weight, scale, zp = W.quant_tensor(q_weight.T, bits, group, "asym", "uint")
                # its make_matmul_weight_only_node packs the zero points of all rows as one nibble
                # stream and then reshapes to [N, -1], which fails when ceil(K/G) is odd (K = 576 at
                # g64 and g128); MatMulNBits wants each row's zero points in whole bytes, [N,
                # ceil(k_blocks/2)]. Same bytes when ceil(K/G) is even; this packs them per row.
                q_node, new_inits = W.make_matmul_weight_only_node(
                    node=node, weight_shape=org_shape, num_bits=bits, group_size=group, k_blocks=k_blocks,
                    q_weight=q_weight.astype("uint8"), scale=scale.astype(dtype), zero_point=None,
                    accuracy_level=accuracy_level)
                new_inits.append(_packed_zero_points(zp, org_shape[1], k_blocks, node.input[1] + "_zp"))
                q_node.input.append(new_inits[-1].name)
                model.add_initializers(new_inits)
                model.remove_node(node)
                model.add_node(q_node)
            else:
                import onnx

                t = onnx.helper.make_tensor(name=node.input[1] + f"_Q{bits}G{group}",
                                            data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype),
                                            dims=q_weight.shape, vals=q_weight.astype(dtype).tobytes(), raw=True)
                model.add_initializer(t)
                node.input[1] = t.name
            if init_share_num == 1:
                model.remove_initializer(weight_tensor)
    model.remove_tensors_from_outputs(output_names)
    model.model.graph.output.MergeFrom(org_output)
    model.topological_sort()
    return model.model


def _packed_zero_points(zp, n: int, k_blocks: int, name: str):
    """4-bit zero points [N * k_blocks] -> uint8 [N, ceil(k_blocks / 2)], low nibble first, each
    row padded with the default zero point 8 (MatMulNBits' layout)."""
    import numpy as np
    import onnx

    z = np.asarray(zp, dtype=np.uint8).reshape(n, k_blocks)
    if k_blocks % 2:
        z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
    packed = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name=name, data_type=onnx.TensorProto.UINT8, dims=packed.shape,
                                   vals=packed.tobytes(), raw=True)


def ort_gptq_stock(proto, feeds, om: OrtModel, bits: int, group: int):
    """The stock path: MatMulNBitsQuantizer + GPTQWeightOnlyQuantConfig (4-bit template; other b
    and the excluded lm_head set through its per-node weight config)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    class Quantizer(MatMulNBitsQuantizer):
        def _generate_q4_node_config(self):
            cfg = super()._generate_q4_node_config()
            for k in cfg:
                cfg[k] = "fp32" if k in self.nodes_to_exclude else {**cfg[k], "bits": bits}
            return cfg

    q = Quantizer(proto, bits=bits, block_size=group, is_symmetric=False, accuracy_level=1,
                  nodes_to_exclude=om.exclude,
                  algo_config=GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(list(feeds)), percdamp=0.01,
                                                        block_size=128, actorder=False, mse=False, perchannel=True))
    q.process()
    return q.model.model


def ort_quantize(row: Row, om: OrtModel, feeds):
    """(quantized ModelProto, note) or (None, why not)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    b, G = row.bits, row.group
    if row.method == "ort-hqq" and b == 8:
        return None, ("n/a: HQQ stores float zero points, and the CPU MatMulNBits kernel refuses 8-bit weights with "
                      "float zero points (\"use uint8 zero points\")")
    if row.method in ("ort-rtn", "ort-hqq") and b not in (2, 4, 8):
        return None, (f"n/a: MatMulNBitsQuantizer takes 2, 4 or 8 bits only (asserts bits in [2, 4, 8]; the CPU "
                      f"MatMulNBits kernel runs 2/4/8)")
    proto = om.load()
    if row.method == "ort-rtn":
        cfg = DefaultWeightOnlyQuantConfig(block_size=G, is_symmetric=False, accuracy_level=1, bits=b)
    elif row.method == "ort-hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=G, bits=b)
    else:
        out = ort_gptq_one_pass(proto, feeds, om.targets, b, G, threads=om.threads, fixed=row.method == "ort-gptq-fixed")
        note = "MatMulNBits" if b == 4 else (f"fp32 MatMul with {b}-bit fake-quantized weights (its GPTQ packs "
                                             "MatMulNBits at 4 bits only)")
        return out, note
    q = MatMulNBitsQuantizer(proto, bits=b, block_size=G, is_symmetric=False, accuracy_level=1,
                             nodes_to_exclude=om.exclude, algo_config=cfg)
    q.process()
    return q.model.model, "MatMulNBits"


def run_ort(row: Row, S: Setup, om: OrtModel, feeds, args) -> dict:
    t = time.perf_counter()
    with _quiet_ort():
        proto, note = ort_quantize(row, om, feeds)
    tq = time.perf_counter() - t
    if proto is None:
        return {"na": note, "quantize_s": None}
    n = _set_accuracy_level(proto, 1)
    bpw = _stored_bpw(proto, S.shapes) if n else layout_bpw(S.shapes, row.bits, row.group, 32, row.bits)  # simulated
    if n and n != len(om.targets):
        raise RuntimeError(f"{row.label} b{row.bits}: {n} MatMulNBits nodes, expected {len(om.targets)}")
    try:
        sess = om.session(proto)
    except Exception as e:  # noqa: BLE001  (onnxruntime refuses the graph it wrote: record why)
        return {"na": f"n/a: onnxruntime cannot load the quantized graph ({str(e).splitlines()[0][-200:]})",
                "quantize_s": tq}
    del proto
    rows = []
    for i, w in enumerate(S.windows):
        s = score_onnx(sess, w, S.ref[i])
        zero_bits = 32 if row.method == "ort-hqq" else row.bits  # HQQ: float zero points
        rows.append({"text": w.name, "bits": row.bits, "bits_per_weight": row.bits + (32 + zero_bits) / row.group,
                     "bits_per_weight_effective": bpw, "format": f"{row.method} b{row.bits} g{row.group}",
                     "kld": s.kld, "kld_p99": s.kld_p99, "top1": s.top1, "ppl": s.ppl, "bpb": s.bpb})
    return {"rows": rows, "quantize_s": tq, "eval_s": time.perf_counter() - t - tq, "container": note}


def check_ort_fp32(S: Setup, om: OrtModel) -> list[dict]:
    """The fp32 ONNX graph against the fp32 torch reference: KLD ~ 0 (the comparison is sound)."""
    sess = om.session(om.load())
    out = []
    for i, w in enumerate(S.windows):
        s = score_onnx(sess, w, S.ref[i])
        out.append({"text": w.name, "kld": s.kld, "top1": s.top1, "ppl": s.ppl})
    return out


def check_gptq_driver(om: OrtModel, feeds, bits: int, group: int) -> dict:
    """--quick: our one-pass driver gives the same model as the stock MatMulNBitsQuantizer on the
    MatMuls the stock packer can write (ceil(K/G) even at 4 bits); and whether the stock one
    fails on all of them."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = om.load()
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    k_of = {t: inits[nodes[t].input[1]].dims[0] for t in om.targets}
    even = [t for t in om.targets if bits != 4 or math.ceil(k_of[t] / group) % 2 == 0]
    if not even:
        return {"bits": bits, "group": group, "checked": 0}
    sub = copy.copy(om)
    sub.exclude = om.exclude + [t for t in om.targets if t not in even]
    with _quiet_ort():
        a = ort_gptq_one_pass(om.load(), feeds, even, bits, group, threads=om.threads)
        b = ort_gptq_stock(om.load(), feeds, sub, bits, group)
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    same = set(ia) == set(ib) and all(ia[k].shape == ib[k].shape and np.array_equal(ia[k], ib[k]) for k in ia)
    out = {"bits": bits, "group": group, "checked": len(even), "identical_initializers": bool(same)}
    if len(even) < len(om.targets):
        try:
            with _quiet_ort():
                ort_gptq_stock(om.load(), feeds, om, bits, group)
            out["stock_on_all"] = "ran"
        except Exception as e:  # noqa: BLE001  (what the stock quantizer does on odd ceil(K/G))
            out["stock_on_all"] = f"{type(e).__name__}: {e}"
    del onnx
    return out


# --------------------------------------------------------------------------- two tasks


def task_texts(root: Path) -> dict[str, tuple[str, str]]:
    """task -> (training/calibration data spec, evaluation text spec). Brown has its split;
    Austen is cut at a paragraph break at 80%: novels' first 80% train, the rest evaluates."""
    from otaro.assets.corpora import load_corpus

    root.mkdir(parents=True, exist_ok=True)
    train, ev = root / "austen-train.txt", root / "austen-eval.txt"
    if not (train.is_file() and ev.is_file()):
        text = load_corpus("austen")
        cut = text.rfind("\n\n", 0, int(0.8 * len(text)))
        train.write_text(text[:cut], encoding="utf-8")
        ev.write_text(text[cut:], encoding="utf-8")
    return {"brown": ("corpus:brown-train", "corpus:brown-eval"), "austen": (str(train), str(ev))}


def train_lora(S: Setup, task: str, data: str, out: Path, args) -> dict:
    """A PEFT LoRA on the fp32 model: r, alpha 2r, q/v/o/up/down, AdamW, batch × seq tokens/step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from otaro.methods.calib import calibration_windows

    if (out / "adapter_model.safetensors").is_file() and (out / "train.json").is_file():
        return json.loads((out / "train.json").read_text())
    max_pos = getattr(S.src.model.config, "max_position_embeddings", None)
    n = args.lora_steps * args.lora_batch
    windows = calibration_windows(S.src.tokenizer, [data], n, args.lora_len, seed=1, max_positions=max_pos)
    torch.manual_seed(0)
    model = copy.deepcopy(S.src.model).float()
    pm = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                           target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lora_lr, weight_decay=0.0)
    losses = []
    t = time.perf_counter()
    for step in range(args.lora_steps):
        batch = windows[step * args.lora_batch:(step + 1) * args.lora_batch]
        loss = pm(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.lora_steps // 5) == 0:
            print(f"  lora {task}: step {step + 1}/{args.lora_steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out))
    k = max(1, min(10, len(losses) // 4))
    info = {"task": task, "data": Path(data).name if not data.startswith("corpus:") else data,
            "steps": args.lora_steps, "batch": args.lora_batch, "seq_len": args.lora_len, "lr": args.lora_lr,
            "r": args.lora_r, "alpha": 2 * args.lora_r, "targets": LORA_TARGETS,
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "seconds": time.perf_counter() - t}
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


@contextlib.contextmanager
def record_damping():
    """Yields a list that collects the damping fraction ``gptq_solve`` ended up using per linear
    (it multiplies it by 10 while H + λI is not positive definite; an element-wise max of
    Hessians need not be)."""
    from otaro.methods import gptq as gptq_mod

    used: list[float] = []
    real = gptq_mod.gptq_solve

    def solve(*a, **kw):
        out = real(*a, **kw)
        used.append(float(out["damp"]))
        return out

    gptq_mod.gptq_solve = solve
    try:
        yield used
    finally:
        gptq_mod.gptq_solve = real


def _damp_summary(used: list[float], asked: float) -> dict:
    from collections import Counter

    return {"linears": len(used), "asked": asked,
            "escalated": sum(1 for d in used if d > asked * 1.0001),
            "counts": {f"{d:g}": n for d, n in sorted(Counter(used).items())}}


def _with_adapter(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def run_tasks(S: Setup, args, cache: Cache) -> dict:
    """The two-task table: one entry per method with each task's metrics under its adapter."""
    import torch

    from otaro.evaluation import reference as refs
    from otaro.evaluation.data import make_windows, read_text
    from otaro.evaluation.metrics import score
    from otaro.export.trace import float_copy
    from otaro.formats import get_format
    from otaro.methods import get_method
    from otaro.methods.calib import calibration_windows
    from otaro.methods.multitask import TaskSpec, save_task_outputs
    from otaro.quantize import QuantizeConfig

    texts = task_texts(Path(args.cache_dir) / "texts")
    lkey = hashlib.sha256(json.dumps([S.model_name, args.lora_steps, args.lora_batch, args.lora_len, args.lora_lr,
                                      args.lora_r]).encode()).hexdigest()[:10]
    adir = Path(args.cache_dir) / "adapters" / lkey
    print(f"two tasks: LoRA adapters in {adir}", flush=True)
    lora = {t: train_lora(S, t, texts[t][0], adir / t, args) for t in texts}
    max_pos = getattr(S.src.model.config, "max_position_embeddings", None)
    ev = {t: make_windows(S.src.tokenizer, read_text(texts[t][1])[1], args.seq_len, args.windows,
                          f"{t}-eval", max_pos) for t in texts}
    specs = tuple(TaskSpec(t, str(adir / t), (texts[t][0],)) for t in texts)
    n_cal = args.task_calib_samples
    calib = {t.name: calibration_windows(S.src.tokenizer, t.data, n_cal, args.calib_len, seed=0, max_positions=max_pos)
             for t in specs}
    # references: fp32 base + the task's adapter, on the task's evaluation windows
    refc, ref_fp, base_fp = {}, {}, {}
    for t in texts:
        pm = _with_adapter(copy.deepcopy(S.src.model), adir / t)
        refc[t], sc = refs.compute(pm, [ev[t]], args.batch_size)
        ref_fp[t] = sc[0].ppl
        base_fp[t] = score(S.src.model, ev[t], args.batch_size).ppl
        del pm
    fmt_name = args.task_format
    fmt = get_format(fmt_name)
    out = {"format": fmt_name, "calib_samples_per_task": n_cal, "calib_len": args.calib_len,
           "lora": lora, "lora_key": lkey, "eval_windows": {t: len(ev[t].tokens) for t in texts},
           "eval_texts": {t: Path(texts[t][1]).name if not texts[t][1].startswith("corpus:") else texts[t][1]
                          for t in texts},
           "fp32": {t: {"ppl_with_adapter": ref_fp[t], "ppl_without_adapter": base_fp[t]} for t in texts},
           "methods": {}}
    try:
        for method in args.task_methods:
            real, ml_hessian, cname = task_method(method)
            key = ("task", SCHEMA, lkey, cname, fmt_name, n_cal, args.calib_len)
            got = cache.get(key)
            if got is None and args.cached_only:
                continue
            if got is not None and "damp" not in got and not args.cached_only and (real == "mlgptq"
                                                                                 or method == "gptq-pooled"):
                got = None  # measured before the damping was recorded
            if got is None:
                got = {"tasks": {}, "quantize_s": 0.0}
                damp_used: list[float] = []
                runs = [(specs, [t.name for t in specs])] if method != "gptq-per-task" else [((t,), [t.name]) for t in specs]
                for tasks, scored in runs:
                    m = get_method(real)
                    cfg = QuantizeConfig(model=S.model_name, output=str(Path(tempfile.gettempdir()) / "otaro-int-ptq-unused"),
                                         method=real, format=fmt_name, calib_samples=n_cal, calib_len=args.calib_len,
                                         tasks=tasks if m.multi_task else (),
                                         **({"ml_hessian": ml_hessian} if ml_hessian else {}))
                    t0 = time.perf_counter()
                    with torch.no_grad(), record_damping() as used:
                        model = m.run(copy.deepcopy(S.src.model), fmt, cfg,
                                      {t.name: calib[t.name] for t in tasks} if m.multi_task else None, None)
                    got["quantize_s"] += time.perf_counter() - t0
                    damp_used += used
                    with tempfile.TemporaryDirectory() as tmp:
                        rescaled = getattr(model, "otaro_task_adapters", None)
                        if m.multi_task:
                            save_task_outputs(model, tmp)  # AWQ kinds: adapters/<task>/ rescaled by the fold
                        for name in scored:
                            adapter = Path(tmp) / "adapters" / name if rescaled else adir / name
                            pm = _with_adapter(float_copy(model), adapter)
                            s = score(pm, ev[name], args.batch_size, reference=refc[name][0])
                            got["tasks"][name] = {"kld": s.kld, "kld_p99": s.kld_p99, "top1": s.top1, "ppl": s.ppl,
                                                  "adapter": "rescaled by the AWQ fold" if rescaled else "as trained"}
                            del pm
                    del model
                if damp_used:
                    got["damp"] = _damp_summary(damp_used, cfg.damp)
                cache.put(key, got)
            out["methods"][method] = got
            print(f"task {method:14s} quantize {got['quantize_s']:6.1f}s  " + "  ".join(
                f"{t}: kld {v['kld']:.4f} ppl {v['ppl']:.2f}" for t, v in got["tasks"].items()), flush=True)
    finally:
        for c in refc.values():
            c.close()
    return out


# --------------------------------------------------------------------------- driver


def plan(args) -> list[Row]:
    rows = [Row(m, b, G) for G in args.groups for b in args.bits for m in args.methods]
    # the goal rows (b = 4) first, so a run cut short still has them
    return sorted(rows, key=lambda r: (r.bits != GOAL_BITS, r.group != GOAL_GROUP, r.bits, r.group,
                                       ALL_METHODS.index(r.method)))


def seed_cache_from_published(cache: "Cache", S: Setup, args) -> int:
    """Rows of the published ``results/int_ptq.json`` into an empty cache, when they were measured
    with these settings (model, windows, calibration), so a run on a new machine adds rows to the
    published tables instead of starting them over. AWQ rows only when their scale search used the
    same number of windows (``awq_search_samples``, recorded since it became a setting)."""
    from otaro.quantize import QuantizeConfig

    path = HERE / "results" / "int_ptq.json"
    if args.quick or not path.exists():
        return 0
    pub = json.loads(path.read_text())
    a = pub.get("args") or {}
    same = (pub.get("model") == S.model_name and all(a.get(k) == getattr(args, k)
                                                     for k in ("windows", "seq_len", "calib_samples", "calib_len")))
    if not same:
        return 0
    awq_search = QuantizeConfig.__dataclass_fields__["search_samples"].default
    by: dict = {}
    for r in pub["rows"]:
        if r.get("engine") == "torch":
            continue
        by.setdefault((r["method"], r["bits"], r["group"]), []).append(
            {k: v for k, v in r.items() if k not in ("label", "method", "engine", "group")})
    n = 0
    for (method, bits, group), rows in by.items():
        row = Row(method, bits, group)
        if cache.get(row) is not None or (method == "awq" and pub.get("awq_search_samples") != awq_search):
            continue
        tag = f"{row.label} b{bits}"
        cache.put(row, {"rows": rows, "quantize_s": pub.get("quantize_seconds", {}).get(tag),
                        "container": pub.get("containers", {}).get(tag), "row": [method, bits, group],
                        "from_published": True})
        n += 1
    if cache.get("ort-meta") is None and pub.get("ort_distinct_inputs"):
        cache.put("ort-meta", {"distinct_inputs": pub["ort_distinct_inputs"], "export_s": pub.get("onnx_export_seconds")})
    if cache.get("ort-fp32-check") is None and pub.get("ort_fp32_check"):
        cache.put("ort-fp32-check", pub["ort_fp32_check"])
    return n


def run(args) -> dict:
    import torch

    from otaro.evaluation.run import machine_info
    from otaro.quantize import QuantizeConfig

    _threads(args.threads)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs, {args.threads} threads)", flush=True)
    S = setup(args)
    cache = Cache(S.key, args.cache_dir)
    seeded = seed_cache_from_published(cache, S, args)
    if seeded:
        print(f"{seeded} rows measured with these settings taken from results/int_ptq.json", flush=True)
    result_rows: list[dict] = []
    timings: dict[str, float] = {}
    na: dict[str, str] = {}
    containers: dict[str, str] = {}
    extra: dict = {}
    try:
        for w, s in zip(S.windows, S.ref_scores):
            result_rows.append({"text": w.name, "label": "fp32", "method": "none", "engine": "torch", "group": None,
                                "bits": None, "bits_per_weight": 32.0, "bits_per_weight_effective": 32.0,
                                "kld": 0.0, "kld_p99": 0.0, "top1": 1.0, "ppl": s.ppl, "bpb": s.bpb})
        todo = plan(args)
        om = feeds = None
        if any(r.engine == "onnxruntime" for r in todo) or args.quick:
            om = OrtModel(S, args)
            fp32_sess = om.session(om.load())
            feeds = calib_feeds(om, S.calib, fp32_sess)
            del fp32_sess
            got = cache.get("ort-fp32-check")
            if got is None:
                got = check_ort_fp32(S, om)
                cache.put("ort-fp32-check", got)
            extra["ort_fp32_check"] = got
            cache.put("ort-meta", {"distinct_inputs": om.distinct_inputs,
                                   "export_s": om.export_s or (cache.get("ort-meta") or {}).get("export_s")})
            print("fp32 ONNX vs torch: " + ", ".join(f"{r['text']} KLD {r['kld']:.2e} top-1 {100 * r['top1']:.2f}%"
                                                     for r in got), flush=True)
            if args.quick:
                extra["ort_gptq_driver_check"] = [check_gptq_driver(om, feeds, b, 32) for b in (4, 3)]
                print("ORT GPTQ one-pass driver vs stock:", extra["ort_gptq_driver_check"], flush=True)
        else:  # measured by an earlier run with these settings, if any
            extra["ort_fp32_check"] = cache.get("ort-fp32-check")
        extra["ort_solver_check"] = ort_solver_check()  # about a second; not cached (it is the claim)
        meta = cache.get("ort-meta") or {}
        for row in todo:
            if cache.get(row) is None and not args.cached_only:
                print(f"... {row.label} b{row.bits}", flush=True)
                got = run_ours(row, S, args) if row.engine == "otaro" else run_ort(row, S, om, feeds, args)
                cache.put(row, {**got, "row": [row.method, row.bits, row.group]})
        # every row measured with these settings, this run's or an earlier one's (--bits/--methods subsets add up)
        for k, got in cache.data.items():
            if not k.startswith("Row("):
                continue
            row = Row(*got["row"])
            tag = f"{row.label} b{row.bits}"
            if "na" in got:
                na[tag] = got["na"]
                continue
            timings[tag] = got["quantize_s"]
            if got.get("container"):
                containers[tag] = got["container"]
            for r in got["rows"]:
                result_rows.append({"label": row.label, "method": row.method, "engine": row.engine,
                                    "group": row.group, **r})
            first = [r for r in got["rows"] if r["text"] == S.windows[0].name]
            print(f"{tag:22s} quantize {got['quantize_s'] or float('nan'):7.1f}s  " + "  ".join(
                f"{r['text']}: kld {r['kld']:.4f} top1 {100 * r['top1']:.1f}%" for r in got["rows"]), flush=True)
        # the task rows in a file of their own: a tasks-only run (--methods "") may run beside a main one
        tasks = run_tasks(S, args, Cache(S.key + "-tasks", args.cache_dir)) if args.tasks else None
    finally:
        S.ref.close()
    load_end = os.getloadavg()
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}", flush=True)
    return {
        "model": S.model_name,
        "rows": result_rows,
        "na": na,
        "containers": containers,
        "tasks": tasks,
        "windows": {w.name: {"count": len(w.tokens), "seq_len": args.seq_len, "text_tokens": w.total_tokens}
                    for w in S.windows},
        "calibration": {"texts": list(CALIB), "samples": args.calib_samples, "seq_len": args.calib_len},
        "ragged": {"in_features": sorted({k for _, k in S.shapes}),
                   "note": ragged_note(S.shapes, sorted({r.group for r in plan(args)} | set(args.groups)))},
        "blocks": S.blocks,
        "linears": len(S.linear_names),
        "ort_distinct_inputs": meta.get("distinct_inputs"),
        "quantize_seconds": timings,
        "awq_search_samples": QuantizeConfig.__dataclass_fields__["search_samples"].default,
        "onnx_export_seconds": meta.get("export_s"),
        **extra,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {**machine_info(), "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
                    "optimum": _version("optimum"), "peft": _version("peft"), "torch_threads": torch.get_num_threads()},
    }


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "?"


def ragged_note(shapes, groups) -> str:
    ks = sorted({k for _, k in shapes})
    parts = []
    for G in groups:
        rag = [k for k in ks if k % G]
        if rag:
            parts.append(f"g{G}: K = {', '.join(map(str, rag))} is not a multiple of {G}; the last group of each row "
                         f"holds {', '.join(str(k % G) for k in rag)} weights and is zero-padded to {G}")
        else:
            parts.append(f"g{G}: every K ({', '.join(map(str, ks))}) is a multiple of {G}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- goals / report


def _mean(rows, **match):
    return quality.mean_over_texts(rows, **match)


def goals(result) -> list[tuple[bool | None, str]]:
    rows = [r for r in result["rows"] if r["bits"] is not None]
    b, G = GOAL_BITS, GOAL_GROUP
    m = {k: _mean(rows, method=k, bits=b, group=G) for k in ALL_METHODS}
    out = []
    rtn, gptq, awq, og = m["rtn"], m["gptq"], m["awq"], m["ort-gptq"]
    if rtn and gptq:
        r = gptq["kld"] / rtn["kld"]
        out.append((r <= 0.6, f"b={b} g{G}: our GPTQ KLD {gptq['kld']:.4f} ≤ 0.6 × our RTN's {rtn['kld']:.4f} "
                              f"(ratio {r:.2f})"))
    else:
        out.append((None, f"b={b} g{G}: GPTQ vs RTN not measured"))
    ort_rtn, fixed = m["ort-rtn"], m["ort-gptq-fixed"]
    if gptq and og:
        r = gptq["kld"] / og["kld"]
        note = ""
        if ort_rtn and abs(og["kld"] / ort_rtn["kld"] - 1) < 0.03:
            note = (f" — onnxruntime's GPTQ is RTN in disguise here (KLD {og['kld']:.4f} vs its RTN's "
                    f"{ort_rtn['kld']:.4f}): its `weight_only.gptq` feeds the error back through the upper "
                    "Cholesky factor's below-diagonal part, which is zero (see `_lower_factor`); the fair "
                    "comparison is the next line")
        out.append((r <= 1.05, f"b={b} g{G}: our GPTQ KLD {gptq['kld']:.4f} no worse than onnxruntime's GPTQ "
                               f"{og['kld']:.4f} within 5% (ratio {r:.2f}){note}"))
    else:
        out.append((None, f"b={b} g{G}: onnxruntime GPTQ not measured"))
    if gptq and fixed:
        r = gptq["kld"] / fixed["kld"]
        out.append((r <= 1.05, f"b={b} g{G}: our GPTQ KLD {gptq['kld']:.4f} no worse than onnxruntime's GPTQ with "
                               f"its error feedback fixed ({fixed['kld']:.4f}) within 5% (ratio {r:.2f})"))
    if rtn and awq:
        r = awq["kld"] / rtn["kld"]
        out.append((r <= 0.8, f"b={b} g{G}: our AWQ KLD {awq['kld']:.4f} ≤ 0.8 × our RTN's {rtn['kld']:.4f} "
                              f"(ratio {r:.2f})"))
    else:
        out.append((None, f"b={b} g{G}: AWQ vs RTN not measured"))
    T = result.get("tasks")
    if T:
        meth = T["methods"]
        for ml, base in (("mlgptq", "gptq-pooled"), ("mlawq", "awq-pooled")):
            if ml in meth and base in meth:
                a = sum(v["kld"] for v in meth[ml]["tasks"].values()) / len(meth[ml]["tasks"])
                c = sum(v["kld"] for v in meth[base]["tasks"].values()) / len(meth[base]["tasks"])
                pa = sum(v["ppl"] for v in meth[ml]["tasks"].values()) / len(meth[ml]["tasks"])
                pc = sum(v["ppl"] for v in meth[base]["tasks"].values()) / len(meth[base]["tasks"])
                note = ""
                d = meth[ml].get("damp")
                if ml == "mlgptq" and d and d["escalated"]:
                    counts = ", ".join(f"{k} in {v}" for k, v in d["counts"].items())
                    dp = meth[base].get("damp")
                    note = (f" — the combined task Hessian was not positive definite, so "
                            f"gptq_solve raised its damping (fraction of mean diag H, asked {d['asked']:g}) in "
                            f"{d['escalated']} of {d['linears']} linears ({counts}), which all but switches off "
                            "GPTQ's error feedback there" + (f"; {base}: {dp['escalated']} of {dp['linears']}"
                                                            if dp else ""))
                out.append((a < c, f"two tasks ({T['format']}): {ml} beats {base} on the mean over tasks: KLD "
                                   f"{a:.4f} vs {c:.4f} (perplexity {pa:.2f} vs {pc:.2f}){note}"))
            else:
                out.append((None, f"two tasks: {ml} vs {base} not measured"))
    else:
        out.append((None, "two tasks: not run (--no-tasks)"))
    return out


def _cell(c) -> str:
    return f"{c['kld']:.4f} / {100 * c['top1']:.1f} / {c['ppl']:.2f}" if c else ""


def markdown(result) -> str:
    rows = result["rows"]
    m = result["machine"]
    la = result["load_average"]
    texts = list(result["windows"])
    bits = sorted({r["bits"] for r in rows if r["bits"] is not None} | {int(k.rsplit("b", 1)[1]) for k in result["na"]})
    groups = sorted({r["group"] for r in rows if r["group"]})
    labels = [f"{mm} g{G}" for G in groups for mm in ALL_METHODS]
    by = {(r["text"], r["label"], r["bits"]): r for r in rows}
    cal = result["calibration"]
    win = ", ".join(f"{v['count']} × {v['seq_len']} tokens of {k}" for k, v in result["windows"].items())
    out = [
        "## Integer PTQ: our RTN / GPTQ / AWQ vs onnxruntime's RTN / GPTQ / HQQ, and two LoRA tasks",
        "",
        f"Produced by `python benchmarks/int_ptq.py` (`make bench-int`) in {result['seconds'] / 60:.1f} min of this "
        f"run (rows measured by earlier runs with the same settings come from its cache) on {m['processor']}, "
        f"{m['cpus']} CPUs **shared with other jobs** (load average {la['start'][0]:.2f} at start, {la['end'][0]:.2f} "
        f"at end; {m['torch_threads']} torch / onnxruntime threads), so times are indicative; python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, "
        f"optimum {m['optimum']}, peft {m['peft']}, otaro {m['otaro']}. Model: {result['model']}.",
        "",
        f"**Reduced settings** (CPU budget): windows {win}; calibration {cal['samples']} × {cal['seq_len']} tokens of "
        + ", ".join(cal["texts"]) + " for every calibrated method (ours and onnxruntime's)"
        + (f"; AWQ's α grid search runs each layer on the first {min(result['awq_search_samples'], cal['samples'])} of them "
           "(`otaro quantize --search-samples`, its default; statistics and clipping use all)"
           if result.get("awq_search_samples") else "") + "; the script's defaults "
        "use these sizes, and `--windows`, `--calib-samples`, `--bits`, `--groups`, `--methods` and `--lora-steps` "
        "scale it up. Rows are cached per setting, so the tables hold every row measured with these settings "
        "(blank cells: not measured in the time available).",
        "KLD: mean per-token KL(P_fp32 ‖ P_quant) in nats; top-1: agreement of the argmax with fp32; the "
        f"{result['linears']} linear layers of the {result['blocks']} blocks are quantized, embeddings and the tied head stay fp32 (onnxruntime: the lm_head "
        "MatMul is excluded).",
        "",
        "**Caveat (docs/FACTS.md):** the SmolLM2 weights available offline are the Q4_1 GGUF, whose linear weights sit "
        "exactly on a 4-bit asymmetric group-32 grid; int4 asym g32 would be lossless on them and is left out.",
        "",
        f"**Ragged groups, same bits per weight.** {result['ragged']['note']}. Our int formats and onnxruntime's "
        "MatMulNBits quantizers (RTN, GPTQ's repacking, HQQ) all do this same zero padding, so every engine codes "
        "the same groups with the same b; what differs is what a group stores: ours an fp16 scale and a b-bit zero "
        "point, onnxruntime's RTN/GPTQ an fp32 scale (the weight's dtype) and a b-bit zero point, HQQ an fp32 scale "
        "and an fp32 zero point. The tables give the effective bits per weight over SmolLM2's linears (padding "
        "included; onnxruntime's measured from the MatMulNBits initializers; an fp32 scale per group of 128 costs "
        "0.125 bit per weight more than an fp16 one).",
        "",
        "**onnxruntime rows** are the quantized ONNX graphs run by onnxruntime over the same windows (full-window "
        "logits, empty past) at MatMulNBits `accuracy_level` 1 (fp32 activations), against the same fp32 reference "
        "log-probs as our torch rows."
        + ("" if not result.get("ort_fp32_check") else " Sanity check, the fp32 ONNX export against the torch "
           "reference: " + ", ".join(f"{r['text']} KLD {r['kld']:.1e}, top-1 {100 * r['top1']:.2f}%"
                                     for r in result["ort_fp32_check"]) + ".")
        + " RTN = `DefaultWeightOnlyQuantConfig` (asym), HQQ = `HQQWeightOnlyQuantConfig`, GPTQ = "
        "`GPTQWeightOnlyQuantConfig` defaults (percdamp 0.01, no act-order, no MSE scale search; Hessians from the "
        "fp32 model, not the quantized prefix). Its GPTQ driver runs the whole model once per distinct MatMul input "
        f"and calibration window ({result.get('ort_distinct_inputs') or '~4 per block'} × {cal['samples']} forwards, "
        "hours here); we run its own solver (`gptq`), padding and packing "
        "(`quant_tensor`, `make_matmul_weight_only_node`) on Hessians accumulated with its formula in one pass "
        "(`ort_gptq_one_pass`; `--quick` checks the result is identical to the stock `MatMulNBitsQuantizer`'s). "
        "At b ≠ 4 its GPTQ writes fp32 weights on the b-bit grid (simulated; it has no MatMulNBits path for them).",
        "",
        "**Two onnxruntime 1.32 GPTQ bugs** (in `onnxruntime/quantization/neural_compressor/weight_only.py`): "
        "(1) `make_matmul_weight_only_node` packs the 4-bit zero points of all rows as one nibble stream and "
        "reshapes it to [N, -1], which raises when ceil(K/G) is odd — K = 576 at both g64 and g128, so the stock "
        "quantizer cannot write SmolLM2 at 4 bits; `ort_gptq_one_pass` packs them per row (MatMulNBits' layout; "
        "the same bytes where the stock packer works). (2) `gptq` takes the upper Cholesky factor of H⁻¹ "
        "(`cholesky(inv(H)).T`) and feeds the error back through its below-diagonal entries (`Hinv1[i:, i]`, "
        "`Hinv[i2:, i1:i2]`), which are zero: it never compensates, and returns RTN on its group parameters "
        "(see the solver check below: the same output error as with H = I). `ort-gptq` is onnxruntime "
        "as shipped; `ort-gptq-fixed` hands its `gptq` the lower factor instead, which turns those two lines into "
        "the reference update (nothing else changed)." + solver_note(result),
        "",
        "### Goals",
        "",
    ]
    for ok, text in goals(result):
        out.append(f"- {'✓' if ok else ('✗' if ok is False else '–')} {text}")
    out += ["", f"### b = {GOAL_BITS}: mean over texts", "",
            "| method | group | KLD | KLD p99 | top-1 % | perplexity | bits/weight | quantize s |",
            "|---|---|---|---|---|---|---|---|"]
    for G in groups:
        for mm in ALL_METHODS:
            rs = [r for r in rows if r["method"] == mm and r["group"] == G and r["bits"] == GOAL_BITS]
            if not rs:
                continue
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("kld", "kld_p99", "top1", "ppl")}
            q = result["quantize_seconds"].get(f"{mm} g{G} b{GOAL_BITS}") or 0.0
            out.append(f"| {mm} | {G} | {mean['kld']:.4f} | {mean['kld_p99']:.3f} | {100 * mean['top1']:.1f} | "
                       f"{mean['ppl']:.2f} | {rs[0]['bits_per_weight_effective']:.3f} | {q:.0f} |")
    for t in texts:
        fp = by.get((t, "fp32", None))
        out += ["", f"### {t} (fp32 perplexity {fp['ppl']:.2f})" if fp else f"### {t}", "",
                "Cells: KLD / top-1 % / perplexity (effective bits per weight); n/a: see below.", "",
                "| row | " + " | ".join(f"b={b}" for b in bits) + " |", "|---|" + "---|" * len(bits)]
        for lab in labels:
            cells = []
            for b in bits:
                c = by.get((t, lab, b))
                if c:
                    sim = " sim." if f"{lab} b{b}" in result["containers"] and "fake" in result["containers"][f"{lab} b{b}"] else ""
                    cells.append(f"{_cell(c)} ({c['bits_per_weight_effective']:.3g}{sim})")
                else:
                    cells.append("n/a" if f"{lab} b{b}" in result["na"] else "")
            if any(cells):
                out.append(f"| {lab} | " + " | ".join(cells) + " |")
    missing = [f"{lab} b{b}" for lab in labels for b in bits
               if not by.get((texts[0], lab, b)) and f"{lab} b{b}" not in result["na"]]
    if missing:
        out += ["", "Not measured in this run's time budget (blank cells): " + ", ".join(missing) + "."]
    if result["na"]:
        reasons = sorted(set(result["na"].values()))
        out += ["", "n/a: " + " ".join(f"{', '.join(k for k, v in result['na'].items() if v == r)}: {r}." for r in reasons)]
    sims = [k for k, v in result["containers"].items() if "fake" in v]
    if sims:
        out.append("sim.: " + ", ".join(sims) + " — onnxruntime's GPTQ stores fp32 weights on the b-bit grid at b ≠ 4.")
    q = result["quantize_seconds"]
    out += ["", "Quantization time (s, shared machine): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(q.items())) + "."]
    if result.get("onnx_export_seconds"):
        out[-1] += f" The fp32 ONNX export (once, cached) took {result['onnx_export_seconds']:.0f} s."
    T = result.get("tasks")
    if T:
        tn = list(T["fp32"])
        lo = next(iter(T["lora"].values()))
        out += ["", f"### Two tasks: one {T['format']} base for Brown and Austen, each task with its LoRA", "",
                f"LoRA per task (PEFT, from the fp32 model): {lo['steps']} steps of {lo['batch']} × {lo['seq_len']} "
                f"tokens, AdamW lr {lo['lr']:g}, r = {lo['r']}, alpha {lo['alpha']}, on {'/'.join(lo['targets'])} "
                "(training loss " + ", ".join(f"{v['task']} {v['loss_first']:.2f} → {v['loss_last']:.2f} in "
                                              f"{v['seconds']:.0f} s" for v in T["lora"].values())
                + "). Training / calibration data: Brown a-j; Austen's first 80% (cut at a paragraph). Evaluation: "
                + ", ".join(f"{t}: {T['eval_windows'][t]} × {result['windows'][texts[0]]['seq_len']} tokens of "
                            f"{T['eval_texts'][t]}" for t in tn)
                + f". Calibration: {T['calib_samples_per_task']} × {T['calib_len']} tokens per task, with that task's "
                "LoRA active. KLD is against the fp32 base with the same adapter; the AWQ variants are scored with the "
                "adapters rescaled by their fold (`adapters/<task>/`). Per-task GPTQ quantizes one base per task (its "
                "own data and LoRA): a reference point that costs a base per task. How the task Hessians combine "
                "(`--ml-hessian`): `mlgptq`/`mlawq` otaro's default, `diag-max`, the pooled Hessian rescaled so each "
                "channel's curvature (diagonal) is its largest over the tasks; `[max-psd]` the element-wise max "
                "projected onto the PSD cone; `[max]` the literal element-wise max, which is not PSD here, so GPTQ "
                "raises its damping.",
                "",
                "fp32 perplexity with / without the adapter: " + ", ".join(
                    f"{t} {T['fp32'][t]['ppl_with_adapter']:.2f} / {T['fp32'][t]['ppl_without_adapter']:.2f}" for t in tn) + ".",
                "",
                "| method | " + " | ".join(f"{t}: KLD / top-1 % / ppl" for t in tn) + " | mean KLD | mean ppl | quantize s |",
                "|---|" + "---|" * (len(tn) + 3)]
        for meth, got in T["methods"].items():
            ts = got["tasks"]
            mk = sum(v["kld"] for v in ts.values()) / len(ts)
            mp = sum(v["ppl"] for v in ts.values()) / len(ts)
            out.append(f"| {meth} | " + " | ".join(_cell(ts.get(t)) for t in tn) + f" | {mk:.4f} | {mp:.2f} | "
                       f"{got['quantize_s']:.0f} |")
    out += ["", "![KLD vs bits per weight](results/int_ptq.png)"]
    return "\n".join(out)


def plot(result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otaro.io import atomic_file

    rows = [r for r in result["rows"] if r["bits"] is not None]
    T = result.get("tasks")
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, 3 if T else 2, figsize=(19 if T else 13, 5.4), dpi=120, squeeze=False)
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(ALL_METHODS)}
    # 1: b = 4, mean KLD over texts, per method and group
    ax = axes[0][0]
    meths = [m for m in ALL_METHODS if any(r["method"] == m and r["bits"] == GOAL_BITS for r in rows)]
    width = 0.8 / max(1, len(groups))
    for j, G in enumerate(groups):
        vals = [(_mean(rows, method=m, bits=GOAL_BITS, group=G) or {}).get("kld", 0.0) for m in meths]
        ax.bar([i + j * width for i in range(len(meths))], vals, width, label=f"g{G}",
               color=[colours[m] for m in meths], alpha=1.0 if j else 0.55, edgecolor="black", linewidth=0.5)
        for i, v in enumerate(vals):
            if v:
                ax.text(i + j * width, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(meths))], meths, rotation=30, fontsize=8)
    ax.set_ylabel("mean KLD to fp32 over the texts (nats/token)")
    ax.set_title(f"b = {GOAL_BITS} (light: g{groups[0]}, dark: g{groups[-1]})" if len(groups) > 1 else f"b = {GOAL_BITS}")
    ax.grid(True, axis="y", alpha=0.3)
    # 2: KLD against effective bits per weight, every measured b
    ax = axes[0][1]
    for label in dict.fromkeys(r["label"] for r in rows):
        sel = [r for r in rows if r["label"] == label]
        pts = []
        for b in sorted({r["bits"] for r in sel}):
            rb = [r for r in sel if r["bits"] == b]
            pts.append((rb[0]["bits_per_weight_effective"], sum(r["kld"] for r in rb) / len(rb)))
        meth, G = sel[0]["method"], sel[0]["group"]
        ax.plot([p[0] for p in pts], [max(p[1], 1e-5) for p in pts], "-o" if G == groups[-1] else "--s", ms=4,
                lw=1.4, color=colours[meth], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (scales, zero points, padding included)")
    ax.set_ylabel("mean KLD to fp32 over the texts (log)")
    ax.set_title(f"{result['model']}: every measured b")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if T:
        ax = axes[0][2]
        tm = list(T["methods"])
        tn = list(T["fp32"])
        width = 0.8 / len(tn)
        for j, t in enumerate(tn):
            ax.bar([i + j * width for i in range(len(tm))], [T["methods"][m]["tasks"].get(t, {}).get("kld", 0)
                                                             for m in tm], width, label=t)
        ax.set_xticks([i + width * (len(tn) - 1) / 2 for i in range(len(tm))], tm, rotation=30, fontsize=8)
        ax.set_ylabel("KLD to fp32 base + the task's LoRA")
        ax.set_title(f"two tasks, one {T['format']} base (per-task GPTQ: one base each)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(allowed):
    def parse(s: str) -> list[str]:
        out = [x for x in s.split(",") if x]
        bad = [x for x in out if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return out
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=_ints, default=[2, 3, 4, 8], help="comma list (default 2,3,4,8)")
    ap.add_argument("--groups", type=_ints, default=[64, 128], help="comma list (default 64,128)")
    ap.add_argument("--methods", type=_names(ALL_METHODS), default=list(ALL_METHODS),
                    help="comma list of " + ", ".join(ALL_METHODS))
    ap.add_argument("--windows", type=int, default=3, help="evaluation windows per text (default 3)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and onnxruntime threads (default 1: on the shared 2-core machine a 512-token forward "
                         "took 3.6 s with 1 thread and 12-14 s with 2)")
    ap.add_argument("--tasks", action=argparse.BooleanOptionalAction, default=True, help="the two-task table")
    ap.add_argument("--task-methods", type=_names(TASK_METHODS), default=list(TASK_METHODS))
    ap.add_argument("--task-format", default="int4-g128-asym")
    ap.add_argument("--task-calib-samples", type=int, default=16, help="calibration windows per task (default 16)")
    ap.add_argument("--lora-steps", type=int, default=100)
    ap.add_argument("--lora-batch", type=int, default=1)
    ap.add_argument("--lora-len", type=int, default=256)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--cache-dir", type=Path, default=CACHE_ROOT)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny random model (seconds): results go to --out only, not benchmarks/results")
    ap.add_argument("--out", type=Path, default=None, help="with --quick: folder for int_ptq.json/.png/.md")
    ap.add_argument("--cached-only", action="store_true",
                    help="measure nothing new: publish the rows already cached for these settings")
    ap.add_argument("--replot", action="store_true",
                    help="re-render table, goals and plot from benchmarks/results/int_ptq.json (no measuring)")
    args = ap.parse_args(argv)
    if args.quick:
        # tiny-llama: hidden 64, intermediate 136 (ragged at g16/g32), 2 layers, 320 tokens
        defaults = ap.parse_args([])
        for name, value in (("windows", 2), ("seq_len", 32), ("calib_samples", 4), ("calib_len", 32),
                            ("lora_steps", 4), ("lora_len", 32), ("task_calib_samples", 4)):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
        if args.groups == defaults.groups:
            args.groups = [32]
        if args.bits == defaults.bits:
            args.bits = [3, 4]
        if args.task_format == defaults.task_format:
            args.task_format = "int4-g32-asym"
    return args


def solver_note(result: dict) -> str:
    c = result.get("ort_solver_check")
    if not c:
        return ""
    K, N = c["shape"]
    return (f" **Solver check** (`ort_solver_check`, measured in this run: one random {K} × {N} weight, "
            f"a correlated Hessian from {c['tokens']} tokens with 5 outlier channels, int{c['bits']} g{c['group']}; "
            f"output error tr(ΔWᵀHΔW)): RTN {c['rtn']:.1f}, `ort-gptq` {c['ort-gptq']:.1f}, `ort-gptq-fixed` "
            f"{c['ort-gptq-fixed']:.1f}, our `gptq` {c['gptq']:.1f}. So the fixed solver is GPTQ "
            f"(within {100 * abs(c['ort-gptq-fixed'] / c['gptq'] - 1):.2f}% of ours on the same H); that "
            "`ort-gptq-fixed` is nonetheless worse than RTN on the whole model points to what it is fed: "
            "Hessians of the fp32 model, so each layer compensates for inputs it will not see once the layers "
            "before it are quantized (ours are taken on the quantized prefix). We did not isolate this further.")


def main(argv=None) -> int:
    import warnings

    args = parse_args(argv)
    # offline by design: peft otherwise asks the hub about an adapter's base model on every load
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # onnxruntime's HQQ hands torch a read-only numpy array (harmless; it only reads it)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    from otaro.errors import OtaroError
    from results_md import publish

    if args.replot:
        result = json.loads((HERE / "results" / "int_ptq.json").read_text())
        result.setdefault("ort_solver_check", ort_solver_check())
        print(publish("int_ptq", result, plot, markdown))
        return 0
    try:
        result = run(args)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    result["args"] = {k: (str(v) if isinstance(v, Path) and k != "cache_dir" else v) for k, v in vars(args).items()
                      if k not in ("cache_dir", "out")}
    if args.quick:
        from otaro.io import write_json

        out = args.out or Path(tempfile.mkdtemp(prefix="int-ptq-quick-"))
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "int_ptq.json", result)
        plot(result, out / "int_ptq.png")
        body = markdown(result)
        (out / "int_ptq.md").write_text(body, encoding="utf-8")
        print(body)
        print(f"\n(quick: written to {out})")
        return 0
    body = publish("int_ptq", result, plot, markdown)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
