"""``otaro inspect``: what a checkpoint holds and what each precision costs."""

from __future__ import annotations

import json
from pathlib import Path

from otaro.errors import CheckpointError
from otaro.formats import get_format
from otaro.manifest_schema import NONNEG_INT, NUMBER, ListOf, MapOf, check

# What the artifact view prints beyond what the runtime validates (otaro.runtime.artifact).
_ARTIFACT_DISPLAY = {
    "float_bytes": NONNEG_INT,
    "precisions": MapOf({"container_bits": (int, None), "weight_bytes": NONNEG_INT, "model_bytes": NONNEG_INT}),
    "validation": dict,
}
_VALIDATION = {
    "exact_accuracy_level": int, "relative_tolerance": NUMBER, "prompt_tokens": int, "new_tokens": int,
    "results": ListOf({"model": str, "bits": int, "max_abs_diff": NUMBER, "greedy_equal": bool, "shipped_level": int,
                       "shipped_max_abs_diff": NUMBER, "shipped_greedy_equal": bool}),
}


def _weights_size(rec: dict) -> str:
    return f"{rec['bytes'] / 2**20:.2f} MiB" if "bytes" in rec else "(size not recorded)"


def precision_bytes(manifest: dict) -> dict[int, dict[str, int]]:
    """Bytes of quantized weights at each bit-width the format carries, plus the unquantized rest
    (what a fixed-precision copy of the model would take)."""
    fmt = get_format(manifest["format"]["name"])
    head = manifest.get("head") or {}
    bits = fmt.bits if isinstance(fmt.bits, tuple) else (fmt.bits,)
    out = {}
    for b in bits:
        bits_total = 0
        for name, l in manifest["layers"].items():
            lb = head["bits"] if name == head.get("layer") else b  # a quantized head keeps its own bits
            groups = -(-l["in_features"] // fmt.group_size) * l["out_features"]
            bits_total += l["in_features"] * l["out_features"] * lb + groups * (fmt.storage_bits_per_group(lb) - lb * fmt.group_size)
        out[b] = {"quantized_bytes": -(-bits_total // 8)}
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _dir_bytes(files: dict) -> int:
    return sum(rec["bytes"] for rec in files.values())


def describe_artifact(path: str | Path, as_json: bool = False) -> str:
    """An exported artifact: manifest, variants, what each precision costs, validation."""
    from otaro.runtime.artifact import read_manifest

    m = read_manifest(path)
    if as_json:
        return json.dumps(m, indent=2)
    check(m, _ARTIFACT_DISPLAY, f"{Path(path) / 'otaro_artifact.json'}", CheckpointError)
    val = m["validation"]
    if not val.get("skipped"):
        check(val, _VALIDATION, f"{Path(path) / 'otaro_artifact.json'}", CheckpointError, "validation")
    s, arch = m["sefp"], m["architecture"]
    model_bytes = _dir_bytes(m["model"]["files"])
    lines = [
        f"artifact     {path}  ({m['format']}, artifact v{m['otaro_artifact']}, otaro {m.get('tools', {}).get('otaro')})",
        f"architecture {arch['arch']} ({arch['model_type']}), {arch.get('num_hidden_layers')} blocks, "
        f"{len(m['layers'])} quantized linears, vocab {arch.get('vocab_size')}",
        f"number format {s['format']} (group {s['group_size']}, {s['rounding']}), stored once as int8 mantissas + "
        f"exponents in {s['domain']}.{s['function']}",
        f"bits         {m['bits']}  default {m['default_bits']} (the `{s['bits_input']}` initializer)  "
        f"trained for {m.get('trained_bits') or 'none (post-training)'}",
        f"files        {m['model']['file']} + {m['model']['data']}: {_mib(model_bytes)} on disk "
        f"(fixed part: float tensors, embedding code {_mib(m['float_bytes'])}); accuracy_level {m['accuracy_level']}",
        "",
        "bits  container  in memory at this precision   a separate per-bit file would be",
    ]
    zoo = 0
    for b, rec in m["precisions"].items():
        zoo += rec["model_bytes"]
        c = rec["container_bits"] or "float"
        lines.append(f"{b:>4}  {c!s:>9}  {_mib(rec['weight_bytes']):>14} weights    {_mib(rec['model_bytes']):>14}")
    lines.append(f"      one file for all {len(m['precisions'])} precisions: {_mib(model_bytes)} vs "
                 f"{_mib(zoo)} for the per-bit files ({zoo / max(model_bytes, 1):.1f}x)")
    lines += ["", f"variants ({len(m['variants'])})"]
    for v in m["variants"]:
        lines.append(f"  {v['path']:<32} {v['kind']:<10} {v['format']:<18} {v['bits']} bits in a "
                     f"{v['container_bits']}-bit MatMulNBits, accuracy_level {v['accuracy_level']}, "
                     f"{_mib(_dir_bytes(v['files']))}")
    if val.get("skipped"):
        lines += ["", "validation   skipped at export (--no-validate)"]
    else:
        lines += ["", f"validation vs torch (exact accuracy_level {val['exact_accuracy_level']}, relative tolerance "
                      f"{val['relative_tolerance']:g}, {val['prompt_tokens']} prompt + {val['new_tokens']} greedy tokens)",
                  "  model                     bits  max|dlogit|  greedy  | at level  max|dlogit|  greedy"]
        for r in val["results"]:
            lines.append(f"  {r['model']:<25} {r['bits']:>4}  {r['max_abs_diff']:>10.2e}  "
                         f"{'equal' if r['greedy_equal'] else 'DIFF':>6}  | {r['shipped_level']:>8}  "
                         f"{r['shipped_max_abs_diff']:>10.2e}  {'equal' if r['shipped_greedy_equal'] else 'differ':>6}")
    return "\n".join(lines)


def describe(path: str | Path, as_json: bool = False) -> str:
    from otaro.checkpoint import read_manifest
    from otaro.runtime.artifact import is_artifact

    if is_artifact(path):
        return describe_artifact(path, as_json)
    m = read_manifest(path)
    if as_json:
        return json.dumps(m, indent=2)
    fmt = m["format"]
    lines = [
        f"checkpoint   {path}",
        f"format       {fmt['name']} (checkpoint v{m['otaro_checkpoint']}, otaro {m.get('otaro_version')})",
        f"architecture {m['arch']} ({m['model_type']}), {len(m['layers'])} quantized linears",
        f"method       {(m.get('method') or {}).get('name', '?')}, source {(m.get('source') or {}).get('model', '?')}",
        f"trained for  {m.get('trained_bits') or 'not fine-tuned (post-training quantization)'}",
        f"default bits {m.get('default_bits')}",
        f"weights      {m['weights']['file']} {_weights_size(m['weights'])}, sha256 {m['weights']['sha256'][:16]}…",
        (f"head         {m['head']['layer']} quantized at its own {m['head']['bits']} bits; embedding "
         f"{m['head']['embedding']} " + ("reads the head's code (tied, stored once)" if m['head']['tied']
                                         else "stored as its own SEFP code")
         if m.get("head") else "head         float (embeddings and head kept in high precision)"),
        f"kept high precision: {len(m['high_precision'])} tensors"
        + (" (norms, biases)" if m.get("head") else " (embeddings, norms, head)"),
        "",
        "bits  quantized-linear bytes (fixed-precision copy)",
    ]
    for b, row in precision_bytes(m).items():
        lines.append(f"{b:>4}  {row['quantized_bytes']:>12,}")
    return "\n".join(lines)
