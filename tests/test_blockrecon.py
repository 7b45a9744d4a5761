"""Block reconstruction with SignRound (seed 001): ``sb``, ``la`` (LA-n), ``mb`` (MB-n).

The fake quantizers against RTN and their own packed layers (bit for bit), the window plans,
which blocks each policy tunes and freezes, the gain over RTN on calibration data, the
checkpoint round trip, the CLI and its errors. Tiny random models, seeded, one thread."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from otaro.arch import ARCHS, get_adapter, get_layers
from otaro.arch.tiny import tiny_model
from otaro.errors import OtaroError
from otaro.formats import get_format
from otaro.methods.calib import capture_layer_inputs, run_layer
from otaro.methods.recon.driver import Window, plan_windows
from otaro.methods.recon.quantizers import V_MAX, make_fake_quant
from otaro.methods.recon.signround import SignRoundLinear, run_signround
from otaro.methods.rtn import run_rtn
from otaro.modules import IntLinear, SEFPLinear, quant_layers, set_precision

SEFP_TARGETS = "3:1,4:1,8:1"


def invoke(*args):
    from otaro.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _windows(n=8, length=24, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _model(layers=2):
    """The tiny llama (std 0.15 weights), with more decoder layers when asked."""
    if layers == 2:
        return tiny_model("llama", init_std=0.15)
    cfg = ARCHS["llama"].tiny_config()
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model.eval()


def _config(tmp_path, text_file, method, fmt, **kw):
    from otaro.quantize import QuantizeConfig

    bits = SEFP_TARGETS if get_format(fmt).family == "sefp" else ()
    return QuantizeConfig(model="tiny-llama", output=str(tmp_path / "unused"), method=method, format=fmt,
                          calib=(str(text_file),), bits=kw.pop("bits", bits), **kw)


def stream_error(fp, quant, windows, bits=None) -> float:
    """Σ_k ‖h_q,k − h_fp,k‖² over the decoder blocks, each model on its own activation stream:
    what the reconstruction minimises (block k's loss sees the quantized prefix's inputs)."""
    lf, lq = get_layers(fp, get_adapter(fp)), get_layers(quant, get_adapter(quant))
    if bits is not None:
        set_precision(quant, bits)
    total = 0.0
    with torch.no_grad():
        h, extra = capture_layer_inputs(fp, lf, windows)
        g = h
        for a, b, e in zip(lf, lq, extra):
            h, g = run_layer(a, h, e), run_layer(b, g, e)
            total += float((g - h).double().pow(2).sum())
    if bits is not None:
        set_precision(quant, quant.otaro.fmt.top_bits)
    return total


# --------------------------------------------------------------------------------------------
# Fake quantizers
# --------------------------------------------------------------------------------------------

ROWS = ["int4-g32-asym", "int3-g64-sym", "int2-g128-asym", "sefp-g64-nearest", "ssfp-g16-nearest",
        "sefp-g32-trunc", "ssfp-g64-midpoint"]


def _weight(out=24, n_in=136, seed=0):  # 136: a ragged last group for G = 32, 64, 128
    W = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.1
    lin = torch.nn.Linear(n_in, out)
    lin.weight.data.copy_(W)
    return W, lin


def _bits(fmt):
    return fmt.bits if fmt.family == "sefp" else (None,)


@pytest.mark.parametrize("name", ROWS)
def test_fake_quant_at_its_start_is_rtn_bit_exactly(name):
    """V = 0 and α = β = 1 give RTN's stored tensors and, at every b, RTN's weight."""
    fmt = get_format(name)
    W, lin = _weight()
    fq = make_fake_quant(fmt, tuple(W.shape), rounding=True)
    built = fq.build(lin, W)
    rtn = (IntLinear if fmt.family == "int" else SEFPLinear).from_linear(lin, fmt)
    for (k, a), (_, b) in zip(built.state_dict().items(), rtn.state_dict().items()):
        assert torch.equal(a, b), k
    for b in _bits(fmt):
        if b is not None:
            rtn.set_bits(b)
        assert torch.equal(fq(W, b), rtn.quantized_weight()), b


@pytest.mark.parametrize("name", ROWS)
def test_fake_quant_is_what_its_packed_layer_computes(name):
    """With learned (random) V and clipping, training sees bit for bit the weight the packed
    layer will compute with, at every b; and the gradient reaches V and the clipping."""
    fmt = get_format(name)
    W, lin = _weight(seed=1)
    fq = make_fake_quant(fmt, tuple(W.shape), rounding=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        fq.V.copy_((torch.rand(fq.V.shape, generator=gen) - 0.5) * 2 * V_MAX)
        for p in fq.clip_params():
            p.copy_(0.6 + 0.45 * torch.rand(p.shape, generator=gen))
        fq.project_()
    layer = fq.build(lin, W)
    for b in _bits(fmt):
        if b is not None:
            layer.set_bits(b)
        wq = fq(W, b)
        assert torch.equal(wq, layer.quantized_weight()), b
        (wq * torch.randn(wq.shape, generator=gen)).sum().backward()
    assert fq.V.grad is not None and fq.V.grad.abs().sum() > 0
    for p in fq.clip_params():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_pow2_sefp_clipping_is_a_discrete_start_not_learned():
    """pow2 rows: α only picks E or E - 1 (the scale search's choice), and is not trained."""
    fmt = get_format("sefp-g32-nearest")
    W, _ = _weight(seed=3)
    fq = make_fake_quant(fmt, tuple(W.shape), rounding=True)
    assert fq.clip_params() == []
    fq.start_clip(W, ((3, 1.0), (4, 1.0), (8, 1.0)), search=True)
    assert set(fq.alpha.unique().tolist()) <= {0.5, 1.0}


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_window_plans():
    assert plan_windows(3, "sb", 1) == [Window((0,), 0), Window((1,), 1), Window((2,), 2)]
    assert plan_windows(4, "la", 2) == [Window((0,), 1), Window((1,), 2), Window((2,), 3), Window((3,), 3)]
    assert plan_windows(4, "la", 3) == [Window((0,), 2), Window((1,), 3), Window((2,), 3), Window((3,), 3)]
    assert plan_windows(4, "mb", 2) == [Window((0, 1), 1), Window((2, 3), 3)]
    assert plan_windows(5, "mb", 3) == [Window((0, 1, 2), 2), Window((3, 4), 4)]
    for policy, n in (("la", 1), ("mb", 1)):  # LA-1 = MB-1 = SB
        assert plan_windows(4, policy, n) == plan_windows(4, "sb", 1)
    for L in (1, 4, 7):
        for n in range(1, L + 1):
            mb = plan_windows(L, "mb", n)
            tuned = [k for w in mb for k in w.tuned]
            assert tuned == list(range(L))  # every block tuned exactly once: windows never overlap
            assert [w.tuned[0] for w in plan_windows(L, "la", n)] == list(range(L))
    with pytest.raises(OtaroError, match="--recon-blocks 3 is larger than the model's 2 decoder layers"):
        plan_windows(2, "la", 3)
    with pytest.raises(OtaroError, match="needs la or mb"):
        plan_windows(4, "sb", 2)


def _record(policy, layers, fmt="int4-g32-asym", blocks=2, steps=3, tmp_path=None, text_file=None):
    """Run ``policy`` on a ``layers``-deep model; per window: the report, the linear types of
    every block and whether each not-yet-quantized block still holds the fp weights."""
    fp = _model(layers)
    fp_state = {k: v.clone() for k, v in fp.state_dict().items()}
    seen = []

    def observer(report, model):
        blocks_now = get_layers(model, get_adapter(model))
        kinds = [{type(m).__name__ for m in blk.modules() if isinstance(m, (torch.nn.Linear, IntLinear, SEFPLinear,
                                                                             SignRoundLinear))} for blk in blocks_now]
        state = model.state_dict()
        fp_blocks = [j for j in range(layers) if kinds[j] == {"Linear"} and all(
            k in state and torch.equal(state[k], fp_state[k]) for k in fp_state if k.startswith(f"model.layers.{j}."))]
        frozen = all(not p.requires_grad for n, p in model.named_parameters() if "quant." not in n)
        seen.append((report, kinds, fp_blocks, frozen))

    cfg = _config(tmp_path, text_file, policy, fmt, recon_blocks=blocks, recon_iters=steps, recon_batch=2)
    run_signround(_model(layers), get_format(fmt), cfg, _windows(4, 16), policy=policy, observer=observer)
    return seen


def test_la2_tunes_block_k_only_with_the_next_block_fp_and_frozen(tmp_path, text_file):
    seen = _record("la", 4, tmp_path=tmp_path, text_file=text_file)
    assert [(r["tuned"], r["end"]) for r, *_ in seen] == [([0], 1), ([1], 2), ([2], 3), ([3], 3)]
    rels = get_adapter(_model()).linear_names
    for k, (report, kinds, fp_blocks, frozen) in enumerate(seen):
        # gradients reach exactly block k's V and clipping factors, nothing else
        want = {f"model.layers.{k}.{rel}.quant.{p}" for rel in rels for p in ("V", "alpha", "beta")}
        assert set(report["grad_params"]) == want, report["grad_params"]
        assert frozen
        assert kinds[k] == {"SignRoundLinear"}
        assert all(kinds[j] == {"IntLinear"} for j in range(k))  # the prefix is quantized
        assert fp_blocks == list(range(k + 1, 4))  # the look-ahead block (and later) still fp


def test_mb2_tunes_two_blocks_jointly_in_windows_that_do_not_overlap(tmp_path, text_file):
    seen = _record("mb", 4, tmp_path=tmp_path, text_file=text_file)
    assert [(r["tuned"], r["end"]) for r, *_ in seen] == [([0, 1], 1), ([2, 3], 3)]
    rels = get_adapter(_model()).linear_names
    for (report, kinds, fp_blocks, frozen), (a, b) in zip(seen, ((0, 1), (2, 3))):
        want = {f"model.layers.{k}.{rel}.quant.{p}" for k in (a, b) for rel in rels for p in ("V", "alpha", "beta")}
        assert set(report["grad_params"]) == want
        assert frozen and kinds[a] == kinds[b] == {"SignRoundLinear"}
        assert fp_blocks == list(range(b + 1, 4))


def test_sb_on_sefp_tunes_each_block_against_its_own_output(tmp_path, text_file):
    seen = _record("sb", 3, fmt="ssfp-g16-nearest", blocks=1, tmp_path=tmp_path, text_file=text_file)
    assert [(r["tuned"], r["end"]) for r, *_ in seen] == [([0], 0), ([1], 1), ([2], 2)]
    for k, (report, kinds, fp_blocks, _) in enumerate(seen):
        assert {n.split(".quant.")[1] for n in report["grad_params"]} == {"V", "alpha"}
        assert all(kinds[j] == {"SEFPLinear"} for j in range(k)) and fp_blocks == list(range(k + 1, 3))


# --------------------------------------------------------------------------------------------
# Quality on calibration data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,name,blocks", [("sb", "int4-g32-asym", 1), ("sb", "int3-g32-sym", 1),
                                                ("la", "int3-g64-asym", 2), ("mb", "int4-g32-sym", 2)])
def test_reconstruction_lowers_the_block_output_error_of_rtn_int(tmp_path, text_file, policy, name, blocks):
    fmt = get_format(name)
    windows = _windows()
    cfg = _config(tmp_path, text_file, policy, name, recon_blocks=blocks, recon_iters=60, recon_batch=4)
    quant = run_signround(_model(), fmt, cfg, windows, policy=policy)
    rtn = run_rtn(_model(), fmt, None)
    ratio = stream_error(_model(), quant, windows) / stream_error(_model(), rtn, windows)
    # Measured (seed 0, 60 steps): 0.11-0.23 (on the windows it was tuned on, and block 2 also
    # compensates block 1's error). 0.6 still fails a method that only matches RTN.
    assert ratio < 0.6, ratio


@pytest.mark.parametrize("policy", ["sb", "mb"])
def test_reconstruction_lowers_the_error_at_every_sefp_target(tmp_path, text_file, policy):
    """ssfp-g16-nearest, targets 3, 4 and 8 bits: every target below RTN, from one stored code."""
    fmt = get_format("ssfp-g16-nearest")
    windows = _windows()
    cfg = _config(tmp_path, text_file, policy, fmt.name, recon_blocks=1 if policy == "sb" else 2, recon_iters=60,
                  recon_batch=4)
    quant = run_signround(_model(), fmt, cfg, windows, policy=policy)
    rtn = run_rtn(_model(), fmt, None)
    ratios = {b: stream_error(_model(), quant, windows, b) / stream_error(_model(), rtn, windows, b) for b in (3, 4, 8)}
    # Measured (seed 0): sb 3: 0.82, 4: 0.57, 8: 0.39; mb 0.81, 0.59, 0.78 (mean 0.73). The 3-bit
    # gain is small by nature (V moves the 8-bit code by at most one step, which changes a 3-bit
    # value only near a 3-bit boundary); 0.95 still fails no gain at all.
    assert all(r < 0.95 for r in ratios.values()), ratios
    assert sum(ratios.values()) / 3 < 0.8, ratios


def test_a_window_never_ends_worse_than_its_start(tmp_path, text_file):
    """A learning rate far too large makes SignSGD worse than RTN: the window then keeps RTN."""
    fmt = get_format("int4-g32-asym")
    windows = _windows(4, 16)
    reports = []
    cfg = _config(tmp_path, text_file, "sb", fmt.name, recon_iters=4, recon_lr=40.0, recon_batch=2)
    quant = run_signround(_model(), fmt, cfg, windows, policy="sb", observer=lambda r, m: reports.append(r))
    assert all(r["loss_final"] <= r["loss_start"] or not r["kept"] for r in reports)
    rtn = run_rtn(_model(), fmt, None)
    assert stream_error(_model(), quant, windows) <= stream_error(_model(), rtn, windows) * (1 + 1e-6)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,name", [("la", "int4-g32-asym"), ("sb", "sefp-g32-nearest")])
def test_saved_model_loads_back_with_identical_outputs(tmp_path, text_file, policy, name):
    from otaro import checkpoint

    fmt = get_format(name)
    windows = _windows(4, 16)
    cfg = _config(tmp_path, text_file, policy, name, recon_iters=5, recon_batch=2)
    quant = run_signround(_model(), fmt, cfg, windows, policy=policy)
    rtn = run_rtn(_model(), fmt, None)
    assert {k: (v.shape, v.dtype) for k, v in quant.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in rtn.state_dict().items()}  # RTN's layout, nothing extra
    assert quant.get_precision() == rtn.get_precision()  # SEFP left at its top precision
    checkpoint.save(quant, tmp_path / "ck")
    loaded = checkpoint.load(tmp_path / "ck")
    for b in (fmt.bits if fmt.family == "sefp" else (None,)):
        if b is not None:
            set_precision(quant, b)
            set_precision(loaded, b)
        with torch.no_grad():
            assert torch.equal(quant(windows).logits, loaded(windows).logits), b


# --------------------------------------------------------------------------------------------
# Options, errors, CLI
# --------------------------------------------------------------------------------------------


def test_config_resolves_and_records_the_method_defaults(tmp_path, text_file):
    cfg = _config(tmp_path, text_file, "la", "int4-g32-asym")
    assert (cfg.recon_blocks, cfg.recon_iters, cfg.recon_lr, cfg.recon_batch) == (2, 200, 1 / 200, 8)
    cfg = _config(tmp_path, text_file, "sb", "int4-g32-asym", recon_iters=50)
    assert (cfg.recon_blocks, cfg.recon_iters, cfg.recon_lr) == (1, 50, 1 / 50)
    cfg = _config(tmp_path, text_file, "gptq", "int4-g32-asym")
    assert cfg.recon_iters is None and cfg.recon_lr is None  # untouched for other methods


@pytest.mark.parametrize("kw,needle", [
    ({"method": "la", "recon_iters": 0}, "--recon-iters must be an integer of at least 1"),
    ({"method": "mb", "recon_iters": -5}, "--recon-iters must be an integer of at least 1"),
    ({"method": "mb", "recon_blocks": 0}, "--recon-blocks must be an integer of at least 1"),
    ({"method": "sb", "recon_blocks": 2}, "--recon-blocks 2 needs --method la or mb"),
    ({"method": "la", "recon_lr": 0.0}, "--recon-lr must be a positive number"),
    ({"method": "la", "recon_lr": float("nan")}, "--recon-lr must be a positive number"),
    ({"method": "sb", "recon_batch": 0}, "--recon-batch must be an integer of at least 1"),
    ({"method": "gptq", "recon_iters": 10}, "method gptq has no block-reconstruction options; drop --recon-iters"),
    ({"method": "sb", "lsi_k": 4}, "--lsi-k only apply to --method lsi"),
])
def test_bad_options_are_one_clear_error_in_the_config(tmp_path, text_file, kw, needle):
    method = kw.pop("method")
    with pytest.raises(OtaroError, match=needle.replace("(", r"\(")) as e:
        _config(tmp_path, text_file, method, "int4-g32-asym", **kw)
    assert "\n" not in str(e.value)


def test_too_many_blocks_fail_before_any_work(tmp_path, text_file, monkeypatch):
    import otaro.methods.recon.driver as driver

    def no_work(*a, **k):
        raise AssertionError("the block count must be checked before the layer inputs are captured")

    monkeypatch.setattr(driver, "capture_layer_inputs", no_work)
    for policy in ("la", "mb"):
        cfg = _config(tmp_path, text_file, policy, "int4-g32-asym", recon_blocks=3)
        with pytest.raises(OtaroError, match="--recon-blocks 3 is larger than the model's 2 decoder layers"):
            run_signround(_model(), get_format("int4-g32-asym"), cfg, _windows(2, 8), policy=policy)


def test_cli_errors_print_one_line_and_write_nothing(tmp_path, hf_model, text_file):
    out = tmp_path / "o"
    for args, needle in [
        (("--method", "la", "--recon-blocks", 5), "--recon-blocks 5 is larger than the model's 2 decoder layers"),
        (("--method", "mb", "--recon-iters", 0), "--recon-iters must be an integer of at least 1 (got 0)"),
        (("--method", "sb", "--recon-blocks", 2), "needs --method la or mb"),
        (("--method", "gptq", "--recon-lr", 0.1), "drop --recon-lr"),
    ]:
        res = invoke("quantize", hf_model, "-o", out, "--format", "int4-g32-asym", "--calib", text_file,
                     "--calib-samples", 2, "--calib-len", 16, *args)
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], res.output
        assert not out.exists()


def test_cli_mb_on_sefp_end_to_end(tmp_path, hf_model, text_file):
    from otaro import checkpoint

    res = invoke("quantize", hf_model, "-o", tmp_path / "m", "--method", "mb", "--format", "ssfp-g16-nearest",
                 "--bits", SEFP_TARGETS, "--calib", text_file, "--calib-samples", 4, "--calib-len", 32,
                 "--recon-iters", 10, "--recon-batch", 2)
    assert res.exit_code == 0, res.output
    model = checkpoint.load(tmp_path / "m")
    assert all(isinstance(m, SEFPLinear) for m in quant_layers(model).values())
    assert set(model.get_precision().values()) == {8}
    cfg = json.loads((tmp_path / "m" / "otaro.json").read_text())["method"]
    assert cfg["name"] == "mb"
    c = cfg["config"]
    assert (c["recon_blocks"], c["recon_iters"], c["recon_lr"], c["recon_batch"]) == (2, 10, 0.1, 2)
    assert c["bits"] == [[3, 1.0], [4, 1.0], [8, 1.0]]
