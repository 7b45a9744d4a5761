"""``otaro inspect``: what a checkpoint holds and what each precision costs."""

from __future__ import annotations

import json
from pathlib import Path

from otaro.formats import get_format


def precision_bytes(manifest: dict) -> dict[int, dict[str, int]]:
    """Bytes of quantized weights at each bit-width the format carries, plus the unquantized rest
    (what a fixed-precision copy of the model would take)."""
    fmt = get_format(manifest["format"]["name"])
    weights = sum(l["in_features"] * l["out_features"] for l in manifest["layers"].values())
    groups = sum(-(-l["in_features"] // fmt.group_size) * l["out_features"] for l in manifest["layers"].values())
    bits = fmt.bits if isinstance(fmt.bits, tuple) else (fmt.bits,)
    out = {}
    for b in bits:
        bits_total = weights * b + groups * (fmt.storage_bits_per_group(b) - b * fmt.group_size)
        out[b] = {"quantized_bytes": -(-bits_total // 8)}
    return out


def describe(path: str | Path, as_json: bool = False) -> str:
    from otaro.checkpoint import read_manifest

    m = read_manifest(path)
    if as_json:
        return json.dumps(m, indent=2)
    fmt = m["format"]
    lines = [
        f"checkpoint   {path}",
        f"format       {fmt['name']} (checkpoint v{m['otaro_checkpoint']}, otaro {m.get('otaro_version')})",
        f"architecture {m['arch']} ({m['model_type']}), {len(m['layers'])} quantized linears",
        f"method       {m.get('method', {}).get('name', '?')}, source {m.get('source', {}).get('model', '?')}",
        f"trained for  {m.get('trained_bits') or 'not fine-tuned (post-training quantization)'}",
        f"default bits {m.get('default_bits')}",
        f"weights      {m['weights']['file']} {m['weights']['bytes'] / 2**20:.2f} MiB, sha256 {m['weights']['sha256'][:16]}…",
        f"kept high precision: {len(m['high_precision'])} tensors (embeddings, norms, head)",
        "",
        "bits  quantized-linear bytes (fixed-precision copy)",
    ]
    for b, row in precision_bytes(m).items():
        lines.append(f"{b:>4}  {row['quantized_bytes']:>12,}")
    return "\n".join(lines)
