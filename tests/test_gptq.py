"""GPTQ: the solver (against RTN on the same format), the integer column quantizer, the
calibration windows, the sequential driver and its streams, and ``otaro quantize --method gptq``."""

import json

import pytest
import torch
from click.testing import CliRunner

from otaro.formats import get_format
from otaro.formats import torch_ref as Q
from otaro.methods import gptq as gptq_mod
from otaro.methods.calib import (
    block_hessians,
    calibration_windows,
    capture_layer_inputs,
    run_layer,
    sequential_quantize,
)
from otaro.methods.gptq import QUANTIZERS, gptq_solve, quantizer_factory
from otaro.methods.int_quantizer import IntColumnQuantizer

N_OUT, N_IN = 48, 136  # 136: a ragged last group for G = 32 and 64, wider than one group of 128


def _linear(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0])
    lin.weight.data.copy_(W)
    return lin


@pytest.fixture(scope="module")
def problem():
    """A random weight and the Hessian of strongly correlated inputs (as real activations are)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(N_OUT, N_IN, generator=gen)
    mix = torch.eye(N_IN) + 0.3 * torch.randn(N_IN, N_IN, generator=gen)
    X = torch.randn(1024, N_IN, generator=gen) @ mix
    return W, 2 * X.T @ X / X.shape[0]


def _proxy(W, Wq, H):
    D = (W - Wq).double()
    return float(torch.trace(D @ H.double() @ D.T))


def _gptq_weight(W, H, fmt, **kw):
    q = IntColumnQuantizer(fmt)
    stats = gptq_solve(W, H, q, **kw)
    return q.build(_linear(W)), stats


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["int4-g32-asym", "int4-g32-sym", "int3-g64-asym", "int4-g128-sym"])
def test_gptq_lowers_the_output_error_of_rtn(problem, name, act_order):
    W, H = problem
    fmt = get_format(name)
    rtn = Q.int_dequantize(*Q.int_encode(W, fmt), fmt, N_IN)
    layer, stats = _gptq_weight(W, H, fmt, act_order=act_order)
    gain = 1 - _proxy(W, layer.quantized_weight(), H) / _proxy(W, rtn, H)
    # Measured on this problem: 0.50-0.53 for every format and order (seed 0). 0.3 leaves room
    # for platform rounding while still failing for a solver that only matches RTN.
    assert gain >= 0.3, gain
    assert stats["damp"] == 0.01 and stats["dead"] == 0 and stats["loss"] > 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["int4-g32-asym", "int4-g64-sym", "int2-g128-asym", "int8-g16-sym"])
def test_identity_hessian_gives_the_rtn_codes_bit_exactly(problem, name, act_order):
    """With H = I no column's error reaches another, so GPTQ is RTN: same codes, scales, zeros."""
    W, _ = problem
    fmt = get_format(name)
    layer, _ = _gptq_weight(W, torch.eye(N_IN), fmt, act_order=act_order)
    rtn = type(layer).from_linear(_linear(W), fmt)
    for buf in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(layer, buf), getattr(rtn, buf)), buf


@pytest.mark.parametrize("name", ["int4-g128-asym", "int4-g32-sym"])
def test_lazy_batch_updates_do_not_change_the_result(problem, name):
    """Blocks narrower than a group (G=128 over blocks of 16/48) need the group's columns with
    the pending update applied; any block size must give the codes of one single block."""
    W, H = problem
    fmt = get_format(name)
    ref = _gptq_weight(W, H, fmt, block_size=N_IN)[0].qweight
    for bs in (1, 16, 48):
        assert torch.equal(_gptq_weight(W, H, fmt, block_size=bs)[0].qweight, ref), bs


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_quantized_to_zero(problem, act_order):
    W, H = problem
    H = H.clone()
    dead = [0, 5, 77, 135]
    H[dead, :] = 0
    H[:, dead] = 0
    fmt = get_format("int4-g32-asym")
    layer, stats = _gptq_weight(W, H, fmt, act_order=act_order)
    Wq = layer.quantized_weight()
    assert stats["dead"] == len(dead) and torch.isfinite(Wq).all()
    assert torch.equal(Wq[:, dead], torch.zeros(N_OUT, len(dead)))
    assert torch.equal(W, problem[0]) and not torch.equal(H, problem[1])  # inputs left untouched


def test_cholesky_failure_retries_with_more_damping():
    fmt = get_format("int4-g16-sym")
    W = torch.randn(4, 2)
    H = torch.tensor([[1.0, 4.0], [4.0, 1.0]])  # indefinite: eigenvalues -3 and 5
    _, stats = _gptq_weight(W, H, fmt)
    assert stats["damp"] == pytest.approx(10)  # 0.01, 0.1 and 1 (× mean diag 1) leave it indefinite
    from otaro.errors import OtaroError

    with pytest.raises(OtaroError, match="not positive definite"):
        _gptq_weight(W, torch.full((2, 2), float("nan")), fmt)


def test_missing_quantizer_family_is_a_clear_error():
    from otaro.errors import OtaroError

    class Fake:
        family, name = "nofamily", "nofamily-g64"

    assert quantizer_factory(get_format("int4-g32-asym")) is QUANTIZERS["int"]
    with pytest.raises(OtaroError, match="no column quantizer for nofamily"):
        quantizer_factory(Fake())


# --------------------------------------------------------------------------------------------
# Calibration windows and the driver
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from otaro.arch.tiny import tiny_tokenizer

    return tiny_tokenizer()


def test_calibration_windows_are_seeded_and_sized(tokenizer, text_file):
    a = calibration_windows(tokenizer, [str(text_file)], 8, 64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(tokenizer, [str(text_file)], 8, 64, seed=0))
    assert not torch.equal(a, calibration_windows(tokenizer, [str(text_file)], 8, 64, seed=1))
    from otaro.errors import OtaroError

    with pytest.raises(OtaroError, match=r"calibration text has \d+ tokens; need n_samples × seq_len = 1000 × 64"):
        calibration_windows(tokenizer, [str(text_file)], 1000, 64)
    with pytest.raises(OtaroError, match="larger than the model allows"):
        calibration_windows(tokenizer, [str(text_file)], 1, 512, max_positions=256)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox"])
def test_captured_layer_inputs_replay_the_model(arch):
    """The caught inputs and per-layer arguments (masks, position embeddings...) reproduce the
    model's own hidden states when the layers are run one by one."""
    from otaro.arch import get_adapter, get_layers
    from otaro.arch.tiny import tiny_model

    model = tiny_model(arch, init_std=0.15)
    windows = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(0))
    layers = get_layers(model, get_adapter(model))
    with torch.no_grad():
        # [n_layers + 1, n_windows, L, d]: embeddings, then each layer's output
        ref = torch.cat([torch.stack(model(w[None], output_hidden_states=True).hidden_states) for w in windows], 1)
        h, extra = capture_layer_inputs(model, layers, windows)
        torch.testing.assert_close(h, ref[0])
        h = run_layer(layers[0], h, extra[0])
    torch.testing.assert_close(h, ref[1])


def test_block_hessian_is_the_weighted_mean_of_the_streams():
    from otaro.arch import get_adapter, get_layers
    from otaro.arch.tiny import tiny_model

    model = tiny_model("llama", init_std=0.15)
    adapter = get_adapter(model)
    layer = get_layers(model, adapter)[0]
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, extra = capture_layer_inputs(model, get_layers(model, adapter), windows)
        streams = [h, h * 1.7 + 0.1]
        names = ["self_attn.q_proj", "mlp.down_proj"]
        alone = [block_hessians(layer, names, [x], [1.0], extra[0]) for x in streams]
        mixed = block_hessians(layer, names, streams, [1.0, 3.0], extra[0])
        xn = layer.input_layernorm(h).reshape(-1, 64)  # what q_proj sees of stream 0
    # H_b = 2/n Σ x xᵀ over the n tokens of the linear's own input
    torch.testing.assert_close(alone[0]["self_attn.q_proj"], 2 * xn.T @ xn / xn.shape[0])
    for name in names:
        torch.testing.assert_close(mixed[name], (alone[0][name] + 3 * alone[1][name]) / 4)
        assert not torch.allclose(alone[0][name], alone[1][name])


class _TopBitsSEFPQuantizer:
    """A minimal SEFP column quantizer for the driver test: exponents from the original W, each
    column rounded to the 8-bit trunc grid (the real multi-bit one is sefp_quantizer.py)."""

    def __init__(self, fmt, config):
        self.fmt, self.group_size = fmt, fmt.group_size

    def prepare(self, W, static_groups):
        self.m8, self.E = Q.sefp_encode(W, self.fmt)
        self.n_in = W.shape[1]

    def start_group(self, g, Wg):
        pass

    def quantize_column(self, j, w):
        step = torch.ldexp(torch.ones_like(w), (self.E[:, j // self.group_size].to(torch.int32) - 6).float())
        m = torch.clamp(torch.floor(w.abs() / step), max=127) * torch.sign(w)
        self.m8[:, j] = m.to(torch.int8)
        return m * step

    def build(self, linear):
        from otaro.modules import SEFPLinear

        return SEFPLinear.from_codes(linear, self.fmt, self.m8, self.E)


def test_sefp_streams_run_each_bit_width_through_the_quantized_prefix(monkeypatch):
    """Block 1's Hessian is Σ λ_b H_b / Σ λ_b with stream b propagated through the quantized
    block 0 at b bits, and the result looks like convert's (top precision, model.otaro)."""
    from otaro.arch.tiny import tiny_model
    from otaro.modules import SEFPLinear, quant_layers, set_precision
    from otaro.quantize import QuantizeConfig

    monkeypatch.setitem(QUANTIZERS, "sefp", _TopBitsSEFPQuantizer)
    seen = {}
    real_solve = gptq_mod.gptq_solve

    def spy(W, H, quantizer, **kw):
        seen[len(seen)] = H.clone()
        return real_solve(W, H, quantizer, **kw)

    monkeypatch.setattr(gptq_mod, "gptq_solve", spy)
    fmt = get_format("sefp-g32-trunc")
    cfg = QuantizeConfig(model="tiny-llama", output="unused-out", method="gptq", format=fmt.name, calib=("corpus:x",),
                         bits="2:1,8:3")
    assert cfg.bits == ((2, 1.0), (8, 3.0))
    model = tiny_model("llama", init_std=0.15)
    windows = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    gptq_mod.run_gptq(model, fmt, cfg, windows, None)
    layers = quant_layers(model)
    assert all(isinstance(m, SEFPLinear) and m.bits == 8 for m in layers.values()) and len(layers) == 14
    H_block1_q = seen[7]  # first linear of block 1: q_proj

    def q_input_hessian(bits):
        xs = []
        hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0]))
        set_precision(model, {"layers.0.*": bits})
        with torch.no_grad():
            for w in windows:
                model(w[None])
        hook.remove()
        x = torch.cat(xs).reshape(-1, 64)
        return 2 * x.T @ x / x.shape[0]

    H2, H8 = q_input_hessian(2), q_input_hessian(8)
    torch.testing.assert_close(H_block1_q, (H2 + 3 * H8) / 4)
    assert (H2 - H8).abs().max() > 1e-2 * H8.abs().max()  # the streams really differ


# --------------------------------------------------------------------------------------------
# otaro quantize --method gptq
# --------------------------------------------------------------------------------------------


def invoke(*args):
    from otaro.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _linear_output_errors(fp_model, quant_model, windows):
    """Σ ‖X (W − Q)ᵀ‖² per quantized linear, X its inputs in the fp model on the windows."""
    from otaro.modules import quant_layers

    layers = quant_layers(quant_model)
    inputs = {name: [] for name in layers}
    hooks = [fp_model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0]))
             for n in layers]
    with torch.no_grad():
        for w in windows:
            fp_model(w[None])
    for h in hooks:
        h.remove()
    out = {}
    for name, layer in layers.items():
        x = torch.cat(inputs[name]).reshape(-1, layer.in_features)
        D = fp_model.get_submodule(name).weight.detach() - layer.quantized_weight()
        out[name] = float(((x @ D.T) ** 2).sum())
    return out


def test_quantize_gptq_end_to_end_beats_rtn(tmp_path, hf_model, text_file, tokenizer):
    from otaro import checkpoint
    from otaro.modules import IntLinear, quant_layers
    from otaro.sources import load_hf_folder

    fmt = "int4-g32-asym"
    res = invoke("quantize", hf_model, "-o", tmp_path / "g", "--method", "gptq", "--format", fmt,
                 "--calib", text_file, "--calib-samples", 8, "--calib-len", 64)
    assert res.exit_code == 0, res.output
    assert invoke("quantize", hf_model, "-o", tmp_path / "r", "--format", fmt).exit_code == 0
    g, r = checkpoint.load(tmp_path / "g"), checkpoint.load(tmp_path / "r")
    assert {n: type(m) for n, m in quant_layers(g).items()} == {n: type(m) for n, m in quant_layers(r).items()}
    assert all(isinstance(m, IntLinear) for m in quant_layers(g).values())
    manifest = json.loads((tmp_path / "g" / "otaro.json").read_text())
    cfg = manifest["method"]["config"]
    assert manifest["method"]["name"] == "gptq" and cfg["calib"] == [str(text_file)]
    assert (cfg["calib_samples"], cfg["calib_len"], cfg["bits"], cfg["act_order"]) == (8, 64, [[4, 1.0]], True)

    fp = load_hf_folder(hf_model, torch.float32)
    windows = calibration_windows(tokenizer, [str(text_file)], 8, 64)
    eg, er = _linear_output_errors(fp, g, windows), _linear_output_errors(fp, r, windows)
    ratio = sum(eg.values()) / sum(er.values())
    # Measured: 0.52 overall, every linear below RTN (0.33-0.69 of RTN's error). Block 0 is
    # measured on exactly the inputs GPTQ used; block 1 on the fp prefix's outputs rather than
    # the quantized prefix's it was solved for, hence per-layer only "below RTN".
    assert ratio < 0.75, ratio
    assert all(eg[n] < er[n] for n in eg), {n: eg[n] / er[n] for n in eg}


def test_quantize_gptq_user_errors_come_before_any_output(tmp_path, hf_model, text_file):
    out = tmp_path / "o"

    def fails(*args, needle):
        res = invoke("quantize", hf_model, "-o", out, *args)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert needle in res.output, res.output

    fails("--method", "gptq", "--format", "int4-g32-asym", needle="needs calibration data: --calib")
    fails("--method", "gptq", "--format", "int4-g32-asym", "--calib", tmp_path / "missing.txt", needle="no such file")
    fails("--method", "gptq", "--format", "int4-g32-asym", "--calib", text_file, "--calib-samples", 1000,
          "--calib-len", 64, needle="calibration text has")
    fails("--method", "gptq", "--format", "int4-g32-asym", "--calib", text_file, "--bits", "3",
          needle="--bits must be absent or 4")
    fails("--method", "gptq", "--format", "sefp-g64-trunc", "--calib", text_file, "--bits", "3:1,9:1",
          needle="bit-width 9 is not supported")
    fails("--method", "gptq", "--format", "int4-g32-asym", "--calib", text_file, "--calib-len", 512,
          needle="larger than the model allows")
    fails("--format", "int4-g32-asym", "--calib", text_file, needle="rtn uses no calibration data")
    fails("--method", "gptq", "--format", "int4-g32-asym", "--calib", text_file, "--damp", 0, needle="--damp")
    fails("--method", "awq", "--format", "int4-g32-asym", "--calib", text_file, "--search-samples", 0,
          needle="--search-samples must be at least 1")
    assert not out.exists()


def test_calib_accepts_repeats_and_comma_lists(tmp_path, hf_model, text_file):
    other = tmp_path / "more.txt"
    other.write_text(text_file.read_text(), encoding="utf-8")
    res = invoke("quantize", hf_model, "-o", tmp_path / "g", "--method", "gptq", "--format", "int8-g64-sym",
                 "--calib", f"{text_file},{other}", "--calib", text_file, "--calib-samples", 4, "--calib-len", 32,
                 "--no-act-order", "--block-size", 16, "--bits", "8")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "g" / "otaro.json").read_text())["method"]["config"]
    assert cfg["calib"] == [str(text_file), str(other), str(text_file)]
    assert (cfg["act_order"], cfg["block_size"], cfg["bits"]) == (False, 16, [[8, 1.0]])
