"""llama.cpp as a benchmark peer, built offline from the llama-cpp-python sdist (PyPI only).

``python benchmarks/llamacpp.py`` (``make llama-cpp``) downloads the sdist of
llama-cpp-python (which vendors llama.cpp), builds ``llama-bench`` and ``llama-quantize`` with
cmake into the otaro cache (about 15 minutes on 2 cores) and prints where they are. Nothing is
installed into the environment, and nothing here runs in the tests.

Found instead of built, in this order: ``$LLAMA_CPP_BIN`` (a folder holding both tools), a
previous build in the cache, both tools on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"  # docs/FACTS.md: the version checked to build here
TOOLS = ("llama-bench", "llama-quantize")
# Not GGML_NATIVE: on this VM `-march=native` enables AMX, which the CPU reports but the guest
# may not use (llama-bench died with SIGILL in libggml-cpu). The x86 vector extensions are chosen
# one by one instead from what /proc/cpuinfo lists (see _x86_flags); AMX and AVX512-FP16 stay off.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
# ggml option -> the /proc/cpuinfo flag it needs
X86_OPTIONS = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
               "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
               "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}


def _x86_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f"-D{opt}={'ON' if flag in have else 'OFF'}" for opt, flag in X86_OPTIONS.items()]


def cache_root() -> Path:
    from otaro.assets import cache_dir

    return cache_dir() / "llama.cpp"


def _flags() -> list[str]:
    return [*CMAKE_FLAGS, *_x86_flags()]


def _complete(folder: Path, check_flags: bool = False) -> bool:
    ok = all((folder / t).is_file() and os.access(folder / t, os.X_OK) for t in TOOLS)
    if ok and check_flags:  # our own build: made with today's flags (an older one may SIGILL here)
        stamp = folder.parent / "otaro-cmake-flags.txt"
        ok = stamp.is_file() and stamp.read_text().split() == _flags()
    return ok


def find_tools() -> Path | None:
    """The folder holding llama-bench and llama-quantize, or None."""
    env = os.environ.get("LLAMA_CPP_BIN")
    if env:
        return Path(env) if _complete(Path(env)) else None
    built = cache_root() / "build" / "bin"
    if _complete(built, check_flags=True):
        return built
    on_path = [shutil.which(t) for t in TOOLS]
    if all(on_path) and len({Path(p).parent for p in on_path}) == 1:
        return Path(on_path[0]).parent
    return None


def build(jobs: int = 2) -> Path:
    """Download the sdist, build the tools; returns their folder. Resumes a partial build."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        dl = root / "sdist"
        dl.mkdir(exist_ok=True)
        if not list(dl.glob("*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                            "-d", str(dl)], check=True)
        tgz = next(dl.glob("*.tar.gz"))
        tmp = root / "extract"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as t:
            t.extractall(tmp, filter="data")
        vendored = next(tmp.glob("*/vendor/llama.cpp"))
        shutil.rmtree(src, ignore_errors=True)
        shutil.move(str(vendored), str(src))
        shutil.rmtree(tmp, ignore_errors=True)
    bdir = root / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), *_flags()], check=True)
    subprocess.run(["cmake", "--build", str(bdir), f"-j{jobs}", "--target", *TOOLS], check=True)
    (bdir / "otaro-cmake-flags.txt").write_text("\n".join(_flags()) + "\n")
    out = bdir / "bin"
    if not _complete(out, check_flags=True):
        raise SystemExit(f"the build finished but {out} lacks {', '.join(TOOLS)}")
    return out


def ensure_tools(build_if_missing: bool = False) -> Path | None:
    found = find_tools()
    if found is None and build_if_missing:
        found = build()
    return found


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="find or build llama.cpp's llama-bench and llama-quantize")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    found = find_tools()
    print(found if found is not None else build(args.jobs))


if __name__ == "__main__":
    main()
