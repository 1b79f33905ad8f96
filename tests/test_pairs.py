"""PairsWriter (background JSONL appender) and the reading side after a crash.

Real components throughout: files, a FIFO nobody reads (a disk that never answers), /dev/full (a
full disk), a child process killed with SIGKILL while it writes, and the ``llmco2`` CLI reading
the result.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from llmco2_serve.cli import packaged_training_data
from llmco2_serve.runtime.pairs import PairsWriter
from llmco2_serve.prediction.records import RecordError, is_cut_off_row, load_records


def _rows(n: int | None = None) -> list[dict]:
    """Real measured records (the packaged H200 data): rows train/eval accept."""
    with open(packaged_training_data(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmco2_serve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _wait(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


# --- writing --------------------------------------------------------------------------------


def test_rows_become_complete_lines_in_order(tmp_path):
    path = tmp_path / "sub" / "pairs.jsonl"  # parent folder created
    w = PairsWriter(str(path))
    rows = _rows(30)
    assert all(w.write(r) for r in rows)
    assert w.close() is True
    assert (w.written, w.dropped, w.failed_reason, w.repaired) == (30, 0, None, False)
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 30
    assert [r.model for r in load_records(path)] == [r["model"] for r in rows]
    assert w.write(rows[0]) is False  # closed


def test_write_never_blocks_the_caller_and_drops_when_the_queue_is_full(tmp_path):
    """A FIFO without a reader blocks open() for ever: the writer thread hangs as on a dead disk,
    the caller's write() must still return at once and drop what does not fit."""
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    w = PairsWriter(str(fifo), max_queue=5)
    rows = _rows(20)
    done = threading.Event()
    results: list[bool] = []

    def caller():
        results.extend(w.write(r) for r in rows)
        done.set()

    threading.Thread(target=caller, daemon=True).start()
    assert done.wait(5.0), "write() blocked on a disk that does not answer"
    # the thread holds at most one row (waiting in open), the queue five more
    assert 5 <= sum(results) <= 6 and w.dropped == 20 - sum(results) and w.written == 0
    # the disk answers: what was accepted arrives, in order, as whole lines
    fd = os.open(fifo, os.O_RDONLY)
    with os.fdopen(fd, "rb") as reader:
        assert w.close(timeout_s=5.0) is True
        lines = reader.read().decode().splitlines()
    assert len(lines) == sum(results) == w.written
    assert [json.loads(x)["prompt_len"] for x in lines] == [r["prompt_len"] for r, ok in zip(rows, results) if ok]


def test_rows_are_written_on_the_writer_thread(tmp_path, monkeypatch):
    import llmco2_serve.runtime.pairs as pairs

    seen: list[str] = []
    real = pairs._write_all
    monkeypatch.setattr(pairs, "_write_all", lambda fd, data: (seen.append(threading.current_thread().name),
                                                               real(fd, data))[1])
    w = PairsWriter(str(tmp_path / "p.jsonl"))
    w.write(_rows(1)[0])
    w.close()
    assert seen == ["llmco2-pairs"]


def test_full_disk_switches_off_with_one_warning(caplog):
    """/dev/full accepts open() and fails every write with ENOSPC."""
    w = PairsWriter("/dev/full")
    with caplog.at_level(logging.WARNING, logger="llmco2_serve.runtime.pairs"):
        for r in _rows(5):
            w.write(r)
        _wait(lambda: w.failed_reason is not None)
        assert w.write(_rows(1)[0]) is False and not w.enabled
        w.close()
    assert "/dev/full" in w.failed_reason and "space" in w.failed_reason.lower()
    assert w.written == 0 and w.dropped == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pairs switched off" in warnings[0].getMessage()


def test_unwritable_path_switches_off(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    w = PairsWriter(str(blocker / "pairs.jsonl"))  # a parent that is a file: no root bypasses that
    w.write(_rows(1)[0])
    _wait(lambda: w.failed_reason is not None)
    assert str(blocker) in w.failed_reason and w.dropped == 1 and w.written == 0
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("path", [None, "", "  "])
def test_empty_path_disables(path):
    w = PairsWriter(path)
    assert w.path is None and not w.enabled
    assert w.write({"a": 1}) is False and w.dropped == 0
    assert w.close() is True
    assert w._thread is None  # no thread for a disabled writer


def test_unserialisable_row_is_dropped_alone(tmp_path):
    circular: dict = {}
    circular["self"] = circular
    path = tmp_path / "p.jsonl"
    w = PairsWriter(str(path))
    w.write(circular)
    w.write(_rows(1)[0])
    w.close()
    assert (w.written, w.dropped, w.failed_reason) == (1, 1, None)
    assert len(load_records(path)) == 1


def test_close_drains_what_is_queued(tmp_path):
    path = tmp_path / "p.jsonl"
    w = PairsWriter(str(path), max_queue=100000)
    rows = _rows()
    for _ in range(10):
        for r in rows:
            assert w.write(r)
    assert w.close(timeout_s=30.0) is True
    assert w.written == 10 * len(rows) == path.read_text().count("\n")


# --- repair on open -------------------------------------------------------------------------


def test_partial_last_line_is_ended_before_appending(tmp_path, caplog):
    rows = _rows(4)
    path = tmp_path / "p.jsonl"
    full = json.dumps(rows[0]) + "\n" + json.dumps(rows[1])
    path.write_text(full[:-25])  # the second row cut off mid-line, no newline
    w = PairsWriter(str(path))
    with caplog.at_level(logging.WARNING, logger="llmco2_serve.runtime.pairs"):
        w.write(rows[2])
        w.write(rows[3])
        w.close()
    assert w.repaired and w.written == 2 and "partial line" in caplog.text
    lines = path.read_text().split("\n")
    assert lines[1] == json.dumps(rows[1])[:-25] and lines[-1] == ""  # the remnant kept, on its own line
    warnings: list[str] = []
    got = load_records(path, warn=warnings.append)
    assert [r.prompt_len for r in got] == [rows[i]["prompt_len"] for i in (0, 2, 3)]
    assert len(warnings) == 1 and "skipped 1 row(s) cut off" in warnings[0] and "line(s) 2" in warnings[0]


def test_complete_file_is_not_touched(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n")
    w = PairsWriter(str(path))
    w.write(_rows(2)[1])
    w.close()
    assert not w.repaired and path.read_text().count("\n") == 2 and "\n\n" not in path.read_text()


# --- a real crash, then the CLI -------------------------------------------------------------

_CHILD = r"""
import json, sys, time
from llmco2_serve.cli import packaged_training_data
from llmco2_serve.runtime.pairs import PairsWriter
rows = [json.loads(l) for l in open(packaged_training_data()) if l.strip()]
w = PairsWriter(sys.argv[1], max_queue=64)
i = 0
while True:
    if w.write(rows[i % len(rows)]):
        i += 1
    else:
        time.sleep(0.0005)
"""


@pytest.mark.slow
def test_sigkill_mid_stream_then_append_then_cli_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)])
    try:
        _wait(lambda: path.exists() and path.stat().st_size > 200_000, timeout_s=60)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    killed_size = path.stat().st_size
    # SIGKILL cannot split one os.write of a line: whatever is there is whole lines
    assert path.read_bytes().endswith(b"\n")
    n_killed = len(load_records(path))
    assert n_killed > 100

    # ...but a power cut can: cut the last row mid-line, as the issue saw it
    os.truncate(path, killed_size - 40)
    w = PairsWriter(str(path))
    for r in _rows(3):
        w.write(r)
    assert w.close() and w.repaired and w.written == 3

    records = load_records(path, warn=lambda m: None)
    assert len(records) == n_killed - 1 + 3  # the cut row lost, nothing else
    ev = _cli("eval", "--data", str(path), "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["n"] == sum(r.request_energy_j > 0 for r in records)  # eval leaves out 0 J rows
    assert "skipped 1 row(s) cut off" in ev.stderr and f":{n_killed}" not in ev.stderr
    assert f"line(s) {n_killed}" in ev.stderr

    tr = _cli("train", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "w.npz"))
    assert tr.returncode == 0, tr.stderr
    assert "skipped 1 row(s) cut off" in tr.stderr and f"{n_killed - 1 + 3} records" in tr.stdout

    # a malformed line in the middle is still an error naming its line (exit 2), not skipped
    lines = path.read_text().split("\n")
    lines.insert(5, '{"model": "x", oops}')
    path.write_text("\n".join(lines))
    bad = _cli("eval", "--data", str(path))
    assert bad.returncode == 2 and f"{path}:6: not valid JSON" in bad.stderr


# --- the reading side on its own ------------------------------------------------------------


def test_final_cut_off_line_is_skipped_with_a_count_but_garbage_is_not(tmp_path):
    rows = _rows(3)
    good = "".join(json.dumps(r) + "\n" for r in rows)
    p = tmp_path / "r.jsonl"
    p.write_text(good + json.dumps(rows[0])[:57])  # no newline: the writer died mid-row
    warnings: list[str] = []
    assert len(load_records(p, warn=warnings.append)) == 3
    assert warnings == [f"{p}: skipped 1 row(s) cut off mid-line (a writer crashed), line(s) 4"]
    p.write_text(good + "{not json")  # invalid, not a cut-off row: still an error
    with pytest.raises(RecordError, match=r"r.jsonl:4: not valid JSON"):
        load_records(p)
    p.write_text(good + '{"a": 1}}')
    with pytest.raises(RecordError, match=r"r.jsonl:4: not valid JSON"):
        load_records(p)
    p.write_text(json.dumps(rows[0])[:30])  # nothing but a cut-off row: no records, and it says so
    with pytest.raises(RecordError, match="no records .1 cut-off"):
        load_records(p)


def test_default_warning_goes_to_the_log(tmp_path, caplog):
    rows = _rows(2)
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:80])
    with caplog.at_level(logging.WARNING, logger="llmco2_serve.prediction.records"):
        assert len(load_records(p)) == 1
    assert "skipped 1 row(s) cut off" in caplog.text


def test_cut_inside_a_multibyte_character_is_a_cut_off_row(tmp_path):
    row = dict(_rows(1)[0], model="modèle-ü")
    p = tmp_path / "r.jsonl"
    data = json.dumps(_rows(1)[0]).encode() + b"\n" + json.dumps(row, ensure_ascii=False).encode("utf-8")
    cut = data.index("è".encode()) + 1  # between the two bytes of è
    p.write_bytes(data[:cut])
    warnings: list[str] = []
    assert len(load_records(p, warn=warnings.append)) == 1 and len(warnings) == 1


def test_every_prefix_of_a_real_row_is_a_cut_off_row():
    text = json.dumps(dict(_rows(1)[0], note='a "quoted" \\ value', xs=[1, -2.5e-3, True, None, {"k": []}]))
    assert not is_cut_off_row(text)
    assert all(is_cut_off_row(text[:i]) for i in range(1, len(text)))


@pytest.mark.parametrize("line", ["{not json", '{"a": 1}}', '{"a": 1} x', '["a"', '{"a" 1, "b"', '{"a": xyz',
                                  "{,", '{"a": 1,,', '{"a": [1 2', "plain text"])
def test_malformed_lines_are_not_cut_off_rows(line):
    assert not is_cut_off_row(line)


# --- what the service writes ------------------------------------------------------------------


def test_pair_carries_the_grid_intensity_at_its_final_value_not_the_static_setting(tmp_path):
    """A time-varying LLMCO2_CARBON_INTENSITY (a recorded series with one row per second): the pair
    says the intensity of the second its final value came in, looked up here in the CSV itself,
    which differs from the static setting and from the one at admission."""
    from llmco2_serve.devtools.tinymodel import tiny_config
    from llmco2_serve.runtime.service import EnergyService, ModelInfo
    from llmco2_serve.runtime.settings import load_settings

    t0 = int(time.time()) - 5
    values = {t0 + i: 100.0 + 7.0 * (i % 40) for i in range(120)}  # never 481 (the static setting)
    csv = tmp_path / "ci.csv"
    csv.write_text("timestamp,g_per_kwh\n" + "".join(f"{t},{v}\n" for t, v in values.items()))
    settings = load_settings({"LLMCO2_PAIRS_PATH": str(tmp_path / "pairs.jsonl"), "LLMCO2_GPU": "H100",
                              "LLMCO2_CARBON_INTENSITY": f"file:{csv}", "LLMCO2_CALIBRATION": "0"})
    model = ModelInfo(hf_config={**tiny_config("llama"), "torch_dtype": "float32"}, model_name="tiny",
                      dtype="float32", max_model_len=512, max_num_seqs=8)
    svc = EnergyService(settings, model, gpu_names=[], prediction_table="off")
    try:
        # a measuring engine (its books come from start-up on), then the request
        svc.on_engine_finals(json.dumps({"finals": [], "books": {"engine": 0, "source": "nvml", "devices": []}}))
        p = svc.on_request("r", prompt_len=20, max_tokens=50, running_requests=0)
        svc.on_finished("r", 30, None)
        time.sleep(1.1)  # the final value comes later, in another second of the series
        svc.on_engine_finals(json.dumps({"finals": [["r", 2.0, 6.0, 0.1, 0.0, "nvml", 31, 0, False, 1.0, 0, 30]]}))
    finally:
        svc.close()
    row = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    fin = row["finished_unix_s"]
    # the CSV's row for that second (finished_unix_s is rounded to the ms: either side of a boundary)
    truth = {values[int(fin)], values[int(fin - 0.0006)]}
    assert row["carbon_intensity_g_per_kwh"] in truth
    assert row["carbon_intensity_source"] == "file"
    assert row["carbon_intensity_g_per_kwh"] != settings.intensity_g_per_kwh
    # the prediction was priced at admission, a different second of the same series
    assert p.carbon_intensity_g_per_kwh in values.values()
    assert row["carbon_intensity_g_per_kwh"] != p.carbon_intensity_g_per_kwh
    assert row["pue"] == settings.pue
