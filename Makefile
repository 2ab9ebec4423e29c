# make test  — create .venv if needed, install xdsd with its test dependencies, run the whole suite
# make demo  — run a local mesh of real Envoys driven by xdsd, print what it observed, stop everything
# make bench — benchmarks (quick, < 5 min; BENCH_FULL=1 for bigger N); rewrites BENCHMARKS.md
# make lint  — ruff
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# xds-protos ships an older copy of opentelemetry/proto/*; whichever wheel is installed last
	# owns those files. The OTLP exporter needs opentelemetry-proto's own: reinstall it last.
	$(PY) -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) demo/local_mesh.py

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.authz --seconds $${BENCH_SECONDS:-6}
	$(PY) -m bench.xds $${BENCH_FULL:+--full}
	$(PY) -m bench.report

lint: $(STAMP)
	$(VENV)/bin/ruff check xdsd tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
