"""The torch-free runtime: load an exported artifact, generate text, switch precision on the fly.

    rt = Runtime.load("art", bits=4)
    print(rt.generate("The weather", max_new_tokens=32).text)
    rt.set_precision({"*": 3, "layers.0.*": 8})        # per layer, globs as in otaro.modules
    with rt.precision(8):                               # temporarily
        for chunk in rt.stream([{"role": "user", "content": "Hi"}], temperature=0.7, seed=1):
            print(chunk, end="")
    rt.generate(["short", "a longer prompt"], bits=3)   # a batch, at its own precision

Every request picks its session when it starts and keeps it to the end, so a switch (or a
cache eviction) in another thread never changes a running request: precision is per request,
the runtime's own precision is only the default. Needs numpy, onnx, onnxruntime, tokenizers and
jinja2 — never torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from otaro.errors import OtaroError
from otaro.manifest_schema import check, check_tokenizer_folder, load_json
from otaro.runtime.artifact import ArtifactError, read_manifest, verify_files
from otaro.runtime.backends import BackendChoice, create_session, select_backend
from otaro.runtime.chat import ChatTemplate, ChatTemplateError, Messages, check_messages
from otaro.runtime.decoder import Batch, Decoder
from otaro.runtime.hugepages import Collapser, anonymous_ranges
from otaro.runtime.sampling import Sampler, SamplingConfig
from otaro.runtime.spill import Spill
from otaro.runtime.switch import (Entry, Master, Precision, PrecisionSpec, SessionCache, SwitchReport, build_model,
                                  big_blocks_mapped, release_freed_memory,
                                  resolve_precision)

Prompt = Union[str, Messages, Sequence[int]]
DEFAULT_CACHE_BYTES = 2 << 30
# What the runtime reads besides the manifest's model files (tokenizers, ChatTemplate.find).
RUNTIME_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    bits: PrecisionSpec | None = None  # this request's precision; None = the runtime's

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OtaroError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise OtaroError(f"stop strings must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)  # checks them

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class Generation:
    text: str  # the new text (special tokens skipped, cut before a stop string)
    token_ids: tuple[int, ...]  # the new tokens (an end-of-sequence token included)
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens or the context is full)
    precision: str
    seconds: float  # whole request: prefill + decode
    prefill_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the whole request (prefill included)."""
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class Stream:
    """The text of one request, chunk by chunk as it is generated; ``result`` (a
    :class:`Generation`) once the iteration is over. Concatenated chunks equal ``result.text``."""

    def __init__(self, job: "_Job"):
        self._job, self._started = job, False
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise OtaroError("a stream can be read once; start another request")
        self._started = True
        for _, chunk in self._job.run():
            yield chunk
        self.result = self._job.results()[0]


def _is_prompt(p: Any) -> bool:
    if isinstance(p, str):
        return True
    if isinstance(p, (Sequence, np.ndarray)) and len(p):
        first = p[0]
        return isinstance(first, Mapping) or (isinstance(first, (int, np.integer)) and not isinstance(first, bool))
    return False


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return check(load_json(path, ArtifactError), dict, str(path), ArtifactError)


def _ids(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, list) else () if v is None else (int(v),)


def _check_sizes(root: Path, files: dict) -> None:
    for name, rec in files.items():
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{p} is missing")
        if p.stat().st_size != rec["bytes"]:
            raise ArtifactError(f"{p} is corrupt or truncated (its size differs from the manifest)")


def _spill_warning(folder, e: OSError) -> None:
    warnings.warn(f"otaro: cannot write packed weights to {folder} ({e.strerror or e}); building precisions in "
                  f"memory instead (a switch then needs about three times the precision's weights)",
                  RuntimeWarning, stacklevel=4)


def _make_spill(master: Master) -> Spill | None:
    import tempfile

    try:
        return Spill(master.data, master.data_name)
    except OSError as e:
        _spill_warning(tempfile.gettempdir(), e)
        return None


class Runtime:
    """One loaded artifact. Build it with :meth:`load`; thread-safe."""

    def __init__(self, root: Path, manifest: dict, master: Master, backend: BackendChoice, tokenizer,
                 template: ChatTemplate | None, config: dict, threads: int | None, cache_bytes: int,
                 spill: Spill | None = None, huge_pages: bool = True):
        self.root, self.manifest, self.master, self.backend = root, manifest, master, backend
        self._spill, self._huge_pages = spill, huge_pages
        self._collapser = Collapser()  # moves each build's weights to huge pages, in the background
        self.tokenizer, self.chat_template, self.threads = tokenizer, template, threads
        self.layers: tuple[str, ...] = tuple(master.layers)
        self.bits_available: tuple[int, ...] = tuple(manifest["bits"])
        self.eos_ids = frozenset(config["eos"])
        self.pad_id = config["pad"]
        self.context_length: int | None = config["context"]
        self._prefix = config["prefix"]
        self._cache = SessionCache(cache_bytes, self._build)
        self._lock = threading.Lock()  # active precision + last switch
        self._switch_lock = threading.Lock()  # set_precision calls, one at a time
        self._active: Precision | None = None
        self._active_entry: Entry | None = None
        self._last_switch: SwitchReport | None = None
        self._profiled: set[int] = set()  # sessions whose profile end_profiling already closed

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, artifact: str | os.PathLike, device: str = "cpu", threads: int | None = None,
             accuracy_level: int | None = None, bits: PrecisionSpec | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES, verify: bool = True,
             warm: Sequence[PrecisionSpec] = (), spin: bool = True, profile: str | os.PathLike | None = None,
             fuse_siblings: bool = True, spill: bool = True, huge_pages: bool = True) -> "Runtime":
        """Read the artifact once and build the session of ``bits`` (default: the artifact's).

        ``accuracy_level`` of every MatMulNBits (default: the artifact's; 4 = int8 activations,
        fast; 1 = exact). ``cache_bytes``: budget of warm precisions besides the active one.
        ``verify``: check every file's sha256 (sizes are always checked). ``warm``: precisions
        built now, at load, so that switching to them later costs a cache lookup (they count
        against ``cache_bytes``; all are checked before any is built). ``spin=False``: onnxruntime's
        threads wait passively instead of spinning (better on a machine shared with other work).
        ``profile``: a path prefix; every session built writes onnxruntime's profile (model runs
        and each node's kernel time) when :meth:`end_profiling` is called
        (:func:`otaro.runtime.optrace.op_breakdown` sums it by op type). ``fuse_siblings=False``:
        one MatMulNBits per layer instead of one per group of layers reading the same activation
        (q/k/v, gate/up; the numbers are the same either way, the fused form is faster).
        ``spill``: a precision's packed weights reach onnxruntime through a private temporary
        folder (under ``$TMPDIR``) instead of in-memory copies, so a switch needs about a third
        of the memory (:mod:`otaro.runtime.spill`); where that folder cannot be written the
        runtime warns and builds in memory. ``huge_pages``: after each build the session's weights
        are moved to 2 MiB pages (Linux transparent huge pages; fewer TLB misses while a decode
        step streams them, :mod:`otaro.runtime.hugepages`); False leaves them on 4 KiB pages."""
        import onnxruntime as ort

        root = Path(artifact)
        if not root.exists():
            raise ArtifactError(f"artifact {root} does not exist")
        m = read_manifest(root)
        if m["format"] != "onnx":
            raise ArtifactError(f"{root} is a {m['format']!r} artifact; this runtime runs 'onnx' artifacts")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OtaroError(f"threads must be an integer >= 1, got {threads!r}")
        backend = select_backend(device, ort.get_available_providers(),
                                 m["accuracy_level"] if accuracy_level is None else accuracy_level)
        if profile is not None:
            profile = Path(profile)
            if not profile.parent.is_dir():
                raise OtaroError(f"profile prefix {profile}: folder {profile.parent} does not exist")
        backend = dataclasses.replace(backend, spin=bool(spin), profile=None if profile is None else str(profile),
                                      fuse_siblings=bool(fuse_siblings))
        for files in (m["model"]["files"], m["files"]):
            (verify_files if verify else _check_sizes)(root, files)
        # Tokenizer files are artifact files: only those the manifest lists (and so checked
        # above) are read, and none may point outside the folder.
        unlisted = [n for n in RUNTIME_TOKENIZER_FILES if (root / n).is_file() and n not in m["files"]]
        if unlisted:
            raise ArtifactError(f"{root / unlisted[0]} is not listed in the artifact's manifest (it was not written "
                                f"by `otaro export`); remove it or export again")
        check_tokenizer_folder(root, ArtifactError)
        master = Master(root, m)
        spill_dir = _make_spill(master) if spill else None
        tokenizer = None
        if (root / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
            except Exception as e:  # the Rust parser raises its own exception type
                raise ArtifactError(f"{root / 'tokenizer.json'} cannot be read: {e}") from None
        rt = cls(root, m, master, backend, tokenizer, ChatTemplate.find(root), cls._model_config(root, m), threads,
                 cache_bytes, spill_dir, bool(huge_pages))
        if isinstance(warm, (int, Mapping)):
            warm = [warm]
        prewarm = [rt.resolve(w) for w in warm]  # a bad spec fails before any session is built
        rt.set_precision(m["default_bits"] if bits is None else bits)
        for p in prewarm:
            rt._cache.get(p)
        cold = [p.label for p in prewarm if p.bits not in rt._cache.keys]
        if cold:
            raise OtaroError(f"cache_bytes={cache_bytes} cannot keep the warm precision(s) {', '.join(cold)} "
                             f"besides the active one: raise cache_bytes or warm fewer")
        return rt

    @staticmethod
    def _model_config(root: Path, m: dict) -> dict:
        from otaro.arch import ARCHS

        cfg, gen = _read_json(root / "config.json"), _read_json(root / "generation_config.json")
        genai = _read_json(root / "genai_config.json").get("model", {})
        eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
        pad = cfg.get("pad_token_id")
        adapter = ARCHS.get((m.get("architecture") or {}).get("arch"))
        return {"eos": eos, "pad": int(pad) if pad is not None else (eos[0] if eos else 0),
                "context": cfg.get("max_position_embeddings") or genai.get("context_length"),
                "prefix": adapter.prefix if adapter else "model."}

    # -- precision ------------------------------------------------------------------------

    def _build(self, bits: tuple[int, ...]) -> tuple[Entry, float, float]:
        t0 = time.perf_counter()
        before = anonymous_ranges() if self._huge_pages else None
        with ThreadPoolExecutor(self.threads or os.cpu_count() or 1) as pool:  # numpy frees the GIL
            def build(spill):
                return build_model(self.master, Precision(bits, ""), self.backend.container_for,
                                   self.backend.accuracy_level, pool, fuse_siblings=self.backend.fuse_siblings,
                                   spill=spill)

            spill = self._spill
            try:
                built = build(spill)
            except OSError as e:  # the spill folder cannot take the weights (full, removed, read-only)
                if spill is None:
                    raise
                _spill_warning(spill.folder, e)
                self._spill = None
                spill.close()
                built = build(None)
        t1 = time.perf_counter()
        try:
            with big_blocks_mapped():  # its prepacked weights go back to the OS with it
                session, borrowed = create_session(self.backend, built.model, built.files, built.shared,
                                                   self.threads, folder=built.folder)
        except Exception as e:  # onnxruntime's own exception types; the message says what failed
            raise OtaroError(f"onnxruntime could not build the model at bits {sorted(set(bits))} on "
                             f"{self.backend.backend}: {e}") from None
        finally:
            built.discard()  # the session holds what it still reads
        packed = built.packed_bytes
        del built  # the in-memory build's arrays: freed before the trim, so that it hands them back
        release_freed_memory()
        if before is not None:  # after the trim: its MADV_DONTNEED would split huge pages again
            self._collapser.submit(before)
        t2 = time.perf_counter()
        return Entry(bits, Decoder(session), packed, borrowed), t1 - t0, t2 - t1

    def wait_for_huge_pages(self, timeout: float | None = None) -> bool:
        """Block until the weights of every precision built so far are on huge pages (the move
        runs in the background after each build, :mod:`otaro.runtime.hugepages`): for timing
        decode at its steady speed. False if ``timeout`` seconds passed first."""
        return self._collapser.wait(timeout)

    def end_profiling(self) -> list[Path]:
        """Close the profile of every cached session (``Runtime.load(..., profile=)``) and return
        the trace files, oldest first. A session keeps running after this, unprofiled; one the
        cache evicted earlier took its profile with it."""
        if not self.backend.profile:
            raise OtaroError("this runtime was loaded without profile=: there is nothing to end")
        entries = [e for e in self._cache.entries() if id(e.decoder.session) not in self._profiled]
        files = []
        for e in entries:
            self._profiled.add(id(e.decoder.session))
            files.append(Path(e.decoder.session.end_profiling()))
        return sorted(files)

    def resolve(self, spec: PrecisionSpec) -> Precision:
        """Per-layer bits of ``spec`` (a mapping applies on top of the active precision)."""
        # Before the first switch (a per-layer spec at load), patterns apply to the default bits.
        b = self.manifest["default_bits"]
        head = self.manifest.get("head")
        head = (head["layer"], head["bits"]) if head else None
        current = self._active or resolve_precision(b, self.layers, self._prefix, self.bits_available, None, head)
        return resolve_precision(spec, self.layers, self._prefix, self.bits_available, current, head)

    def set_precision(self, spec: PrecisionSpec) -> SwitchReport:
        """Make ``spec`` the default precision of new requests: ``4`` or ``{"*": 4, "layers.0.*": 8}``.
        Checked before anything changes; running requests keep their precision."""
        with self._switch_lock:
            return self._activate(self.resolve(spec))

    def _activate(self, precision: Precision) -> SwitchReport:
        before = self._active
        try:
            entry, report = self._cache.get(precision, pin=True, before_build=self._drop_evicted)
        except BaseException:
            self._restore(before)
            raise
        # An old session the cache evicted was let go before the build (_drop_evicted), where
        # its memory was handed back; trimming here would split the new session's huge pages.
        with self._lock:
            self._active, self._active_entry, self._last_switch = precision, entry, report
        return report

    def _drop_evicted(self, evicted: list[tuple[int, ...]]) -> None:
        """The cache evicted these before a build (they would go once the new precision is
        pinned): let go of the active one too, so the build does not run beside it. Requests
        that start meanwhile wait for the switch (:meth:`_current`)."""
        with self._lock:
            if self._active_entry is not None and self._active_entry.bits in evicted:
                self._active_entry = None
        release_freed_memory()

    def _restore(self, precision: Precision | None) -> None:
        """After a failed switch: the precision active before it, rebuilt if it was let go."""
        if precision is None:
            return
        try:
            entry, _ = self._cache.get(precision, pin=True)
        except Exception:  # _current says so on the next request
            return
        with self._lock:
            self._active, self._active_entry = precision, entry

    def _current(self) -> tuple[Entry, Precision]:
        """The active entry; during a switch that let the old one go, after the switch."""
        with self._lock:
            entry, active = self._active_entry, self._active
        if entry is None:
            with self._switch_lock:
                with self._lock:
                    entry, active = self._active_entry, self._active
        if entry is None:
            before = f" ({active.label})" if active else ""
            raise OtaroError(f"no precision is active: the last switch failed and the precision before it{before} "
                             f"could not be rebuilt; call set_precision again")
        return entry, active

    @contextlib.contextmanager
    def precision(self, spec: PrecisionSpec) -> Iterator[SwitchReport]:
        """``with rt.precision(3): ...`` — switch, and switch back on the way out."""
        with self._switch_lock:
            before = self._active
            report = self._activate(self.resolve(spec))
        try:
            yield report
        finally:
            with self._switch_lock:
                self._activate(before)

    @property
    def active_precision(self) -> Precision:
        with self._lock:
            return self._active

    @property
    def last_switch(self) -> SwitchReport | None:
        with self._lock:
            return self._last_switch

    @property
    def decoder(self):
        """The active precision's KV-cache loop (:class:`otaro.runtime.decoder.Decoder`): for
        callers that drive onnxruntime themselves (benchmarks, custom decoding)."""
        return self._current()[0].decoder

    @property
    def warm_precisions(self) -> list[tuple[int, ...]]:
        return self._cache.keys

    def _session(self, bits: PrecisionSpec | None) -> tuple[Entry, Precision]:
        """The session a request keeps to its end."""
        entry, active = self._current()
        if bits is None:
            return entry, active
        precision = self.resolve(bits)
        if precision.bits == active.bits:
            return entry, precision
        entry, report = self._cache.get(precision)
        if not report.cached:
            with self._lock:
                self._last_switch = report
        return entry, precision

    # -- prompts --------------------------------------------------------------------------

    def apply_chat_template(self, messages: Messages) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(f"the artifact {self.root} has no chat template (tokenizer_config.json "
                                    f"chat_template or chat_template.jinja): pass plain text instead")
        return self.chat_template.render(messages)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a string, a chat (rendered with the template) or ids (returned as is)."""
        if isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], Mapping)):
            if self.tokenizer is None:
                raise ArtifactError(f"the artifact {self.root} has no tokenizer.json: pass token ids")
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt).ids
            else:
                check_messages(prompt)
                # The template writes the special tokens (BOS...) itself.
                ids = self.tokenizer.encode(self.apply_chat_template(prompt), add_special_tokens=False).ids
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise OtaroError("the prompt is empty (no tokens)")
        vocab = (self.manifest.get("architecture") or {}).get("vocab_size")
        if vocab and not all(0 <= i < vocab for i in ids):
            raise OtaroError(f"a prompt token id is outside the vocabulary (0..{vocab - 1})")
        if self.context_length and len(ids) >= self.context_length:
            raise OtaroError(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} "
                             f"tokens, which leaves no room to generate: shorten the prompt")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- running --------------------------------------------------------------------------

    def logits(self, prompt: Prompt, bits: PrecisionSpec | None = None) -> np.ndarray:
        """Logits [T, V] of one prompt (a single prefill)."""
        ids = self.encode(prompt)
        entry, _ = self._session(bits)
        return entry.decoder.prompt_logits(ids)

    def generate(self, prompt: Prompt | Sequence[Prompt], **options) -> Generation | list[Generation]:
        """Continue one prompt (-> a Generation) or a batch (a list -> a list), left-padded.
        A prompt is text, a chat (list of {"role", "content"} messages, rendered with the
        artifact's template) or token ids. Options: the fields of :class:`GenerationConfig`."""
        single = _is_prompt(prompt)
        job = _Job(self, [prompt] if single else prompt, GenerationConfig(**options))
        for _ in job.run():
            pass
        results = job.results()
        return results[0] if single else results

    def stream(self, prompt: Prompt, **options) -> Stream:
        """Like :meth:`generate` for one prompt, yielding text as it comes."""
        if not _is_prompt(prompt):
            raise OtaroError("stream takes one prompt (text, a chat or token ids); use generate for a batch")
        return Stream(_Job(self, [prompt], GenerationConfig(**options)))


class _Row:
    """One sequence of a request: its new tokens, its text, what has been streamed."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.ids, self.text, self.sent, self.reason = stop, [], "", 0, None

    def push(self, token: int, rt: Runtime) -> str:
        self.ids.append(token)
        if token in rt.eos_ids:
            self.reason = "eos"
            return self.flush()
        text = rt.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.reason = text[:min(cuts)], "stop"
            return self.flush()
        self.text = text
        return self._emit(len(text) - self._held_back(text))

    def _held_back(self, text: str) -> int:
        """Characters not streamed yet: an incomplete UTF-8 sequence (decoded as U+FFFD) and a
        tail that could be the start of a stop string."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
        return hold

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        chunk = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return chunk


class _Job:
    """One request. Everything is checked and its session picked when it is made; ``run``
    yields (row, text chunk) as tokens come."""

    def __init__(self, rt: Runtime, prompts: Sequence[Prompt], cfg: GenerationConfig):
        if isinstance(prompts, (str, bytes, Mapping)) or not len(prompts) or not all(_is_prompt(p) for p in prompts):
            raise OtaroError("a prompt is text, a chat (a list of {'role', 'content'} messages) or a list of token "
                             "ids; a batch is a non-empty list of prompts")
        self.rt, self.cfg = rt, cfg
        self.prompts = [rt.encode(p) for p in prompts]
        self.entry, self.precision = rt._session(cfg.bits)
        longest = max(len(p) for p in self.prompts)
        self.max_new = min(cfg.max_new_tokens, rt.context_length - longest) if rt.context_length else cfg.max_new_tokens
        self.rows = [_Row(cfg.stop) for _ in self.prompts]
        self.seconds = self.prefill_seconds = 0.0

    def run(self) -> Iterator[tuple[int, str]]:
        t0 = time.perf_counter()
        sampler = Sampler(self.cfg.sampling)
        batch = Batch(self.entry.decoder, self.prompts, self.rt.pad_id)
        logits = batch.prefill()
        self.prefill_seconds = time.perf_counter() - t0
        for step in range(self.max_new):
            tokens = sampler(logits)
            for i, row in enumerate(self.rows):
                if row.reason is None:
                    chunk = row.push(int(tokens[i]), self.rt)
                    if chunk:
                        yield i, chunk
            if all(r.reason for r in self.rows):
                break
            if step + 1 < self.max_new:
                logits = batch.step(tokens)
        for i, row in enumerate(self.rows):
            if row.reason is None:
                row.reason = "length"
                chunk = row.flush()
                if chunk:
                    yield i, chunk
        self.seconds = time.perf_counter() - t0

    def results(self) -> list[Generation]:
        return [Generation(r.text, tuple(r.ids), len(p), r.reason, self.precision.label, self.seconds,
                           self.prefill_seconds) for r, p in zip(self.rows, self.prompts)]
