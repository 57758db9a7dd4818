# turnstile: `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-fleet test bench bench-publish soak verify lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/turnstile demo

demo-fleet: $(STAMP)
	$(VENV)/bin/turnstile demo --fleet

test: $(STAMP)
	$(PY) -m pytest -n auto --durations=20

bench: $(STAMP)
	$(PY) -m benchmarks

# Refresh the committed figures (benchmarks/results/ and RESULTS.md); `make bench` leaves them alone.
bench-publish: $(STAMP)
	$(PY) -m benchmarks --publish

soak: $(STAMP)
	TURNSTILE_SOAK_S=600 $(PY) -m pytest -n 0 tests/test_soak.py -s --timeout=1200

verify: $(STAMP)
	TURNSTILE_EXPLORE=large TURNSTILE_PROPS_EXAMPLES=2000 $(PY) -m pytest -n 0 tests/test_explore.py tests/test_scheduler_props.py -s --timeout=3600

lint: $(STAMP)
	$(VENV)/bin/ruff check broker clients ipc tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
