# Resonant developer commands. `make help` lists them.
PYTHON ?= python3

.PHONY: help codegen check-codegen compile debug annotate install test test-fast bench clean

help:
	@echo "make codegen        regenerate code, stubs, specs and strategies from schema/"
	@echo "make check-codegen  fail if the generated files are stale (CI runs this)"
	@echo "make compile        build the Cython extension in place"
	@echo "make debug          build with -O0 -g and Cython bounds checks"
	@echo "make annotate       build and write resonant/_codec.html (Cython annotation)"
	@echo "make install        pip install the package with its test extras"
	@echo "make test           run the test suite"
	@echo "make bench          run the benchmarks"

codegen:
	$(PYTHON) -m codegen

check-codegen:
	$(PYTHON) -m codegen --check

compile: codegen
	$(PYTHON) setup.py build_ext --inplace

debug: codegen
	RESONANT_DEBUG=1 $(PYTHON) setup.py build_ext --inplace --force

annotate: codegen
	RESONANT_ANNOTATE=1 $(PYTHON) setup.py build_ext --inplace --force

install:
	$(PYTHON) -m pip install ".[test]"

test:
	$(PYTHON) -m pytest tests

bench:
	$(PYTHON) bench/bench_codec.py
	$(PYTHON) bench/bench_transforms.py
	$(PYTHON) bench/bench_stream.py
	$(PYTHON) bench/bench_transport.py
	$(PYTHON) bench/bench_quant.py

clean:
	rm -rf build dist *.egg-info resonant/_codec.c resonant/*.so resonant/_codec.html .pytest_cache .hypothesis
