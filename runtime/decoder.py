"""A KV-cache decode loop over any optimum-style decoder session (torch-free).

The graph contract is optimum's (and onnxruntime-genai's defaults): inputs ``input_ids``,
``attention_mask``, optional ``position_ids``, ``past_key_values.{i}.key|value`` shaped
``[batch, kv_heads, past, head_dim]``; outputs ``logits`` and ``present.{i}.key|value``.
The exporter's validation, the tests and :mod:`otaro.runtime` all drive models through this.
A :class:`Batch` runs several prompts of different lengths at once, left-padded.

A GroupQueryAttention graph (``otaro.padding = right``: the fused graph) keeps its KV cache in
place: :class:`SharedKV` holds one buffer per past input, bound through IOBinding as both that
past input and the matching present output, so onnxruntime writes each step's keys and values
into the buffer (GroupQueryAttention's ``past_present_share_buffer`` mode, entered when the two
share memory) instead of copying the whole cache into a new present and out to numpy every
step: what onnxruntime-genai does. The buffers grow by doubling when a sequence outgrows them.

A graph whose metadata carries ``otaro.recompute_past_after = N`` (LongRoPE: a sequence's
rotary frequencies change once it is longer than N, so the keys cached before are stale) is
re-run over every token, without the past, by the step that makes a sequence longer than N:
what transformers' Phi-3 ``generate`` does. In a batch each row crosses on its own step (its
real length, from the mask); rows that did not cross recompute the same values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
RESET_KEY = "otaro.recompute_past_after"  # written by the exporter (otaro/arch/rope.py)
# "right": the graph reads each row's length from the attention mask and wants the real tokens
# first (onnxruntime's GroupQueryAttention: the fused graph of otaro/export/fused.py).
PADDING_KEY = "otaro.padding"
# An input of the graphs the runtime builds (otaro.runtime.switch): [batch, k, 1] indices into
# each row's new tokens, the positions whose logits the run computes (the head runs on those
# rows of the hidden state only). Generation asks for one per row.
LOGIT_ROWS = "logit_rows"


@dataclass(frozen=True)
class DecoderIO:
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    kv_shape: dict[str, tuple[int, int]]  # past name -> (kv_heads, head_dim)
    kv_dtype: type
    has_position_ids: bool
    extra_inputs: tuple[str, ...]  # inputs we do not feed (e.g. a run-time bits input)
    recompute_past_after: int | None = None  # total length at which the past goes stale (RESET_KEY)
    right_padding: bool = False  # PADDING_KEY = "right"
    has_logit_rows: bool = False  # the graph takes LOGIT_ROWS

    @classmethod
    def of(cls, session) -> "DecoderIO":
        inputs = {i.name: i for i in session.get_inputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in inputs:
                raise ValueError(f"the ONNX model has no {need!r} input: not an exported causal LM decoder")
        past = sorted((n for n in inputs if _PAST.match(n)),
                      key=lambda n: (int(_PAST.match(n)[1]), _PAST.match(n)[2] != "key"))
        kv_shape = {}
        for n in past:
            shape = inputs[n].shape
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise ValueError(f"input {n} has shape {shape}, expected [batch, kv_heads, past, head_dim]")
            kv_shape[n] = (shape[1], shape[3])
        dtype = _NP_TYPES.get(inputs[past[0]].type, np.float32) if past else np.float32
        present = tuple(n.replace("past_key_values", "present") for n in past)
        known = {"input_ids", "attention_mask", "position_ids", LOGIT_ROWS, *past}
        meta = session.get_modelmeta().custom_metadata_map or {}
        reset = meta.get(RESET_KEY)
        padding = meta.get(PADDING_KEY, "left")
        if padding not in ("left", "right"):
            raise ValueError(f"the ONNX model's {PADDING_KEY} metadata is {padding!r}, expected 'left' or 'right'")
        return cls(tuple(past), present, kv_shape, dtype, "position_ids" in inputs,
                   tuple(n for n in inputs if n not in known), int(reset) if reset else None, padding == "right", LOGIT_ROWS in inputs)


class SharedKV:
    """A KV cache that onnxruntime updates in place (GroupQueryAttention graphs): one buffer
    ``[batch, kv_heads, capacity, head_dim]`` per past input, bound as that input and as its
    present output. ``capacity`` only grows (doubling, in steps of ``STEP`` positions); the
    positions a sequence holds are ``[:length]`` of each buffer.

    ``device`` None: the buffers are numpy arrays that onnxruntime writes through (the CPU
    provider reads and writes host memory). ``(device_type, device_id)``, e.g. ``("cuda", 0)``:
    the buffers are OrtValues that onnxruntime allocates on that device, so a GPU session keeps
    its cache where its attention runs; bound from host memory instead, every step would copy
    the whole cache to the device and back. Growth there goes through host memory, which is
    rare (log2 of the length, in steps of ``STEP``)."""

    STEP = 256  # positions added at a time, at least: one reallocation per 256 decode steps at worst

    def __init__(self, io: DecoderIO, batch: int, device: tuple[str, int] | None = None):
        self.io, self.batch, self.capacity, self.length = io, batch, 0, 0
        self.device = device
        self.buffers: dict[str, np.ndarray] = {}  # host arrays (device None only)
        self.values: dict[str, object] = {}  # OrtValues: over self.buffers (same memory), or on the device
        # The IOBinding of the last run, kept across steps so the KV buffers are bound once per
        # (session, capacity): rebinding 2 x layers OrtValues and reading them back as outputs
        # cost ~0.15 ms per step on SmolLM2, ~2% of a decode step.
        self._binding = None
        self._bound: tuple[object, int] | None = None
        self._logits: np.ndarray | None = None  # [batch, 1, vocab], written by each one-token step

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions; existing contents are kept."""
        if total <= self.capacity:
            return
        import onnxruntime as ort

        cap = max(total, 2 * self.capacity)
        cap = -(-cap // self.STEP) * self.STEP
        for n, (h, d) in self.io.kv_shape.items():
            buf = np.zeros((self.batch, h, cap, d), self.io.kv_dtype)
            if self.device is None:
                if n in self.buffers:
                    buf[:, :, :self.capacity] = self.buffers[n]
                self.buffers[n] = buf
                self.values[n] = ort.OrtValue.ortvalue_from_numpy(buf)
                continue
            if n in self.values:  # the filled part, by way of the host
                buf[:, :, :self.capacity] = self.values[n].numpy()
            value = ort.OrtValue.ortvalue_from_shape_and_type(buf.shape, buf.dtype, *self.device)
            value.update_inplace(buf)  # zeros beyond the filled part, as on the host path
            self.values[n] = value
        self.capacity = cap

    def arrays(self) -> dict[str, np.ndarray]:
        """The cache as the numpy path holds it: ``[batch, kv_heads, length, head_dim]`` (views of
        the host buffers; copies from a device)."""
        if self.device is None:
            return {n: b[:, :, :self.length] for n, b in self.buffers.items()}
        return {n: v.numpy()[:, :, :self.length] for n, v in self.values.items()}


# The execution providers whose sessions keep the in-place cache on their own device (the
# device type onnxruntime's OrtValue takes); any other provider reads and writes host memory.
KV_DEVICES = {"CUDAExecutionProvider": "cuda"}


def session_kv_device(session) -> tuple[str, int] | None:
    """Where ``session`` wants an in-place KV cache: None for host memory, else (type, id)."""
    providers = session.get_providers() if hasattr(session, "get_providers") else []
    provider = providers[0] if providers else "CPUExecutionProvider"
    device = KV_DEVICES.get(provider)
    if device is None:
        return None
    options = (session.get_provider_options() or {}).get(provider, {})
    return device, int(options.get("device_id", 0) or 0)


class Decoder:
    """Prefill + step-by-step decode. The KV cache is a dict of numpy arrays (fed in, read back
    every step) or, on a GroupQueryAttention graph, a :class:`SharedKV` updated in place."""

    def __init__(self, session, extra_feeds: dict[str, np.ndarray] | None = None, shared_kv: bool | None = None,
                 kv_device: tuple[str, int] | None | str = "auto"):
        self.session = session
        self.io = DecoderIO.of(session)
        self.extra_feeds = dict(extra_feeds or {})
        self._outputs = ["logits", *self.io.present_names]
        self._vocab = session.get_outputs()[0].shape[-1]  # an int, or a symbolic name
        # None: in place where the graph is GroupQueryAttention's (right padding says so).
        can_share = self.io.right_padding and bool(self.io.past_names)
        if shared_kv and not can_share:
            raise ValueError("shared_kv=True needs a GroupQueryAttention decoder (an `otaro export --graph fused` "
                             "artifact): this graph's attention copies its cache into new presents")
        self.shared_kv = can_share if shared_kv is None else bool(shared_kv)
        # Where a SharedKV lives: "auto" follows the session's first provider (session_kv_device).
        self.kv_device = session_kv_device(session) if kv_device == "auto" else kv_device

    def empty_past(self, batch: int) -> dict[str, np.ndarray] | SharedKV:
        if self.shared_kv:
            return SharedKV(self.io, batch, self.kv_device)
        return {n: np.zeros((batch, h, 0, d), self.io.kv_dtype) for n, (h, d) in self.io.kv_shape.items()}

    def _feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, np.int64), **self.extra_feeds}
        if self.io.has_logit_rows:
            if rows is None:  # every new token
                rows = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
            feeds[LOGIT_ROWS] = np.ascontiguousarray(rows, np.int64)[..., None]
        if self.io.has_position_ids:
            # Left padding is allowed: a position counts the real tokens before it.
            pos = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.ascontiguousarray(np.maximum(pos, 0)[:, -input_ids.shape[1]:], np.int64)
        return feeds

    def _forward_shared(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                        past: SharedKV, rows: np.ndarray | None) -> tuple[np.ndarray, SharedKV]:
        total = attention_mask.shape[1]
        if input_ids.shape[0] != past.batch or total != past.length + input_ids.shape[1]:
            raise ValueError(f"the cache holds {past.batch} row(s) of {past.length} positions; got "
                             f"{input_ids.shape[0]} row(s) of {input_ids.shape[1]} new tokens and a mask of {total}")
        past.reserve(total)
        b = past._binding
        if b is None or past._bound != (self.session, past.capacity):
            b = self.session.io_binding()
            for p, q in zip(self.io.past_names, self.io.present_names):
                b.bind_ortvalue_input(p, past.values[p])
                b.bind_ortvalue_output(q, past.values[p])
            past._binding, past._bound = b, (self.session, past.capacity)
        feeds = self._feeds(input_ids, attention_mask, rows)  # referenced until the run is done
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        vocab = self._vocab
        if not isinstance(vocab, int):  # a symbolic vocabulary: onnxruntime allocates the logits
            b.bind_output("logits")
            self.session.run_with_iobinding(b)
            past.length = total
            return self._pick(b.get_outputs()[0].numpy(), rows), past
        k = input_ids.shape[1] if rows is None or not self.io.has_logit_rows else rows.shape[1]
        shape = (input_ids.shape[0], k, vocab)
        if shape[1] == 1:  # a decode step: onnxruntime writes into one buffer, reused
            if past._logits is None or past._logits.shape != shape:
                past._logits = np.empty(shape, np.float32)
            out = past._logits
        else:
            out = np.empty(shape, np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, list(shape), out.ctypes.data)
        self.session.run_with_iobinding(b)
        past.length = total
        return self._pick(out.copy() if out is past._logits else out, rows), past

    def _pick(self, logits: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """The asked-for rows of logits a graph without LOGIT_ROWS computed for every token."""
        if rows is None or self.io.has_logit_rows:
            return logits
        return np.take_along_axis(logits, np.asarray(rows, np.int64)[..., None], axis=1)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: dict[str, np.ndarray] | SharedKV, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray] | SharedKV]:
        """One run: ``input_ids`` [B, T] new tokens, ``attention_mask`` [B, past + T]; logits
        [B, T, V], or [B, k, V] at ``rows`` [B, k] (indices into each row's new tokens: a graph the
        runtime built computes the head there only, any other graph is sliced after). A
        :class:`SharedKV` past is updated in place and returned."""
        if rows is not None:
            rows = np.asarray(rows, np.int64)
            if rows.ndim != 2 or rows.shape[0] != input_ids.shape[0] or rows.size and (
                    rows.min() < 0 or rows.max() >= input_ids.shape[1]):
                raise ValueError(f"rows must be [batch, k] indices into the {input_ids.shape[1]} new tokens, "
                                 f"got {rows.tolist()}")
        if isinstance(past, SharedKV):
            return self._forward_shared(input_ids, attention_mask, past, rows)
        out = self.session.run(self._outputs, {**self._feeds(input_ids, attention_mask, rows), **past})
        return self._pick(out[0], rows), dict(zip(self.io.past_names, out[1:]))

    def extend(self, ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray],
               new: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the last ``new`` of ``ids`` [B, total] (every token so far) on ``past``; the
        logits cover the new tokens (or ``rows`` [B, k] of them, indices into the new tokens),
        or every token when the past had to be recomputed and no rows were asked for."""
        total = ids.shape[1]
        reset = self.io.recompute_past_after
        if reset is not None and total > new:
            before = attention_mask[:, :total - new].sum(axis=1)  # real tokens of each row's past
            after = attention_mask.sum(axis=1)
            if np.any((before <= reset) & (after > reset)):
                shifted = None if rows is None else np.asarray(rows, np.int64) + (total - new)
                return self.forward(ids, attention_mask, self.empty_past(ids.shape[0]), shifted)
        return self.forward(ids[:, total - new:], attention_mask, past, rows)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, V] of one prompt in a single prefill."""
        x = np.asarray([ids], np.int64)
        logits, _ = self.forward(x, np.ones_like(x), self.empty_past(1))
        return logits[0]

    def greedy(self, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (the new tokens only)."""
        x = np.asarray([ids], np.int64)
        past = self.empty_past(1)
        out: list[int] = []
        new = x.shape[1]
        for _ in range(max_new_tokens):
            # the prompt's last row only; a one-token step has only that row (no rows to check)
            logits, past = self.extend(x, np.ones_like(x), past, new, rows=[[new - 1]] if new > 1 else None)
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            x = np.concatenate([x, np.asarray([[tok]], np.int64)], axis=1)
            new = 1
        return out


class Batch:
    """Prompts of different lengths decoded together: left padding (``attention_mask`` 0, and
    positions counting real tokens only), so each row sees exactly what it would see alone.
    A graph that wants the real tokens first (``DecoderIO.right_padding``: GroupQueryAttention
    takes each row's length from the mask's sum and writes its next key right after them) is
    padded on the right instead, and the prompt logits are read at each row's last real token;
    later steps append one real token to every row, and the graph counts only the mask's sum.

    ``prefill()`` returns the next-token logits [B, V] after the prompts; ``step(tokens)`` feeds
    one token per row and returns the next logits. Rows that finished early keep being fed
    (their outputs are ignored): the batch stays rectangular."""

    def __init__(self, decoder: Decoder, prompts: list[list[int]], pad_id: int):
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt of a batch needs at least one token")
        self.decoder = decoder
        width = max(len(p) for p in prompts)
        self._ids = np.full((len(prompts), width), pad_id, np.int64)
        self.mask = np.zeros((len(prompts), width), np.int64)
        self._right = decoder.io.right_padding
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if self._right else slice(width - len(p), width)
            self._ids[i, cols] = p
            self.mask[i, cols] = 1
        self._lengths = np.array([len(p) for p in prompts])
        self._past = decoder.empty_past(len(prompts))

    def prefill(self) -> np.ndarray:
        if self._right:  # each row's last real token
            logits, self._past = self.decoder.extend(self._ids, self.mask, self._past, self._ids.shape[1],
                                                     rows=(self._lengths - 1)[:, None])
            return logits[:, 0]
        return self._run(self._ids.shape[1])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        # every token is kept (a few bytes per step) in case the past must be recomputed
        self._ids = np.concatenate([self._ids, np.asarray(tokens, np.int64).reshape(-1, 1)], axis=1)
        return self._run(1)

    def _run(self, new: int) -> np.ndarray:
        # a prefill's last row; a one-token step has only that row (nothing to gather every step)
        last = np.full((len(self._lengths), 1), new - 1) if new > 1 else None
        logits, self._past = self.decoder.extend(self._ids, self.mask, self._past, new, rows=last)
        return logits[:, -1]
