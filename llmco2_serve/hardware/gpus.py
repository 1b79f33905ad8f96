"""GPU hardware specs: the packaged table (data/gpus.csv), name matching, user spec files.

The Roofline features of LLMCO2 (paper Sec. 4, Table 2) need each GPU's peak throughput per
dtype, memory bandwidth and network bandwidth; the carbon model needs its embodied carbon.
All peaks are DENSE (no 2:4 sparsity) vendor figures; ``data/GPUS.md`` gives every source.

The table is read lazily (first lookup) through importlib.resources and cached.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Mapping

from llmco2_serve.carbon.footprint import die_embodied_co2_kg

__all__ = [
    "DTYPES",
    "GPUSpec",
    "GPUSpecError",
    "UnknownGPUError",
    "UnsupportedDtypeError",
    "canonical_dtype",
    "compute_dtype_for",
    "gpu_spec",
    "known_gpus",
    "load_gpu_spec_file",
    "resolve_gpu",
]

#: Canonical dtype names, the keys of ``GPUSpec.peak_tflops``.
DTYPES: tuple[str, ...] = ("float32", "tf32", "float16", "bfloat16", "fp8", "int8", "int4")

# Storage width, to tell weight-only quantization (weights narrower than activations) apart.
_DTYPE_BITS: Mapping[str, int] = MappingProxyType(
    {"float32": 32, "tf32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8, "int4": 4}
)

_DTYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "float32": "float32", "fp32": "float32", "float": "float32",
        "tf32": "tf32", "tfloat32": "tf32",
        "float16": "float16", "fp16": "float16", "half": "float16",
        "bfloat16": "bfloat16", "bf16": "bfloat16",
        "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e4m3fnuz": "fp8",
        "float8_e5m2": "fp8", "float8_e5m2fnuz": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
        "int8": "int8", "uint8": "int8",
        "int4": "int4", "uint4": "int4",
    }
)

# CSV column holding each dtype's dense peak (TFLOP/s, or TOP/s for integers).
_PEAK_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        "float32": "float32_tflops",
        "tf32": "tf32_tflops",
        "float16": "float16_tflops",
        "bfloat16": "bfloat16_tflops",
        "fp8": "fp8_tflops",
        "int8": "int8_tops",
        "int4": "int4_tops",
    }
)

_CSV_COLUMNS: tuple[str, ...] = (
    "name", "aliases", "nvml_names", *_PEAK_COLUMNS.values(),
    "memory_gb", "memory_bandwidth_gb_s", "nvlink_bandwidth_gb_s", "pcie_bandwidth_gb_s",
    "tdp_w", "die_area_mm2", "process_nm", "source",
)

# Numeric GPUSpec fields and whether 0 is allowed (only NVLink: GPUs without it).
_NUMERIC_FIELDS: Mapping[str, bool] = MappingProxyType(
    {
        "memory_gb": False,
        "memory_bandwidth_gb_s": False,
        "nvlink_bandwidth_gb_s": True,
        "pcie_bandwidth_gb_s": False,
        "tdp_w": False,
        "die_area_mm2": False,
        "process_nm": False,
        "embodied_co2_kg": True,
    }
)

_SPEC_FILE_REQUIRED: tuple[str, ...] = (
    "name", "peak_tflops", "memory_gb", "memory_bandwidth_gb_s", "nvlink_bandwidth_gb_s",
    "pcie_bandwidth_gb_s", "tdp_w", "die_area_mm2", "process_nm",
)
_SPEC_FILE_OPTIONAL: tuple[str, ...] = ("embodied_co2_kg", "source")

_GB = 1e9
_TERA = 1e12


class UnsupportedDtypeError(ValueError):
    """A GPU has no peak throughput for a dtype (e.g. fp8 on an A100, bfloat16 on a T4)."""

    def __init__(self, dtype: str, gpu_name: str, supported: tuple[str, ...]) -> None:
        self.dtype = dtype
        self.gpu_name = gpu_name
        self.supported = supported
        super().__init__(
            f"{gpu_name} has no {dtype} compute (supported: {', '.join(supported)}). "
            f"For weight-only quantization (e.g. int4/fp8 weights with 16-bit activations) "
            f"the GEMMs run in the activation dtype: use "
            f"compute_dtype_for(weight_dtype, activation_dtype) to pick the dtype to ask for."
        )


class UnknownGPUError(LookupError):
    """A GPU name matches no row of the packaged table."""

    def __init__(self, name: str, known: tuple[str, ...], suggestions: tuple[str, ...]) -> None:
        self.name = name
        self.known = known
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"Unknown GPU {name!r}.{hint} Known GPUs: {', '.join(known)} (short aliases such "
            f"as 'h100', 'a100-80gb', 't4' and NVML device names such as 'NVIDIA H100 80GB "
            f"HBM3' also match, case- and whitespace-insensitively). For another GPU, write a "
            f"JSON spec file with the fields {', '.join(_SPEC_FILE_REQUIRED)} (optional: "
            f"{', '.join(_SPEC_FILE_OPTIONAL)}), as described in llmco2_serve/data/GPUS.md, "
            f"and pass it as spec_file to resolve_gpu() or load it with load_gpu_spec_file()."
        )


class GPUSpecError(ValueError):
    """A GPU spec (a user file, or values passed to GPUSpec) has a missing or bad field."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        self.field_name = field_name
        super().__init__(message)


def canonical_dtype(dtype: str) -> str:
    """Canonical dtype name (one of DTYPES) for a name such as 'bf16', 'torch.float16'."""
    if not isinstance(dtype, str):
        dtype = str(dtype)  # torch.dtype objects print as 'torch.float16'
    key = dtype.strip().lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} "
            f"(or an alias: {', '.join(sorted(set(_DTYPE_ALIASES) - set(DTYPES)))})"
        ) from None


def compute_dtype_for(weight_dtype: str, activation_dtype: str = "float16") -> str:
    """The dtype a quantized GEMM computes in, i.e. whose peak throughput bounds it.

    Weights narrower than activations are weight-only quantization (AWQ/GPTQ int4, W8A16,
    Marlin fp8 on GPUs without fp8): the kernel dequantizes them and computes in the
    activation dtype. Same-width weights and activations (W8A8 int8, fp8, bf16) compute in
    that dtype.

    Raises:
        ValueError: activations narrower than weights, or same width but different kinds
            (e.g. int8 weights with fp8 activations): no such GEMM exists.
    """
    weight = canonical_dtype(weight_dtype)
    activation = canonical_dtype(activation_dtype)
    weight_bits, activation_bits = _DTYPE_BITS[weight], _DTYPE_BITS[activation]
    if weight_bits < activation_bits:
        return activation
    if weight == activation:
        return weight
    raise ValueError(
        f"no GEMM computes {weight} weights with {activation} activations "
        f"(weight_dtype={weight_dtype!r}, activation_dtype={activation_dtype!r}); "
        f"pass the dtype the kernel computes in"
    )


def _number(field_name: str, value: Any, allow_zero: bool) -> float:
    # bool is an int subclass: True would silently mean 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GPUSpecError(f"{field_name} must be a number, got {value!r}", field_name)
    value = float(value)
    if not math.isfinite(value):
        raise GPUSpecError(f"{field_name} must be finite, got {value!r}", field_name)
    if value < 0.0 or (value == 0.0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise GPUSpecError(f"{field_name} must be {bound}, got {value!r}", field_name)
    return value


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model.

    Attributes:
        name: canonical name, e.g. "H100-SXM-80GB".
        peak_tflops: dense (no 2:4 sparsity) peak per dtype, TFLOP/s (TOP/s for int8/int4);
            keys are canonical dtypes (DTYPES), only the supported ones.
        memory_gb: GPU memory, GB (1e9 bytes, as datasheets).
        memory_bandwidth_gb_s: peak memory bandwidth, GB/s.
        nvlink_bandwidth_gb_s: total NVLink bandwidth per GPU, GB/s, BIDIRECTIONAL (both
            directions summed, the datasheet convention: H100 SXM 900 = 450 each way); 0 where
            the GPU has no NVLink or only an optional bridge.
        pcie_bandwidth_gb_s: host PCIe x16 bandwidth, GB/s, BIDIRECTIONAL (Gen3 32, Gen4 64,
            Gen5 128), same convention as NVLink and as the paper's Table 2.
        tdp_w: maximum board power (TDP/TBP), W.
        die_area_mm2: total GPU die area, mm^2.
        process_nm: process node, nm (TSMC 4N counts as 4).
        embodied_co2_kg: embodied carbon of one GPU, kgCO2e (carbon.die_embodied_co2_kg for
            table rows).
        source: where the numbers come from.
    """

    name: str
    peak_tflops: Mapping[str, float] = field(hash=False)
    memory_gb: float
    memory_bandwidth_gb_s: float
    nvlink_bandwidth_gb_s: float
    pcie_bandwidth_gb_s: float
    tdp_w: float
    die_area_mm2: float
    process_nm: float
    embodied_co2_kg: float
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise GPUSpecError(f"name must be a non-empty string, got {self.name!r}", "name")
        if not isinstance(self.source, str):
            raise GPUSpecError(f"source must be a string, got {self.source!r}", "source")
        if not isinstance(self.peak_tflops, Mapping) or not self.peak_tflops:
            raise GPUSpecError(
                f"peak_tflops must be a non-empty mapping of dtype -> TFLOP/s, "
                f"got {self.peak_tflops!r}",
                "peak_tflops",
            )
        peaks: dict[str, float] = {}
        for key, value in self.peak_tflops.items():
            try:
                dtype = canonical_dtype(key)
            except ValueError as e:
                raise GPUSpecError(f"peak_tflops: {e}", "peak_tflops") from e
            if dtype in peaks:
                raise GPUSpecError(f"peak_tflops names {dtype} twice", "peak_tflops")
            try:
                peaks[dtype] = _number(f"peak_tflops[{key!r}]", value, allow_zero=False)
            except GPUSpecError as e:
                raise GPUSpecError(str(e), "peak_tflops") from None
        # canonical order, read-only view: the spec is shared by every caller
        ordered = {d: peaks[d] for d in DTYPES if d in peaks}
        object.__setattr__(self, "peak_tflops", MappingProxyType(ordered))
        for field_name, allow_zero in _NUMERIC_FIELDS.items():
            value = _number(field_name, getattr(self, field_name), allow_zero)
            object.__setattr__(self, field_name, value)

    @property
    def supported_dtypes(self) -> tuple[str, ...]:
        return tuple(self.peak_tflops)

    def supports(self, dtype: str) -> bool:
        return canonical_dtype(dtype) in self.peak_tflops

    def peak_flops_per_s(self, dtype: str) -> float:
        """Dense peak throughput for ``dtype``, FLOP/s (OP/s for integer dtypes).

        Raises:
            UnsupportedDtypeError: the GPU has no compute in that dtype (no silent fallback:
                map weight-only quantization with compute_dtype_for first).
            ValueError: ``dtype`` is not a dtype name at all.
        """
        canonical = canonical_dtype(dtype)
        try:
            return self.peak_tflops[canonical] * _TERA
        except KeyError:
            raise UnsupportedDtypeError(canonical, self.name, self.supported_dtypes) from None

    def network_bandwidth_bytes_per_s(self) -> float:
        """GPU-to-GPU bandwidth, bytes/s, bidirectional: NVLink if present, else PCIe."""
        if self.nvlink_bandwidth_gb_s > 0.0:
            return self.nvlink_bandwidth_gb_s * _GB
        return self.pcie_bandwidth_gb_s * _GB

    def memory_bandwidth_bytes_per_s(self) -> float:
        """Peak memory bandwidth, bytes/s."""
        return self.memory_bandwidth_gb_s * _GB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the spec-file field names (load_gpu_spec_file reads it back)."""
        return {
            "name": self.name,
            "peak_tflops": dict(self.peak_tflops),
            "memory_gb": self.memory_gb,
            "memory_bandwidth_gb_s": self.memory_bandwidth_gb_s,
            "nvlink_bandwidth_gb_s": self.nvlink_bandwidth_gb_s,
            "pcie_bandwidth_gb_s": self.pcie_bandwidth_gb_s,
            "tdp_w": self.tdp_w,
            "die_area_mm2": self.die_area_mm2,
            "process_nm": self.process_nm,
            "embodied_co2_kg": self.embodied_co2_kg,
            "source": self.source,
        }


def _name_key(name: str) -> str:
    """Match key: case-, whitespace-, '-'/'_'-insensitive, without 'NVIDIA'/'Tesla' prefixes."""
    key = re.sub(r"[\s_\-]+", "-", name.strip().lower()).strip("-")
    for prefix in ("nvidia-", "tesla-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _spec_from_row(row: Mapping[str, str], line: int) -> GPUSpec:
    def number(column: str) -> float:
        try:
            return float(row[column])
        except ValueError:
            raise GPUSpecError(
                f"gpus.csv line {line}: {column} is not a number: {row[column]!r}", column
            ) from None

    peaks = {dtype: number(col) for dtype, col in _PEAK_COLUMNS.items() if row[col].strip()}
    die_area_mm2 = number("die_area_mm2")
    process_nm = number("process_nm")
    memory_gb = number("memory_gb")
    return GPUSpec(
        name=row["name"].strip(),
        peak_tflops=peaks,
        memory_gb=memory_gb,
        memory_bandwidth_gb_s=number("memory_bandwidth_gb_s"),
        nvlink_bandwidth_gb_s=number("nvlink_bandwidth_gb_s"),
        pcie_bandwidth_gb_s=number("pcie_bandwidth_gb_s"),
        tdp_w=number("tdp_w"),
        die_area_mm2=die_area_mm2,
        process_nm=process_nm,
        embodied_co2_kg=die_embodied_co2_kg(die_area_mm2, process_nm, memory_gb),
        source=row["source"].strip(),
    )


@functools.lru_cache(maxsize=1)
def _load_table() -> tuple[tuple[GPUSpec, ...], Mapping[str, GPUSpec]]:
    """Parse data/gpus.csv once: the specs in file order and the match-key index."""
    text = resources.files("llmco2_serve.data").joinpath("gpus.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != _CSV_COLUMNS:
        raise RuntimeError(
            f"gpus.csv header {reader.fieldnames} != expected {list(_CSV_COLUMNS)}"
        )
    specs: list[GPUSpec] = []
    index: dict[str, GPUSpec] = {}
    for line, row in enumerate(reader, start=2):
        spec = _spec_from_row(row, line)
        names = [spec.name]
        for column in ("aliases", "nvml_names"):
            names += [n for n in row[column].split("|") if n.strip()]
        for n in names:
            key = _name_key(n)
            other = index.get(key)
            # an ambiguous name would silently pick a GPU: refuse the table instead
            if other is not None and other.name != spec.name:
                raise RuntimeError(f"gpus.csv: {n!r} names both {other.name} and {spec.name}")
            index[key] = spec
        specs.append(spec)
    return tuple(specs), MappingProxyType(index)


def known_gpus() -> list[GPUSpec]:
    """All GPUs of the packaged table, in table order."""
    specs, _ = _load_table()
    return list(specs)


def gpu_spec(name: str) -> GPUSpec:
    """Look a GPU up by canonical name, short alias or NVML device name.

    Matching ignores case, surrounding/inner whitespace, '-' vs '_' vs ' ', and a leading
    'NVIDIA' or 'Tesla'. Examples: "H100-SXM-80GB", "h100", "A100-80GB",
    "NVIDIA H100 80GB HBM3", "Tesla T4", "NVIDIA A100 80GB PCIe".

    Raises:
        UnknownGPUError: no match; the message lists the known GPUs and how to supply a spec.
    """
    specs, index = _load_table()
    if not isinstance(name, str):
        raise TypeError(f"GPU name must be a string, got {name!r}")
    key = _name_key(name)
    spec = index.get(key)
    if spec is not None:
        return spec
    known = tuple(s.name for s in specs)
    close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.6)
    suggestions = tuple(dict.fromkeys(index[c].name for c in close))
    raise UnknownGPUError(name, known, suggestions)


def load_gpu_spec_file(path: str | os.PathLike[str]) -> GPUSpec:
    """Read a user GPU spec from a JSON object with GPUSpec's field names.

    Required: name, peak_tflops (object dtype -> dense TFLOP/s; null = unsupported),
    memory_gb, memory_bandwidth_gb_s, nvlink_bandwidth_gb_s (0 if none),
    pcie_bandwidth_gb_s, tdp_w, die_area_mm2, process_nm. Optional: embodied_co2_kg
    (computed from die area, node and memory when absent), source (defaults to the path).

    Raises:
        GPUSpecError: bad JSON, missing/unknown fields, or a bad value; the message names the
            file and every offending field.
        OSError: the file cannot be read.
    """
    path_str = os.fspath(path)
    with open(path_str, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GPUSpecError(f"{path_str}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise GPUSpecError(f"{path_str}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _SPEC_FILE_REQUIRED if k not in data]
    unknown = sorted(set(data) - set(_SPEC_FILE_REQUIRED) - set(_SPEC_FILE_OPTIONAL))
    problems = []
    if missing:
        problems.append(f"missing field(s): {', '.join(missing)}")
    if unknown:
        problems.append(
            f"unknown field(s): {', '.join(unknown)} (allowed: "
            f"{', '.join(_SPEC_FILE_REQUIRED + _SPEC_FILE_OPTIONAL)})"
        )
    if problems:
        first = (missing or unknown)[0]
        raise GPUSpecError(f"{path_str}: {'; '.join(problems)}", first)
    peaks = data["peak_tflops"]
    if isinstance(peaks, dict):
        peaks = {k: v for k, v in peaks.items() if v is not None}
    try:
        embodied = data.get("embodied_co2_kg")
        if embodied is None:
            embodied = die_embodied_co2_kg(
                _number("die_area_mm2", data["die_area_mm2"], allow_zero=False),
                _number("process_nm", data["process_nm"], allow_zero=False),
                _number("memory_gb", data["memory_gb"], allow_zero=False),
            )
        return GPUSpec(
            name=data["name"],
            peak_tflops=peaks,
            memory_gb=data["memory_gb"],
            memory_bandwidth_gb_s=data["memory_bandwidth_gb_s"],
            nvlink_bandwidth_gb_s=data["nvlink_bandwidth_gb_s"],
            pcie_bandwidth_gb_s=data["pcie_bandwidth_gb_s"],
            tdp_w=data["tdp_w"],
            die_area_mm2=data["die_area_mm2"],
            process_nm=data["process_nm"],
            embodied_co2_kg=embodied,
            source=data.get("source", f"user spec file {path_str}"),
        )
    except GPUSpecError as e:
        raise GPUSpecError(f"{path_str}: {e}", e.field_name) from e


def resolve_gpu(
    name: str | None = None, spec_file: str | os.PathLike[str] | None = None
) -> GPUSpec:
    """The GPU to model: ``spec_file`` if given (it wins over ``name``), else the table row
    matching ``name`` (canonical name, alias or NVML device name).

    Raises:
        ValueError: neither given.
        UnknownGPUError, GPUSpecError: as gpu_spec / load_gpu_spec_file.
    """
    if spec_file is not None:
        return load_gpu_spec_file(spec_file)
    if name is None:
        raise ValueError(
            "resolve_gpu needs a GPU name (canonical, alias or NVML device name) or a spec_file"
        )
    return gpu_spec(name)
