"""Rewrite one marked section of benchmarks/RESULTS.md, leaving the others alone.

Each benchmark owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, so
re-running one script never erases another's measured tables.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Every number below was measured by a script in `benchmarks/` and written here by it; re-run the\n"
    "script to refresh its section (`make bench`). Machine and library versions are printed with each\n"
    "section.\n"
)


def update_section(name: str, body: str, path: Path = RESULTS) -> Path:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    from otaro.io import atomic_file

    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def portable(obj, repo: Path = RESULTS.parent.parent, home: Path = Path.home()):
    """``obj`` with this machine's paths spelled portably in every string (the repository as
    ``.``, the home folder as ``~``): results are committed, and no machine's absolute path
    belongs in the repository."""
    if isinstance(obj, dict):
        return {k: portable(v, repo, home) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v, repo, home) for v in obj)
    if isinstance(obj, str):
        for root, short in ((str(repo), "."), (str(home), "~")):
            if len(root) > 1:
                obj = obj.replace(root + "/", short + "/").replace(root, short) if root in obj else obj
        return obj
    return obj


def publish(name: str, result: dict, plot, markdown) -> str:
    """Write results/<name>.json and results/<name>.png, rewrite the `name` section of
    RESULTS.md and return its markdown: the common tail of every benchmark script. Paths in
    the result are made portable first (:func:`portable`)."""
    from otaro.io import write_json

    result = portable(result)

    out = RESULTS.parent / "results"
    out.mkdir(exist_ok=True)
    write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    body = markdown(result)
    update_section(name, body)
    return body


def save_figure(fig, path) -> None:
    """Lay out, write at the resolution every benchmark plot uses, and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
