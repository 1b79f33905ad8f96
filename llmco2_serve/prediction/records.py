"""Measured energy records (the JSON-lines format of ``shared/README.md``).

One object per line: ``model``, ``arch`` (HF config fields), ``dtype``, ``gpu``, ``n_gpu``,
``batch``, ``prompt_len``, ``gen_tokens``, phase energies/times; optional ``family`` (the
leave-one-family-out group) and ``aggregated: "steady-state"`` (a row that summarises continuous
batching: average batch and output length, request energy only). A malformed row raises
:class:`RecordError` naming the file and line; nothing is dropped silently (a row cut off by a
crashed writer is skipped with a counted warning, :func:`load_records`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Iterable

logger = logging.getLogger(__name__)

REQUIRED = ("model", "arch", "dtype", "gpu", "n_gpu", "batch", "prompt_len", "gen_tokens", "request_energy_j")


_OPTIONAL_TAGS = ("family", "aggregated")
AGGREGATED_KINDS = ("steady-state",)


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
    # Leave-one-family-out group (e.g. the config's model_type); None: the model label is its own family.
    family: str | None = None
    # "steady-state": one row summarises continuous-batching serving (average batch and output
    # length, energy per request; no phase split). None: one measured request.
    aggregated: str | None = None

    @property
    def group(self) -> str:
        """The family a leave-one-family-out split holds out together."""
        return self.family or self.model

    @property
    def attention(self) -> str:
        """Which attention kernel ran: HF 'eager' is matmul-softmax-matmul, sdpa/flash are fused."""
        return "unfused" if self.arch.get("attn_impl") == "eager" else "fused"

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "line"}
        for k in _OPTIONAL_TAGS:  # absent tags stay absent: hashes of older record files do not move
            if d[k] is None:
                del d[k]
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
    for key in _OPTIONAL_TAGS:
        if row.get(key) is not None and (not isinstance(row[key], str) or not row[key]):
            raise RecordError(f"{where}: field {key!r} must be a non-empty string, got {row[key]!r}")
    if row.get("aggregated") is not None and row["aggregated"] not in AGGREGATED_KINDS:
        raise RecordError(f"{where}: field 'aggregated' must be one of {AGGREGATED_KINDS}, got {row['aggregated']!r}")
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
        family=row.get("family"),
        aggregated=row.get("aggregated"),
    )


def load_records(path: str | os.PathLike, *, warn: Callable[[str], None] | None = None) -> list[EnergyRecord]:
    """Every record in ``path``. A malformed line raises :class:`RecordError` naming its line.

    One kind of bad line is skipped instead, each counted in one warning (``warn``, default the
    module logger): a row *cut off* by a crash, i.e. a strict prefix of a well-formed JSON object
    (see :func:`is_cut_off_row`). That is the file's final line when the writer died mid-row, or a
    line a later :class:`~llmco2_serve.runtime.pairs.PairsWriter` ended with a newline before appending
    (its repair). Any other invalid line, anywhere, is an error.
    """
    path = os.fspath(path)
    out: list[EnergyRecord] = []
    skipped: list[int] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            where = f"{path}:{i}"
            final_unterminated = not raw.endswith(b"\n")  # only the last line can lack its newline
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if final_unterminated:  # cut inside a multi-byte character
                    text = raw[: e.start].decode("utf-8", errors="replace")
                else:
                    raise RecordError(f"{where}: not valid UTF-8 ({e.reason})") from e
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                if is_cut_off_row(text):
                    skipped.append(i)
                    continue
                raise RecordError(f"{where}: not valid JSON ({e.msg})") from e
            out.append(parse_record(row, where, i))
    if skipped:
        lines = ", ".join(str(n) for n in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        (warn or logger.warning)(
            f"{path}: skipped {len(skipped)} row(s) cut off mid-line (a writer crashed), line(s) {lines}")
    if not out:
        raise RecordError(f"{path}: no records" + (f" ({len(skipped)} cut-off row(s) skipped)" if skipped else ""))
    return out


_OPEN_TAIL = re.compile(r"""
    \s*(?:,\s*)?                          # the comma before the next member, if it was written
    (?:"(?:[^"\\]|\\.)*\\?               # a key or a string value, possibly unterminated
       (?:"\s*(?::\s*(?:{value})?)?)?     # its end, the colon, the start of the value
     | {value}                             # (in an array) the start of a value
    )?\s*$""".replace("{value}", r"""(?:"(?:[^"\\]|\\.)*\\?"?|-?[0-9]*\.?[0-9]*(?:[eE][+-]?[0-9]*)?|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?)"""),
    re.VERBOSE)


def is_cut_off_row(text: str) -> bool:
    """True when ``text`` (one line) is a strict prefix of a JSON object: what is left of a row
    whose writer died mid-line. Its complete members must parse and what follows must be the
    start of a member, so a malformed line (``{not json``, ``{"a": 1}}``) is not mistaken for one."""
    t = text.rstrip("\r\n")
    if not t.lstrip().startswith("{"):
        return False
    stack: list[str] = []
    cuts: list[tuple[int, tuple[str, ...]]] = []  # positions where t[:pos] + closers is complete
    in_string = escape = False
    for pos, ch in enumerate(t):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            cuts.append((pos + 1, tuple(stack)))
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return False  # a closing bracket that does not match: malformed, not cut off
            if not stack:
                return False  # the object closed, so the line is complete (and invalid elsewhere)
            cuts.append((pos + 1, tuple(stack)))
        elif ch == "," and stack:
            cuts.append((pos, tuple(stack)))
    if not stack:
        return False
    pos, open_ = cuts[-1]
    tail = t[pos:]
    if not _OPEN_TAIL.match(tail) or (t[pos - 1] in "{[" and tail.lstrip().startswith(",")):
        return False
    try:
        doc = json.loads(t[:pos] + "".join(reversed(open_)))
    except json.JSONDecodeError:
        return False
    return isinstance(doc, dict)


def write_records(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
