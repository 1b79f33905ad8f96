"""The plugin's series on vLLM's own /metrics, scraped by a real Prometheus server (issue 8 §1, §2).

One vLLM server (tiny model, TEST-ONLY fake energy counter, pairs file on) and one Prometheus
(Debian package ``prometheus``) scraping its ``/metrics`` every second. After a small load the
series are read back with PromQL over Prometheus's HTTP API and compared with what the server
reported elsewhere, never with the exporter's own arithmetic:

* predicted energy and CO2: the sum of the ``x-llmco2-predicted-*`` response headers;
* measured energy, request count and the error histogram's EBA buckets: the retraining pairs file
  (final values, written by another path) and the number of requests the client sent;
* the books close: measured + idle + unreported == the counters' total (the fake counter's);
* ``model_name`` joins with vLLM's own ``vllm:*`` series;
* ``promtool check metrics`` passes on a scrape of the llmco2 families;
* every query of the generated Grafana dashboard returns data (admission control on, admitting all).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from llmco2_serve.devtools.e2e import PluginServer, wait_for_pairs
from llmco2_serve.devtools.serverctl import free_port
from llmco2_serve.reporting import dashboard as dash
from llmco2_serve.reporting.prometheus import exported_series

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if PROMETHEUS is None or PROMTOOL is None:
    pytest.skip("needs a Prometheus server and promtool (Debian: apt-get install prometheus; `make setup` does "
                "it as root)", allow_module_level=True)

N_REQUESTS = 16
INTENSITY_G_PER_KWH = 123.0  # not the default 481: the gauge must say what was configured
MODEL = "tiny-llama"


class Prometheus:
    """A Prometheus server scraping ``target`` every second, its data in ``tmp``."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: vllm\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def query(self, promql: str) -> list[dict]:
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_prometheus")
    pairs = tmp / "pairs.jsonl"
    srv = PluginServer(tmp, {
        "LLMCO2_ENERGY_READER": "fake",
        "LLMCO2_FAKE_IDLE_W": "1.5",
        "LLMCO2_FAKE_BUSY_W": "6",
        "LLMCO2_PAIRS_PATH": str(pairs),
        "LLMCO2_PAIRS_INCLUDE_FAKE": "1",  # TEST ONLY: the fake counter's final values as pairs
        "LLMCO2_CARBON_INTENSITY_G_PER_KWH": str(INTENSITY_G_PER_KWH),
        # admission control on, with a cap no request reaches: every request is admitted and counted
        # (llmco2_admission_decisions_total, the dashboard's admission panel)
        "LLMCO2_ADMISSION_MAX_REQUEST_CO2_G": "1000",
    }, max_num_seqs=8)
    with srv:
        prom = Prometheus(tmp, srv.base_url.removeprefix("http://").rstrip("/"))
        try:
            headers = _load(srv.base_url)
            yield {"server": srv, "prom": prom, "headers": headers, "pairs": pairs, "tmp": tmp}
        finally:
            prom.stop()


def _load(base: str) -> list[dict]:
    """N_REQUESTS completions, 4 at a time, that run to max_tokens (every one completes: a pair each)."""
    out: list[dict] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": "x" * (8 + 7 * i), "max_tokens": 4 + (i * 5) % 24, "temperature": 0.0,
                "ignore_eos": True}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            with lock:
                out.append({"status": r.status, **{k.lower(): v for k, v in r.headers.items()}})

    for start in range(0, N_REQUESTS, 4):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(start, min(start + 4, N_REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    return out


def _eventually(prom: Prometheus, promql: str, want: float, rel: float, timeout_s: float = 40) -> float | None:
    """The query's value once it is within ``rel`` of ``want`` (predicted sums reach the counters
    within ~1 s of a request or at the stat logger's 10 s tick), else the last value seen."""
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = prom.value(promql)
        if got is not None and got == pytest.approx(want, rel=rel):
            return got
        time.sleep(1.0)
    return got


def test_all_requests_answered(run):
    assert len(run["headers"]) == N_REQUESTS and all(h["status"] == 200 for h in run["headers"])


def test_predicted_series_equal_the_response_headers(run):
    prom, headers = run["prom"], run["headers"]
    energy = sum(float(h["x-llmco2-predicted-energy-j"]) for h in headers)
    co2 = sum(float(h["x-llmco2-predicted-co2-g"]) for h in headers)
    assert energy > 0 and co2 > 0
    # Each header carries 6 significant digits (relative rounding <= 5e-6), so their sum is that close.
    got = _eventually(prom, f'sum(llmco2_energy_joules_total{{kind="predicted",model_name="{MODEL}"}})', energy, 5e-6)
    assert got == pytest.approx(energy, rel=5e-6)
    print(f"prometheus e2e: predicted {got:.4f} J (headers {energy:.4f} J), CO2 headers {co2:.6f} g")
    # operational + embodied = the header's CO2 (which includes the embodied share)
    assert prom.value(f'sum(llmco2_co2_grams_total{{kind="predicted",model_name="{MODEL}"}})') == \
        pytest.approx(co2, rel=5e-6)
    assert prom.value('sum(llmco2_co2_grams_total{kind="predicted",scope="embodied"})') > 0
    assert prom.value('sum(llmco2_requests_total{kind="predicted"})') == N_REQUESTS


def test_measured_series_equal_the_pairs_file(run):
    prom = run["prom"]
    rows = wait_for_pairs(run["pairs"], N_REQUESTS)
    assert len(rows) == N_REQUESTS, len(rows)  # every request completed and was measured (fake counter)
    measured = sum(r["request_energy_j"] for r in rows)
    got = _eventually(prom, 'sum(llmco2_energy_joules_total{kind="measured"})', measured, 1e-6)
    assert got == pytest.approx(measured, rel=1e-6)
    assert prom.value('sum(llmco2_requests_total{kind="measured"})') == N_REQUESTS
    for phase in ("prefill", "decode"):
        assert prom.value(f'sum(llmco2_energy_joules_total{{kind="measured",phase="{phase}"}})') == \
            pytest.approx(sum(r[f"{phase}_energy_j"] for r in rows), rel=1e-6)
    # EBA from the histogram's buckets = the share of pairs within 10 % / 30 % of their measurement
    errors = [abs(r["predicted_energy_j"] / r["request_energy_j"] - 1) for r in rows]
    assert prom.value('sum(llmco2_prediction_relative_error_count{phase="total"})') == N_REQUESTS
    for bound in (0.1, 0.3):
        within = sum(e <= bound for e in errors)
        got = prom.value(f'sum(llmco2_prediction_relative_error_bucket{{phase="total",le="{bound}"}})')
        assert got == within, (bound, got, sorted(errors))
    print(f"prometheus e2e: measured {measured:.4f} J over {len(rows)} pairs; EBA(10%) "
          f"{sum(e <= 0.1 for e in errors)}/{len(rows)}, EBA(30%) {sum(e <= 0.3 for e in errors)}/{len(rows)}")


def test_books_close_and_gauges_say_the_settings(run):
    prom = run["prom"]
    wait_for_pairs(run["pairs"], N_REQUESTS)
    time.sleep(2.5)  # one more books message and scrape after the last final value
    ratio = prom.value("(sum(llmco2_energy_joules_total{kind=\"measured\"}) + sum(llmco2_idle_energy_joules_total)"
                       " + sum(llmco2_unreported_energy_joules_total)) / sum(llmco2_gpu_energy_joules_total)")
    print(f"prometheus e2e: (measured + idle + unreported) / total = {ratio:.5f}")
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert prom.value("sum(llmco2_idle_energy_joules_total)") > 0
    intensity = prom.query("llmco2_carbon_intensity_grams_per_kwh")
    assert [float(s["value"][1]) for s in intensity] == [INTENSITY_G_PER_KWH], intensity
    assert intensity[0]["metric"]["model_name"] == MODEL and intensity[0]["metric"]["source"]
    obs = prom.value("llmco2_calibration_observations")
    requests = prom.value('llmco2_calibration_observations_by_kind{kind="request"}')
    windows = prom.value('llmco2_calibration_observations_by_kind{kind="window"}')
    assert obs is not None and requests is not None and 1 <= requests <= N_REQUESTS
    assert obs == requests + (windows or 0)  # counter windows are observations too (runtime/windows.py)
    assert {s["metric"]["phase"] for s in prom.query("llmco2_calibration_factor_ratio")} == {"prefill", "decode"}
    failures = prom.query("llmco2_plugin_failures_total")
    assert "output_processor.add_request" in {s["metric"]["patch"] for s in failures}
    assert sum(float(s["value"][1]) for s in failures) == 0, failures


def test_model_name_joins_with_vllm_series(run):
    prom = run["prom"]
    joined = prom.query('sum by (model_name) (llmco2_requests_total{kind="measured"}) '
                        "/ on (model_name) sum by (model_name) (vllm:request_success_total)")
    assert [s["metric"]["model_name"] for s in joined] == [MODEL]
    assert float(joined[0]["value"][1]) == pytest.approx(1.0)  # every finished request was measured


def test_promtool_accepts_the_scrape(run):
    with urllib.request.urlopen(run["server"].base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    families, keep = [], False
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split()[2].startswith("llmco2_")
        if keep and line:
            families.append(line)
    scrape = "\n".join(families) + "\n"
    names = {ln.split("{")[0].split()[0] for ln in families if not ln.startswith("#")}
    # every series of ours is there (other parts of the plugin, e.g. admission control, may add theirs)
    assert exported_series(include_foreign=False) <= names, names
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", (check.stdout, check.stderr)


def test_every_dashboard_query_returns_data(run):
    prom = run["prom"]
    wait_for_pairs(run["pairs"], N_REQUESTS)
    board = dash.build_dashboard()
    assert dash.check(board) == []
    admitted = prom.query('llmco2_admission_decisions_total{decision="admit"}')
    assert sum(float(s["value"][1]) for s in admitted) == N_REQUESTS, admitted
    empty = []
    for title, expr in dash.panel_queries(board):
        # Grafana's variables: a window that covers this short run, every model
        promql = expr.replace(dash.RATE_WINDOW, "10m").replace(dash.MODEL_VAR, ".*")
        if not prom.query(promql):
            empty.append((title, promql))
    print(f"dashboard: {len(dash.panel_queries(board))} queries, {len(empty)} without data")
    assert not empty, empty
