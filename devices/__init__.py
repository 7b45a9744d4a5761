"""otaro.devices — device profiles: the numbers a roofline prediction needs, each with its source.

A profile is a JSON data file (``devices/profiles/*.json``, shipped as package data) that says
what a device *is*: memory bandwidth, memory size, dense compute peaks and the backend otaro
would run it on, every number with where it came from (a vendor spec sheet, a derivation from
one, or a measurement on the machine with its date). Numbers that are derived or not published
by the vendor carry ``"uncertain": true``; the report prints them with a ``~``.

    from otaro.devices import get_device, known_devices
    h100 = get_device("h100-sxm")
    h100.bandwidth_bytes_per_s, h100.memory_bytes, h100.peak("int8")

Profiles written by ``otaro profile --save-device NAME`` (measured here) go to the user's
device folder (``$OTARO_DEVICES_DIR``, else ``$XDG_CONFIG_HOME/otaro/devices``, else
``~/.config/otaro/devices``) and are found next to the shipped ones. Torch-free, like the
runtime: numpy is not even needed to read a profile.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from otaro.errors import OtaroError
from otaro.manifest_schema import load_json

FORMAT_VERSION = 1
KINDS = ("cpu", "gpu", "soc", "sbc")  # server/laptop CPU, discrete GPU, laptop/phone SoC, single-board computer
COMPUTE_TYPES = ("fp32", "fp16", "bf16", "int8")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


class DeviceError(OtaroError):
    """An unknown device name or a malformed device profile."""


@dataclass(frozen=True)
class Spec:
    """One number and where it comes from. ``uncertain``: derived, or not published by the vendor."""

    value: float
    source: str
    uncertain: bool = False

    def __post_init__(self):
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not self.value > 0:
            raise DeviceError(f"a device number must be a positive number, got {self.value!r}")
        if not isinstance(self.source, str) or len(self.source.strip()) < 8:
            raise DeviceError(f"the number {self.value} needs its source (a spec sheet, a derivation or a "
                              f"measurement), got {self.source!r}")
        if not isinstance(self.uncertain, bool):
            raise DeviceError(f"'uncertain' must be true or false, got {self.uncertain!r}")

    def label(self, fmt: str = "{:g}") -> str:
        return ("~" if self.uncertain else "") + fmt.format(self.value)

    def to_json(self) -> dict:
        out = {"value": self.value, "source": self.source}
        if self.uncertain:
            out["uncertain"] = True
        return out


@dataclass(frozen=True)
class Measured:
    """How a measured profile was measured (``otaro profile --save-device``)."""

    date: str  # ISO date-time of the measurement
    method: str
    threads: int
    working_set_bytes: int
    machine: str = ""

    def __post_init__(self):
        if not isinstance(self.date, str) or not _DATE.match(self.date):
            raise DeviceError(f"measured.date must be an ISO date, got {self.date!r}")
        if not isinstance(self.method, str) or not self.method:
            raise DeviceError("measured.method must say how the numbers were measured")
        for k in ("threads", "working_set_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DeviceError(f"measured.{k} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    kind: str
    preferred_backend: str  # a name of otaro.runtime.backends.BACKENDS
    memory_bandwidth_gbs: Spec  # GB/s, 1e9 bytes per second
    memory_gib: Spec  # memory the model can use (unified memory on SoCs), GiB
    compute_tops: Mapping[str, Spec]  # dense peaks, 1e12 operations (FLOP for float types) per second
    notes: str = ""
    measured: Measured | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self):
        check_name(self.name)
        if not isinstance(self.title, str) or not self.title:
            raise DeviceError(f"device {self.name}: 'title' must be a non-empty string")
        if self.kind not in KINDS:
            raise DeviceError(f"device {self.name}: kind {self.kind!r} is not one of {list(KINDS)}")
        from otaro.runtime.backends import BACKENDS  # torch-free, imports nothing heavy

        if self.preferred_backend not in BACKENDS:
            raise DeviceError(f"device {self.name}: preferred_backend {self.preferred_backend!r} is not one of "
                              f"{sorted(BACKENDS)}")
        for k in ("memory_bandwidth_gbs", "memory_gib"):
            if not isinstance(getattr(self, k), Spec):
                raise DeviceError(f"device {self.name}: {k} must be a Spec")
        if not isinstance(self.compute_tops, Mapping) or not self.compute_tops:
            raise DeviceError(f"device {self.name}: compute_tops needs at least one of {list(COMPUTE_TYPES)}")
        for k, v in self.compute_tops.items():
            if k not in COMPUTE_TYPES or not isinstance(v, Spec):
                raise DeviceError(f"device {self.name}: compute_tops key {k!r} is not one of {list(COMPUTE_TYPES)}")
        object.__setattr__(self, "compute_tops", dict(self.compute_tops))

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs.value * 1e9

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib.value * 2**30)

    def peak(self, kind: str) -> Spec | None:
        """The dense peak for ``kind`` ("int8", "fp16", ...), falling back to fp32; None if absent."""
        return self.compute_tops.get(kind) or self.compute_tops.get("fp32")

    def to_json(self) -> dict:
        out = {"otaro_device": FORMAT_VERSION, "name": self.name, "title": self.title, "kind": self.kind,
               "preferred_backend": self.preferred_backend,
               "memory_bandwidth_gbs": self.memory_bandwidth_gbs.to_json(), "memory_gib": self.memory_gib.to_json(),
               "compute_tops": {k: v.to_json() for k, v in self.compute_tops.items()}}
        if self.notes:
            out["notes"] = self.notes
        if self.measured is not None:
            m = self.measured
            out["measured"] = {"date": m.date, "method": m.method, "threads": m.threads,
                               "working_set_bytes": m.working_set_bytes, "machine": m.machine}
        return out


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeviceError(f"invalid device name {name!r}: use lower-case letters, digits, '.', '_' or '-'")
    return name


_TOP_KEYS = {"otaro_device", "name", "title", "kind", "preferred_backend", "memory_bandwidth_gbs", "memory_gib",
             "compute_tops", "notes", "measured"}


def _spec(d, where: str) -> Spec:
    if not isinstance(d, dict) or set(d) - {"value", "source", "uncertain"} or "value" not in d:
        raise DeviceError(f"{where} must be an object with 'value', 'source' and optionally 'uncertain'")
    try:
        return Spec(d["value"], d.get("source"), d.get("uncertain", False))
    except DeviceError as e:
        raise DeviceError(f"{where}: {e}") from None


def parse_profile(data, where: str = "device profile") -> DeviceProfile:
    """A :class:`DeviceProfile` from parsed JSON; every field checked, unknown fields refused."""
    if not isinstance(data, dict):
        raise DeviceError(f"{where} is not a JSON object")
    if data.get("otaro_device") != FORMAT_VERSION:
        raise DeviceError(f"{where}: otaro_device must be {FORMAT_VERSION}, got {data.get('otaro_device')!r}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise DeviceError(f"{where}: unknown field(s) {sorted(unknown)}")
    for k in ("name", "title", "kind", "preferred_backend", "memory_bandwidth_gbs", "memory_gib", "compute_tops"):
        if k not in data:
            raise DeviceError(f"{where}: field {k!r} is missing")
    compute = data["compute_tops"]
    if not isinstance(compute, dict):
        raise DeviceError(f"{where}: compute_tops must be an object")
    measured = data.get("measured")
    if measured is not None:
        if not isinstance(measured, dict) or set(measured) - {"date", "method", "threads", "working_set_bytes", "machine"}:
            raise DeviceError(f"{where}: measured must be an object with date, method, threads, working_set_bytes")
        try:
            measured = Measured(measured.get("date"), measured.get("method"), measured.get("threads"),
                                measured.get("working_set_bytes"), measured.get("machine", ""))
        except DeviceError as e:
            raise DeviceError(f"{where}: {e}") from None
    notes = data.get("notes", "")
    if not isinstance(notes, str):
        raise DeviceError(f"{where}: notes must be a string")
    try:
        return DeviceProfile(
            name=data["name"], title=data["title"], kind=data["kind"], preferred_backend=data["preferred_backend"],
            memory_bandwidth_gbs=_spec(data["memory_bandwidth_gbs"], f"{where}: memory_bandwidth_gbs"),
            memory_gib=_spec(data["memory_gib"], f"{where}: memory_gib"),
            compute_tops={k: _spec(v, f"{where}: compute_tops.{k}") for k, v in compute.items()},
            notes=notes, measured=measured)
    except DeviceError as e:
        msg = str(e)
        raise DeviceError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    p = parse_profile(load_json(path, DeviceError, "device profile"), f"device profile {path}")
    if p.name != path.stem:
        raise DeviceError(f"device profile {path}: its name {p.name!r} differs from the file name {path.stem!r}")
    object.__setattr__(p, "path", path)
    return p


# --------------------------------------------------------------------------- the registry


def shipped_dir() -> Path:
    return Path(__file__).resolve().parent / "profiles"


def user_dir() -> Path:
    if os.environ.get("OTARO_DEVICES_DIR"):
        return Path(os.environ["OTARO_DEVICES_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "otaro" / "devices"


def profile_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def known_devices() -> dict[str, DeviceProfile]:
    """Every profile: the shipped ones, then the user's (read fresh on each call: a profile
    saved a moment ago is found). A user profile may not reuse a shipped name."""
    out: dict[str, DeviceProfile] = {}
    for directory in (shipped_dir(), user_dir()):
        for f in profile_files(directory):
            p = load_profile(f)
            if p.name in out:
                raise DeviceError(f"device {p.name!r} is defined twice: {out[p.name].path} and {f}; "
                                  f"rename or remove one")
            out[p.name] = p
    return out


def get_device(name: str) -> DeviceProfile:
    devices = known_devices()
    if name not in devices:
        raise DeviceError(f"unknown device {name!r}: known devices are {', '.join(sorted(devices))} "
                          f"(`otaro profile --list-devices`; `otaro profile --save-device NAME` measures this machine)")
    return devices[name]


def save_profile(profile: DeviceProfile, directory: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write ``profile`` as ``<directory>/<name>.json`` (default: the user's device folder)."""
    from otaro.io import atomic_file

    directory = Path(directory) if directory is not None else user_dir()
    path = directory / f"{profile.name}.json"
    shipped = {f.stem for f in profile_files(shipped_dir())}
    if profile.name in shipped and directory.resolve() != shipped_dir():
        raise DeviceError(f"{profile.name!r} is the name of a shipped device profile: choose another name")
    if path.exists() and not overwrite:
        raise DeviceError(f"{path} exists: choose another name or pass --overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(json.dumps(profile.to_json(), indent=2) + "\n")
    return path


__all__ = ["DeviceError", "DeviceProfile", "Measured", "Spec", "get_device", "known_devices", "load_profile",
           "parse_profile", "save_profile", "shipped_dir", "user_dir", "COMPUTE_TYPES", "KINDS"]
