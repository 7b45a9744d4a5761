"""``otaro profile``: the click command (only click at import time: ``otaro --help`` stays fast)."""

from __future__ import annotations

import re

import click

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text: str) -> int:
    """'1GiB' / '512MiB' / '1073741824' -> bytes (K/M/G are binary here, as for the working set)."""
    m = _SIZE.match(str(text))
    if not m:
        raise click.BadParameter(f"cannot read size {text!r}: use e.g. 1GiB, 512MiB or a number of bytes")
    unit = (m[2] or "").lower()[:1]
    return int(float(m[1]) * _UNITS[unit])


def _bits(ctx, param, value):
    if value is None:
        return None
    from otaro.errors import OtaroError
    from otaro.formats import parse_bits

    try:
        return tuple(parse_bits(value))
    except OtaroError as e:
        raise click.BadParameter(str(e)) from None


def _list_devices() -> None:
    from otaro.devices import known_devices

    click.echo("| device | title | memory bandwidth GB/s | memory GiB | peaks (TOPS, dense) | backend | source |")
    click.echo("|---|---|---|---|---|---|---|")
    for name, p in sorted(known_devices().items()):
        peaks = ", ".join(f"{k} {v.label('{:g}')}" for k, v in p.compute_tops.items())
        src = f"measured {p.measured.date[:10]}" if p.measured else "spec sheet"
        click.echo(f"| {name} | {p.title} | {p.memory_bandwidth_gbs.label()} | {p.memory_gib.label()} | {peaks} | "
                   f"{p.preferred_backend} | {src} |")
    click.echo("(~ = derived or unofficial; `cat` the JSON in devices/profiles for each number's source)")


@click.command(name="profile")
@click.argument("artifact", required=False, type=click.Path())
@click.option("--bits", callback=_bits, help="Bit-widths to profile: '2,3,4,6,8' or '2-8' [default: every one the "
                                             "artifact carries].")
@click.option("--backend", default="onnxruntime-cpu", show_default=True,
              help="Backend to run on (a name of otaro.runtime.backends: onnxruntime-cpu, onnxruntime-cuda).")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1), help="Prompt tokens.")
@click.option("--gen-len", default=64, show_default=True, type=click.IntRange(min=2), help="Generated tokens.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs per bit-width.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime (and bandwidth test) threads [default: all cores].")
@click.option("--accuracy-level", type=click.IntRange(0, 4), help="MatMulNBits accuracy_level [default: the artifact's].")
@click.option("--device", "device_name", metavar="DEVICE",
              help="Device profile of this machine for the prediction beside the measurement [default: the memory "
                   "bandwidth measured at the start of the run].")
@click.option("--predict", "predict", multiple=True, metavar="DEVICE",
              help="Predict only, without running (repeatable; 'all' = every profile): the roofline per bit-width "
                   "and whether the artifact fits the device's memory.")
@click.option("--also-predict", multiple=True, metavar="DEVICE",
              help="Add roofline predictions for these devices to a measured report (repeatable; 'all').")
@click.option("--bandwidth/--no-bandwidth", "measure_bw", default=True, show_default=True,
              help="Measure this machine's memory bandwidth (the roofline) first.")
@click.option("--bandwidth-size", default="1GiB", show_default=True,
              help="Working set of the bandwidth test: well above the last-level cache.")
@click.option("--switch-matrix/--no-switch-matrix", default=True, show_default=True,
              help="Time the switch from every precision to every other, cold and warm.")
@click.option("--competitors/--no-competitors", default=True, show_default=True,
              help="Time reloading per-bit files (the competitors' way) and compare disk.")
@click.option("--gguf", multiple=True, type=click.Path(), help="GGUF of the same weights for llama-bench (if installed).")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Keep the per-bit files written for the comparison here [default: a temporary folder, removed].")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Folder for profile.json and profile.png [default: ./profile-<artifact>].")
@click.option("--save-device", metavar="NAME",
              help="Save this machine's measured bandwidth and matmul speed as device profile NAME (alone, or with "
                   "an ARTIFACT run).")
@click.option("--overwrite", is_flag=True, help="Replace an existing saved device profile of that NAME.")
@click.option("--list-devices", is_flag=True, help="List the known device profiles and exit.")
def profile(artifact, bits, backend, prompt_len, gen_len, repeats, warmup, threads, accuracy_level, device_name,
            predict, also_predict, measure_bw, bandwidth_size, switch_matrix, competitors, gguf, work_dir, output,
            save_device, overwrite, list_devices):
    """Latency and memory of an exported ARTIFACT at each bit-width, beside a roofline.

    Measures, per bit-width, prefill latency, time to first token, decode tokens/s (median and
    spread over repeats), peak memory, bytes read per token and the fraction of this machine's
    measured memory-bandwidth roofline; the switch latency between every pair of precisions;
    and the competitors' way (reloading one file per precision, disk for all of them,
    llama-bench when installed). Writes a table, profile.json and profile.png.

    \b
    Examples:
      otaro profile art --bits 2,3,4,6,8 --prompt-len 128 --gen-len 64 --repeats 3
      otaro profile art --predict h100-sxm --predict raspberry-pi-5   # roofline only, no run
      otaro profile --save-device my-laptop                           # measure and save this machine
      otaro profile --list-devices
    """
    from pathlib import Path

    from otaro.errors import OtaroError

    if list_devices:
        _list_devices()
        return
    if predict and (save_device or device_name or also_predict):
        raise OtaroError("--predict runs nothing: it cannot be combined with --save-device, --device or --also-predict")
    if save_device:
        from otaro.devices import DeviceError, check_name, profile_files, shipped_dir, user_dir

        check_name(save_device)
        if save_device in {f.stem for f in profile_files(shipped_dir())}:
            raise DeviceError(f"{save_device!r} is the name of a shipped device profile: choose another name")
        if (user_dir() / f"{save_device}.json").exists() and not overwrite:
            raise DeviceError(f"{user_dir() / (save_device + '.json')} exists: choose another name or pass --overwrite")
        if not measure_bw:
            raise OtaroError("--save-device needs the bandwidth measurement (drop --no-bandwidth)")
    size = parse_size(bandwidth_size)
    if artifact is None:
        if not save_device:
            raise click.UsageError("give an ARTIFACT to profile (or --list-devices, or --save-device NAME alone)")
        from otaro.devices import save_profile
        from otaro.profiling.bandwidth import measure_bandwidth, measured_profile

        click.echo(f"measuring memory bandwidth ({size / 2**30:g} GiB working set) and fp32 matmul ...", err=True)
        bw = measure_bandwidth(size, 3, threads)
        path = save_profile(measured_profile(save_device, bw), overwrite=overwrite)
        click.echo(f"read {bw.read_gbs:.2f} GB/s, copy {bw.copy_gbs:.2f} GB/s, fp32 matmul {bw.matmul_gflops:.0f} "
                   f"GFLOPS ({bw.threads} threads); wrote device profile {path}")
        return

    from otaro.profiling import report as rep
    from otaro.profiling.measure import ProfileConfig, predict_only, run_profile

    out = Path(output) if output else Path(f"profile-{Path(artifact).resolve().name}")
    if predict:
        result = predict_only(Path(artifact), predict, bits, prompt_len, gen_len)
    else:
        cfg = ProfileConfig(Path(artifact), bits=bits, backend=backend, prompt_len=prompt_len, gen_len=gen_len,
                            repeats=repeats, warmup=warmup, threads=threads, accuracy_level=accuracy_level,
                            device=device_name, predict=tuple(also_predict), bandwidth_bytes=size,
                            measure_bandwidth=measure_bw, switch_matrix=switch_matrix, competitors=competitors,
                            ggufs=tuple(Path(g) for g in gguf), work_dir=Path(work_dir) if work_dir else None)
        result = run_profile(cfg)
        if save_device:
            from otaro.devices import save_profile
            from otaro.profiling.bandwidth import Bandwidth, measured_profile

            bw = result["bandwidth"]
            b = Bandwidth(bw["read_gbs"], bw["copy_gbs"], tuple(bw["read_runs_gbs"]), bw["working_set_bytes"],
                          bw["threads"], bw["repeats"], bw["matmul_gflops"], bw["matmul_n"])
            click.echo(f"wrote device profile {save_profile(measured_profile(save_device, b), overwrite=overwrite)}",
                       err=True)
    rep.validate_report(result)
    click.echo(rep.render(result))
    j, p = rep.write(result, out)
    click.echo(f"wrote {j} and {p}")
