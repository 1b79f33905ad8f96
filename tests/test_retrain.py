"""`llmco2 retrain` (fine-tune on a deployment's pairs, publish only when held-out error is not worse)
and the plugin's hot reload of the weights (EnergyService.reload_weights / the weights watcher).

The deployment here is not the predictor: its true energy is 2x the packaged GNN's prefill share x1.3,
with a batch power law (batch/8)^0.3 the GNN does not have, plus 5% log-normal noise. The published
weights are then judged on fresh requests drawn from that truth, not on retrain's own report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import threading
import time
from importlib import resources

import numpy as np
import pytest

from llmco2_serve.cli import main
from llmco2_serve.prediction.predictor import Predictor, load_weights
from llmco2_serve.prediction.retrain import is_held_out, retrain
from llmco2_serve.runtime.service import EnergyService, ModelInfo
from llmco2_serve.runtime.settings import Settings
from llmco2_serve.devtools.tinymodel import tiny_config

EPOCHS = 100


def _arch_8b() -> dict:
    path = resources.files("llmco2_serve.data") / "h200-hf-eager.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["model"] == "llama3.1-8b":
            return r["arch"]
    raise AssertionError("llama3.1-8b not in the packaged records")


ARCH = _arch_8b()


def _base_predictor(weights_path: str | None = None) -> Predictor:
    return Predictor.from_config(ARCH, gpu="H100", dtype="bfloat16",
                                 **({"weights_path": weights_path} if weights_path else {"profile": "vllm"}))


def _truth(pred, b, rng):
    """The deployment's energy share of one request (J): not the GNN (see the module docstring)."""
    k = 2.0 * (b / 8) ** 0.3 * math.exp(rng.gauss(0, 0.05))
    return pred.prefill_energy_j / b * k * 1.3, pred.decode_energy_j / b * k


def _draw(rng):
    return rng.choice([1, 2, 4, 8, 16, 32, 64]), rng.randint(16, 2000), rng.randint(8, 500)


def _pair_row(i, b, L, g, pre, dec, source="nvml"):
    # the plugin's row (service.py _keep_pair): a share of a batch of mean size `batch`
    return {"model": "llama3.1-8b", "arch": ARCH, "dtype": "bfloat16", "gpu": "H100", "n_gpu": 1, "batch": b,
            "mean_batch": float(b), "prompt_len": L, "gen_tokens": g, "prefill_energy_j": pre,
            "decode_energy_j": dec, "request_energy_j": pre + dec, "final": True, "share_of_batch": True,
            "engine": "vllm-continuous-batching", "source": "llmco2-serve-plugin", "request_id": f"cmpl-{i}",
            "measured_source": source}


def _write_pairs(path, n, seed=0, source="nvml"):
    p = _base_predictor()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        b, L, g = _draw(rng)
        pre, dec = _truth(p.predict(batch=b, prompt_len=L, gen_tokens=g), b, rng)
        rows.append(_pair_row(i, b, L, g, pre, dec, source))
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    pairs = tmp / "pairs.jsonl"
    rows = _write_pairs(pairs, 80)
    report = retrain(str(pairs), str(tmp / "out"), profile="vllm", epochs=EPOCHS)
    return {"tmp": tmp, "pairs": pairs, "rows": rows, "report": report, "out": tmp / "out"}


def test_retrain_publishes_better_weights_and_an_atomic_pointer(published):
    r = published["report"]
    assert r["status"] == "published", r
    held = [row for row in published["rows"] if is_held_out(row, 0.2, 0)]
    assert r["pairs_used"]["held_out"] == len(held) >= 5
    assert r["pairs_used"]["train"] + r["pairs_used"]["held_out"] == len(published["rows"])
    assert r["held_out_after"]["mape"] < r["held_out_before"]["mape"]
    assert not r["test_only_fake_pairs"]
    cur = published["out"] / "current.npz"
    assert cur.read_bytes() == open(r["weights"], "rb").read()
    meta = json.loads((published["out"] / "current.json").read_text())
    assert meta["weights_sha256"] == r["weights_sha256"]
    assert meta["retrain"]["held_out_after"]["mape"] == r["held_out_after"]["mape"]
    assert not [p for p in os.listdir(published["out"]) if p.endswith(".tmp")]  # no temporaries left
    # Judged independently: fresh requests from the deployment's truth, predicted by the served API.
    old, new = _base_predictor(), _base_predictor(str(cur))
    assert new.weights.label != old.weights.label and "retrained" in new.weights.label
    rng = random.Random(12345)
    err_old, err_new = [], []
    for _ in range(60):
        b, L, g = _draw(rng)
        po, pn = old.predict(batch=b, prompt_len=L, gen_tokens=g), new.predict(batch=b, prompt_len=L, gen_tokens=g)
        pre, dec = _truth(po, b, rng)
        err_old.append(abs(po.energy_j / b / (pre + dec) - 1))
        err_new.append(abs(pn.energy_j / b / (pre + dec) - 1))
    assert np.median(err_new) < 0.5 * np.median(err_old), (np.median(err_new), np.median(err_old))


def test_held_out_pairs_never_train(published, tmp_path):
    """Changing only the held-out rows' measurements changes the verdict's numbers, not the weights."""
    rows = [dict(r) for r in published["rows"]]
    for r in rows:
        if is_held_out(r, 0.2, 0):
            for k in ("prefill_energy_j", "decode_energy_j", "request_energy_j"):
                r[k] *= 1.7
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = retrain(str(pairs), str(tmp_path / "out"), profile="vllm", epochs=EPOCHS)
    assert rep["held_out_before"]["mape"] != published["report"]["held_out_before"]["mape"]
    if rep["status"] == "published":
        a = np.load(rep["weights"])
        b = np.load(published["report"]["weights"])
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    else:  # the same weights judged on other held-out values may be refused; then nothing is written
        assert not (tmp_path / "out").exists()


def test_worse_weights_are_refused_and_nothing_is_published(tmp_path, capsys):
    """Held-out requests measured exactly at the served GNN's value (MAPE ~0), training requests at 3x
    it: fine-tuning can only make the held-out error worse, so it must be refused."""
    p = _base_predictor()
    rng = random.Random(7)
    lines = []
    for i in range(60):
        b, L, g = _draw(rng)
        pr = p.predict(batch=b, prompt_len=L, gen_tokens=g)
        row = _pair_row(i, b, L, g, pr.prefill_energy_j / b, pr.decode_energy_j / b)
        if not is_held_out(row, 0.2, 0):
            row = _pair_row(i, b, L, g, 3 * pr.prefill_energy_j / b, 3 * pr.decode_energy_j / b)
        lines.append(json.dumps(row) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(lines))
    out = tmp_path / "out"
    rc = main(["retrain", "--pairs", str(pairs), "--out", str(out), "--epochs", "60"])
    text = capsys.readouterr().out
    assert rc == 0
    assert text.startswith("refused: held-out MAPE before "), text
    before, after = (float(x) for x in text.split("before ")[1].split(" after "))
    assert after > before
    assert not out.exists()


def test_fake_counter_pairs_only_with_allow_fake(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    _write_pairs(pairs, 40, source="fake")
    assert main(["retrain", "--pairs", str(pairs), "--out", str(tmp_path / "o"), "--epochs", "5"]) == 2
    assert "no usable final pairs" in capsys.readouterr().err
    assert main(["retrain", "--pairs", str(pairs), "--out", str(tmp_path / "o"), "--epochs", "5", "--allow-fake",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["test_only_fake_pairs"] is True and rep["pairs_used"]["by_measured_source"] == {"fake": 40}
    if rep["status"] == "published":
        assert json.loads((tmp_path / "o" / "current.json").read_text())["retrain"]["test_only_fake_pairs"] is True


# ---------------------------------------------------------------------------------------------- reload

def _bootstrap(folder) -> str:
    """DIR/current.npz as an operator starts it: a copy of the packaged vllm profile's weights."""
    os.makedirs(folder, exist_ok=True)
    base = resources.files("llmco2_serve.data")
    for ext in (".npz", ".json"):
        with resources.as_file(base / ("gnn_weights_vllm" + ext)) as src:
            shutil.copyfile(src, os.path.join(folder, "current" + ext))
    return os.path.join(folder, "current.npz")


def _replace_with(src_npz: str, dst_npz: str) -> None:
    """What `llmco2 retrain` does: metadata first, then the weights, each by os.replace."""
    for ext in (".json", ".npz"):
        tmp = os.path.splitext(dst_npz)[0] + ext + ".tmp"
        shutil.copyfile(os.path.splitext(src_npz)[0] + ext, tmp)
        os.replace(tmp, os.path.splitext(dst_npz)[0] + ext)


def _service(tmp_path, weights, interval=0.0):
    settings = Settings(weights_path=weights, pairs_path=str(tmp_path / "pairs.jsonl"), reload_interval_s=interval)
    model = ModelInfo(hf_config=tiny_config("llama"), model_name="tiny-llama", dtype="float32",
                      max_model_len=512, max_num_seqs=32)
    return EnergyService(settings, model, gpu_names=[], prediction_table="now")


def test_reload_swaps_predictor_table_and_calibrator(published, tmp_path):
    cur = _bootstrap(tmp_path / "w")
    svc = _service(tmp_path, cur)
    try:
        old_label = svc.predictor_label
        old_table, old_cal = svc.table, svc.calibrator
        before = svc.on_request("a", 100, 50, 3)
        assert svc.check_weights_file() is None  # unchanged: nothing to do
        _replace_with(published["report"]["weights"], cur)
        assert svc.check_weights_file() is True
        assert svc.predictor_label != old_label and "retrained" in svc.predictor_label
        assert svc.table is not None and svc.table is not old_table
        assert svc.calibrator is not old_cal and svc.calibrator.key.predictor == svc.predictor_label
        after = svc.on_request("b", 100, 50, 3)
        assert after.energy_j != pytest.approx(before.energy_j, rel=1e-3)
        # the table serves the new weights: it agrees with the new GNN itself
        direct = svc.predictor.predict_many(np.array([100]), np.array([after.gen_tokens]), batch=after.batch)
        assert after.uncalibrated_prefill_energy_j + after.uncalibrated_decode_energy_j == pytest.approx(
            float(direct.energy_j[0]) / after.batch, rel=0.02)
        assert svc.on_finished("b", 40, None)["llmco2.predictor"] == svc.predictor_label
        assert svc.weights_reloads == 1 and svc.weights_reload_failures == 0
        assert svc.weights_reload_pause_s < 0.01
    finally:
        svc.close()


def test_corrupt_file_keeps_old_weights_logs_once_and_counts(tmp_path, caplog):
    cur = _bootstrap(tmp_path / "w")
    svc = _service(tmp_path, cur)
    try:
        label = svc.predictor_label
        expected = svc.on_request("a", 64, 32, 0).energy_j
        tmp = cur + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 this is not a weights file")
        os.replace(tmp, cur)
        with caplog.at_level(logging.WARNING, logger="llmco2_serve.runtime.service"):
            assert svc.check_weights_file() is False
            assert svc.check_weights_file() is None  # the same broken file is not retried
            svc.reload_weights(cur)  # an explicit retry fails the same way, not logged again
        assert svc.predictor_label == label and svc.weights_reload_failures == 2
        assert sum("cannot reload GNN weights" in r.message for r in caplog.records) == 1
        assert svc.on_request("b", 64, 32, 0).energy_j == pytest.approx(expected)
        # Weights of the wrong layout (a truncated array set) are refused the same way.
        np.savez(tmp + ".npz", **{"lin2.bias": np.zeros(2)})
        shutil.copyfile(os.path.splitext(cur)[0] + ".json", tmp + ".json")
        assert svc.reload_weights(tmp + ".npz") is False and svc.predictor_label == label
    finally:
        svc.close()


def test_metadata_ahead_of_weights_is_retried_not_taken(published, tmp_path):
    cur = _bootstrap(tmp_path / "w")
    svc = _service(tmp_path, cur)
    try:
        label = svc.predictor_label
        new_npz = published["report"]["weights"]
        shutil.copyfile(os.path.splitext(new_npz)[0] + ".json", os.path.splitext(cur)[0] + ".json")
        os.utime(cur)  # the watcher notices something, but the npz is still the old one
        assert svc.check_weights_file() is False and svc.predictor_label == label
        shutil.copyfile(new_npz, cur + ".tmp")
        os.replace(cur + ".tmp", cur)
        assert svc.check_weights_file() is True and "retrained" in svc.predictor_label
    finally:
        svc.close()


def test_requests_predicted_during_reloads_never_fail(published, tmp_path):
    cur = _bootstrap(tmp_path / "w")
    alt = _bootstrap(tmp_path / "alt")  # the packaged weights again, to flip back and forth
    svc = _service(tmp_path, cur)
    errors, results, stop = [], [], threading.Event()

    def client(k):
        i = 0
        while not stop.is_set():
            rid = f"{k}-{i}"
            try:
                p = svc.on_request(rid, 1 + (i * 37) % 400, 1 + (i * 13) % 100, i % 20)
                attrs = svc.on_finished(rid, 10, None)
                results.append((p.energy_j, attrs["llmco2.predictor"]))
            except Exception as e:  # noqa: BLE001 - the test counts them
                errors.append(repr(e))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        labels = set()
        for n in range(4):
            _replace_with(published["report"]["weights"] if n % 2 == 0 else alt, cur)
            time.sleep(0.01)  # os.stat's mtime resolution: make the change visible
            assert svc.check_weights_file() is True
            labels.add(svc.predictor_label)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        svc.close()
    assert not errors, errors[:3]
    assert len(results) > 100
    assert all(math.isfinite(e) and e > 0 for e, _ in results)
    assert len(labels) == 2 and {lab for _, lab in results} >= labels


def test_watcher_thread_picks_up_a_published_file(published, tmp_path):
    cur = _bootstrap(tmp_path / "w")
    svc = _service(tmp_path, cur, interval=0.1)
    try:
        label = svc.predictor_label
        _replace_with(published["report"]["weights"], cur)
        deadline = time.monotonic() + 10
        while svc.weights_reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.weights_reloads == 1 and svc.predictor_label != label
    finally:
        svc.close()


def test_scheduled_retrain_publishes_and_the_service_reloads(published, tmp_path):
    """LLMCO2_RETRAIN_INTERVAL_S: `llmco2 retrain` runs in a niced subprocess next to the service,
    publishes into LLMCO2_WEIGHTS's folder, and the service switches to the result."""
    cur = _bootstrap(tmp_path / "w")
    pairs = tmp_path / "pairs.jsonl"
    shutil.copyfile(published["pairs"], pairs)
    settings = Settings(weights_path=cur, pairs_path=str(pairs), reload_interval_s=0, retrain_interval_s=0.2)
    model = ModelInfo(hf_config=tiny_config("llama"), model_name="tiny-llama", dtype="float32",
                      max_model_len=512, max_num_seqs=32)
    svc = EnergyService(settings, model, gpu_names=[], prediction_table="off")
    try:
        label = svc.predictor_label
        deadline = time.monotonic() + 240
        while svc.weights_reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.weights_reloads >= 1, svc.weights_reload_error
        assert svc.predictor_label != label and "retrained" in svc.predictor_label
        published_files = [p for p in os.listdir(tmp_path / "w") if p.startswith("gnn_weights-")]
        assert published_files
    finally:
        svc.close()


def test_reload_and_retrain_settings_are_validated():
    from llmco2_serve.runtime.settings import SettingsError, load_settings

    s = load_settings({"LLMCO2_WEIGHTS": "/w/current.npz", "LLMCO2_RELOAD_INTERVAL_S": "5",
                       "LLMCO2_RETRAIN_INTERVAL_S": "3600", "LLMCO2_PAIRS_INCLUDE_FAKE": "1"})
    assert (s.reload_interval_s, s.retrain_interval_s, s.pairs_include_fake) == (5.0, 3600.0, True)
    d = load_settings({})
    assert (d.reload_interval_s, d.retrain_interval_s, d.pairs_include_fake) == (30.0, 0.0, False)
    for var, bad in (("LLMCO2_RELOAD_INTERVAL_S", "-1"), ("LLMCO2_RETRAIN_INTERVAL_S", "soon"),
                     ("LLMCO2_PAIRS_INCLUDE_FAKE", "maybe")):
        with pytest.raises(SettingsError) as e:
            load_settings({var: bad})
        assert e.value.variable == var


def test_started_between_metadata_and_weights_reloads_once_the_weights_land(published, tmp_path):
    """A server started (or a publisher killed) between current.json and current.npz being replaced."""
    cur = _bootstrap(tmp_path / "w")
    new_npz = published["report"]["weights"]
    shutil.copyfile(os.path.splitext(new_npz)[0] + ".json", os.path.splitext(cur)[0] + ".json")
    svc = _service(tmp_path, cur)
    try:
        assert svc.check_weights_file() is False  # the npz is not yet the one the metadata names
        assert svc.check_weights_file() is False  # ... and it keeps looking
        shutil.copyfile(new_npz, cur + ".tmp")
        os.replace(cur + ".tmp", cur)
        assert svc.check_weights_file() is True
        assert svc.predictor.weights.metadata["weights_sha256"] == published["report"]["weights_sha256"]
    finally:
        svc.close()


@pytest.mark.parametrize("include_fake", [False, True])
def test_fake_counter_pairs_are_written_only_with_the_test_only_setting(tmp_path, include_fake):
    settings = Settings(pairs_path=str(tmp_path / "pairs.jsonl"), pairs_include_fake=include_fake,
                        calibration=False)
    model = ModelInfo(hf_config=tiny_config("llama"), model_name="tiny-llama", dtype="float32",
                      max_model_len=512, max_num_seqs=32)
    svc = EnergyService(settings, model, gpu_names=[], prediction_table="off")
    try:
        for rid, source in (("r-nvml", "nvml"), ("r-fake", "fake"), ("r-est", "cpu-estimate-codecarbon")):
            svc.on_request(rid, 20, 8, 0)
            svc.on_finished(rid, 8, {"source": source, "prefill_energy_j": 1.0, "decode_energy_j": 2.0,
                                     "energy_j": 3.0, "uncertainty_j": 0.1, "final": False})
            svc.on_engine_finals(json.dumps({"finals": [[rid, 1.5, 2.5, 0.1, 0.0, source, 9, 0, False, 1.0, 0, 8]]}))
    finally:
        svc.close()
    rows = [json.loads(x) for x in open(tmp_path / "pairs.jsonl")]
    assert {r["request_id"]: r["measured_source"] for r in rows} == (
        {"r-nvml": "nvml", "r-fake": "fake"} if include_fake else {"r-nvml": "nvml"})
    assert all(r["request_energy_j"] == pytest.approx(4.0) for r in rows)
