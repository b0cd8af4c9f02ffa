# glm4-intel: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL := build/glm4-tiny-int4
DEMO_QUESTION ?= What is the capital of France?

.PHONY: demo test setup convert-demo train-tiny venv-chatglm clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11 is required" if sys.version_info[:2] != (3, 11) else 0)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

convert-demo: setup
	$(PY) -m convert --model models/glm4-tiny --output $(DEMO_MODEL) --profile cpu --overwrite

demo: convert-demo
	@echo "--- GLM-4 chat on CPU, $(DEMO_MODEL) (streamed):"
	@echo "> $(DEMO_QUESTION)"
	@echo "$(DEMO_QUESTION)" | $(PY) -m runtime.chat --model $(DEMO_MODEL) --stats

test: setup
	$(PY) -m pytest -q tests

# A second environment for the original remote-code glm-4-9b-chat (see requirements-chatglm.txt).
venv-chatglm: .venv-chatglm/.installed

.venv-chatglm/.installed: requirements-chatglm.txt
	test -x .venv-chatglm/bin/python || $(PYTHON) -m venv .venv-chatglm
	.venv-chatglm/bin/python -m pip install -r requirements-chatglm.txt
	touch $@

train-tiny: setup
	$(PY) -m models.train_tiny --output models/glm4-tiny

clean:
	rm -rf build
