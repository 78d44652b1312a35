# The two commands a newcomer needs:  make demo   and   make test
# Both create or reuse .venv/ at the repository root and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
QT_ENV := QT_QPA_PLATFORM=offscreen

.PHONY: demo test install lint screenshots sample-data clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Main job on the built-in sample. Pass ARGS=--headless to force the command-line path.
demo: $(STAMP)
	$(BIN)/wsss-cram demo $(ARGS)

# Whole test suite, headless. GUI tests need an OpenGL context, so they run under Xvfb when available.
test: $(STAMP)
	@command -v xvfb-run >/dev/null 2>&1 || bash scripts/ensure_xvfb.sh
	$(QT_ENV) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} xvfb-run -a -s "-screen 0 1600x1000x24" \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests training benchmarks

screenshots: $(STAMP)
	$(QT_ENV) xvfb-run -a -s "-screen 0 1920x1080x24" $(BIN)/python docs/make_screenshots.py

sample-data: $(STAMP)
	$(BIN)/wsss-cram make-sample-data --out sample_data

clean-venv:
	rm -rf $(VENV)
