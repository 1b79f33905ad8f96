"""Measured energy records (the JSON-lines format of ``shared/README.md``).

One object per line: ``model``, ``arch`` (HF config fields), ``dtype``, ``gpu``, ``n_gpu``,
``batch``, ``prompt_len``, ``gen_tokens``, phase energies/times. A malformed row raises
:class:`RecordError` naming the file and line; nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

REQUIRED = ("model", "arch", "dtype", "gpu", "n_gpu", "batch", "prompt_len", "gen_tokens", "request_energy_j")


class RecordError(ValueError):
    pass


@dataclass(frozen=True)
class EnergyRecord:
    model: str
    arch: dict
    dtype: str
    gpu: str
    n_gpu: int
    batch: int
    prompt_len: int
    gen_tokens: int
    request_energy_j: float
    prefill_energy_j: float | None
    decode_energy_j: float | None
    request_time_s: float | None
    engine: str
    source: str
    line: int

    @property
    def attention(self) -> str:
        """Which attention kernel ran: HF 'eager' is matmul-softmax-matmul, sdpa/flash are fused."""
        return "unfused" if self.arch.get("attn_impl") == "eager" else "fused"

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "line"}
        return d


def _number(row: dict, key: str, where: str, *, integer: bool = False, optional: bool = False, minimum=None):
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise RecordError(f"{where}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise RecordError(f"{where}: field {key!r} must be an integer, got {value!r}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise RecordError(f"{where}: field {key!r} must be >= {minimum}, got {value!r}")
    return value


def parse_record(row: Any, where: str, line: int = 0) -> EnergyRecord:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object")
    for key in REQUIRED:
        if key not in row:
            raise RecordError(f"{where}: missing field {key!r}")
    if not isinstance(row["arch"], dict):
        raise RecordError(f"{where}: field 'arch' must be an object of HF config fields")
    return EnergyRecord(
        model=str(row["model"]),
        arch=row["arch"],
        dtype=str(row["dtype"]),
        gpu=str(row["gpu"]),
        n_gpu=_number(row, "n_gpu", where, integer=True, minimum=1),
        batch=_number(row, "batch", where, integer=True, minimum=1),
        prompt_len=_number(row, "prompt_len", where, integer=True, minimum=1),
        gen_tokens=_number(row, "gen_tokens", where, integer=True, minimum=1),
        request_energy_j=_number(row, "request_energy_j", where),
        prefill_energy_j=_number(row, "prefill_energy_j", where, optional=True),
        decode_energy_j=_number(row, "decode_energy_j", where, optional=True),
        request_time_s=_number(row, "request_time_s", where, optional=True),
        engine=str(row.get("engine", "unknown")),
        source=str(row.get("source", "")),
        line=line,
    )


def load_records(path: str | os.PathLike) -> list[EnergyRecord]:
    path = os.fspath(path)
    out: list[EnergyRecord] = []
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg})") from e
            out.append(parse_record(row, where, i))
    if not out:
        raise RecordError(f"{path}: no records")
    return out


def write_records(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
