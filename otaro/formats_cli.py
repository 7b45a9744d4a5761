"""Rows and rendering for ``otaro formats`` (kept out of the table module: rich is UI)."""

from __future__ import annotations

from otaro.formats import FORMATS, SEFP_ROUNDINGS, format_bits
from otaro.formats.table import is_legacy


def format_rows(family: str | None = None) -> list[dict]:
    rows = []
    for fmt in FORMATS.values():
        # legacy rows only decode old files; `otaro formats` lists what a new model can use
        if (family and fmt.family != family) or is_legacy(fmt):
            continue
        row = {"name": fmt.name, "family": fmt.family}
        if fmt.family == "sefp":
            row.update(
                bits=format_bits(fmt.bits), group_size=fmt.group_size, detail=fmt.rounding, scale=fmt.scale,
                bits_per_weight={b: fmt.bits_per_weight(b) for b in fmt.bits},
                containers={b: fmt.container_bits(b) for b in fmt.bits},
                planes_read={b: fmt.planes_read(b) for b in fmt.bits},
                description=SEFP_ROUNDINGS[fmt.rounding].description,
            )
        elif fmt.family == "int":
            row.update(
                bits=str(fmt.bits), group_size=fmt.group_size, detail="sym" if fmt.symmetric else "asym",
                bits_per_weight={fmt.bits: fmt.bits_per_weight()}, containers={fmt.bits: fmt.container_bits()},
                description=f"{fmt.bits}-bit integer, fp16 scale{'' if fmt.symmetric else ' + zero point'} per group",
            )
        else:
            row.update(bits=str(fmt.storage_bits), group_size=None, detail="", bits_per_weight={fmt.storage_bits: float(fmt.storage_bits)},
                       containers={}, description="unquantized")
        rows.append(row)
    return rows


def print_formats(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="otaro number formats", title_justify="left")
    for col, just in (("name", "left"), ("bits", "right"), ("group", "right"), ("bits/weight", "left"),
                      ("container b=2..8", "left"), ("planes", "left")):
        t.add_column(col, justify=just, no_wrap=col == "name")
    for r in rows:
        bpw = r["bits_per_weight"]
        if r["family"] == "sefp":
            bpw_s = f"b + {bpw[2] - 2:g}"
            cont = ",".join(str(c or "fp") for c in r["containers"].values())
            extra = {p - b for b, p in r["planes_read"].items() if b < 8}
            planes = "8" if all(p == 8 for p in r["planes_read"].values()) else "b" if extra == {0} else "b+1"
        else:
            bpw_s = " ".join(f"{v:g}" for v in bpw.values())
            cont = " ".join(str(c) for c in r["containers"].values() if c)
            planes = ""
        t.add_row(r["name"], r["bits"], str(r["group_size"] or "-"), bpw_s, cont, planes)
    console = Console()
    console.print(t)
    if any(r["family"] == "sefp" for r in rows):
        console.print("SEFP roundings: " + "; ".join(f"[bold]{n}[/bold]: {r.description}" for n, r in SEFP_ROUNDINGS.items()
                                                     if not r.legacy))
        console.print("sefp-*: power-of-two group exponent (8 bits per group); ssfp-*: fp16 group scale (16 bits).")
    console.print("bits/weight counts the per-group exponent (sefp, 8 bits) or fp16 scale (ssfp and int) and packed zero point (int). "
                  "containers: the onnxruntime MatMulNBits width each precision runs in exactly (fp = dequantized float). "
                  "planes: bit-planes a kernel reads at precision b.")
