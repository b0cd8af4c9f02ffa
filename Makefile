# glm4-intel: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL := build/glm4-tiny-int4
DEMO_QUESTION ?= What is the capital of France?

# CPU-only torch (Linux): make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyPI's Linux torch is the CUDA build).
TORCH_INDEX ?=
PIP_INSTALL = -m pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# What an AVX2-only CPU (no AVX-512, VNNI or AMX) runs, imitated on a newer one: OpenVINO's ISA checks (which also
# pick f32 instead of bf16 inference), oneDNN's kernels, PyTorch's and MKL's kernel dispatch.
AVX2_ONLY = OV_CPU_MAX_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
# The environments hold the same files twice (.venv-chatglm repeats the main one's torch and CUDA wheels: 6.6 GB of
# 21): after each install, files with the same bytes become hard links of one copy (util-linux's hardlink, where
# there is one; a pip install or uninstall later replaces or removes only its own link).
SHARE_FILES = command -v hardlink >/dev/null && hardlink -q -t $$(ls -d $(VENV) .venv-chatglm .venv-xeon .venv-runtime \
	2>/dev/null) || true

.PHONY: demo demo-chat demo-ui test test-avx2 test-xeon setup browser convert-demo train-tiny train-lora venv-chatglm \
	venv-xeon venv-runtime peer clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11 is required" if sys.version_info[:2] != (3, 11) else 0)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) $(PIP_INSTALL) -r requirements.txt
	$(SHARE_FILES)
	touch $@

convert-demo: setup
	$(PY) -m convert --model models/glm4-tiny --output $(DEMO_MODEL) --overwrite

# The main job: convert the bundled model, answer a question in the terminal, then serve the browser chat.
demo: demo-chat demo-ui

demo-chat: convert-demo
	@echo "--- GLM-4 chat on CPU, $(DEMO_MODEL) (streamed):"
	@echo "> $(DEMO_QUESTION)"
	@echo "$(DEMO_QUESTION)" | $(PY) -m runtime.chat --model $(DEMO_MODEL) --stats

# The chat in the browser (python -m demos.gradio_chat) on the bundled model: http://127.0.0.1:7860 (Ctrl-C stops it)
demo-ui: convert-demo
	$(PY) -m demos.gradio_chat --model $(DEMO_MODEL)

test: setup browser venv-xeon venv-runtime venv-chatglm peer
	$(PY) -m pytest -q --durations=12 tests
	$(MAKE) test-xeon

# The whole suite as an AVX2-only machine runs it (see AVX2_ONLY), for a check on a newer CPU.
test-avx2: setup browser venv-xeon venv-runtime venv-chatglm peer
	$(AVX2_ONLY) $(PY) -m pytest -q --durations=12 tests
	$(AVX2_ONLY) $(MAKE) test-xeon

# Debian's Chromium (and a CJK font) for the browser tests; Playwright drives it and never downloads one.
browser:
	@test -x /usr/bin/chromium || { \
		if ! command -v apt-get >/dev/null; then echo "no /usr/bin/chromium and no apt-get: the browser tests will be skipped"; exit 0; fi; \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		$$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y chromium fonts-noto-cjk; }

# A second environment for the original remote-code glm-4-9b-chat (see requirements-chatglm.txt).
venv-chatglm: .venv-chatglm/.installed

.venv-chatglm/.installed: requirements-chatglm.txt
	test -x .venv-chatglm/bin/python || $(PYTHON) -m venv .venv-chatglm
	.venv-chatglm/bin/python -m pip install -r requirements-chatglm.txt
	$(SHARE_FILES)
	touch $@

# A third environment for Xeon servers: torch 2.8 + intel-extension-for-pytorch 2.8 (see requirements-xeon.txt).
venv-xeon: .venv-xeon/.installed

.venv-xeon/.installed: requirements-xeon.txt
	test -x .venv-xeon/bin/python || $(PYTHON) -m venv .venv-xeon
	.venv-xeon/bin/python $(PIP_INSTALL) -r requirements-xeon.txt
	$(SHARE_FILES)
	touch $@

# Chat, serve or demo an already converted model without torch, transformers, optimum or NNCF (about 0.7 GB).
venv-runtime: .venv-runtime/.installed

.venv-runtime/.installed: requirements-runtime.txt
	test -x .venv-runtime/bin/python || $(PYTHON) -m venv .venv-runtime
	.venv-runtime/bin/python -m pip install -r requirements-runtime.txt
	$(SHARE_FILES)
	touch $@

# The IPEX engine and the shared runtime tests on glm4-tiny, in the Xeon environment.
test-xeon: venv-xeon
	.venv-xeon/bin/python -m pytest -q --durations=5 tests/test_ipex.py tests/test_runtime.py --backend ipex

train-tiny: setup
	$(PY) -m models.train_tiny --output models/glm4-tiny

# The bundled LoRA adapter (about 2 minutes on 2 cores).
train-lora: setup
	$(PY) -m models.train_lora --output models/glm4-tiny-lora-capitals

# The peer python -m runtime.bench measures against: llama.cpp's CPU tools (llama-bench, llama-quantize,
# llama-simple) built from the llama.cpp inside llama-cpp-python's sdist on PyPI, for this CPU (GGML_NATIVE).
# Optional: nothing else needs it. About 5 minutes on 2 cores (299 s on an AMD EPYC, 256 s on a Xeon).
# Built without ggml's AMX kernels: on our Xeon with AMX (a KVM guest) they die with SIGILL at their first tile
# load (tileloadd) in llama-bench and llama-simple, while OpenVINO's AMX kernels run; llama.cpp then runs its
# AVX-512 VNNI kernels there. `make peer PEER_CFLAGS=` builds them in where they work.
PEER_CFLAGS ?= $(if $(filter x86_64 AMD64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
PEER_VERSION ?= 0.3.36
PEER := build/peer
PEER_SOURCE := $(PEER)/llama_cpp_python-$(PEER_VERSION)/vendor/llama.cpp
peer: $(PEER)/cmake/bin/llama-bench

$(PEER)/cmake/bin/llama-bench:
	@command -v cmake >/dev/null || { echo "no cmake: llama.cpp is not built and its tests are skipped (apt-get install cmake g++)"; exit 0; }
	mkdir -p $(PEER)
	test -d $(PEER_SOURCE) || { $(PYTHON) -m pip download --no-deps --no-binary :all: -d $(PEER) \
		llama-cpp-python==$(PEER_VERSION) && tar xzf $(PEER)/llama_cpp_python-$(PEER_VERSION).tar.gz -C $(PEER); }
	@start=$$(date +%s); \
	cmake -S $(PEER_SOURCE) -B $(PEER)/cmake -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
		-DCMAKE_C_FLAGS="$(PEER_CFLAGS)" -DCMAKE_CXX_FLAGS="$(PEER_CFLAGS)" \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
		-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
		>$(PEER)/configure.log && \
	cmake --build $(PEER)/cmake --config Release -j $$(nproc) --target llama-bench llama-quantize llama-simple \
		>$(PEER)/build.log && \
	echo "built llama.cpp (llama-cpp-python $(PEER_VERSION)) into $(PEER)/cmake/bin in $$(( $$(date +%s) - start )) s"

clean:
	rm -rf build
