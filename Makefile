# Two entry points, each installing what it needs into ./.venv on first use:
#   make demo   train configs/demo.yaml on the CPU (~3 minutes on 2 cores)
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/longseq train configs/demo.yaml $(ARGS)

# The first run leaves out tests/parallel, which the second runs on 8 simulated CPU devices with the memory
# report's FSDP case (the flag must be set before jax starts).
# Each run spreads the tests over TEST_WORKERS processes (pytest-xdist; 2 = CI's cores).
# XLA compiles the tests' programs with LLVM's optimisations off: the programs are tiny and compiling them is
# most of the suite's time (a sequence-parallel attention case: 30 -> 16 s); the arithmetic is the same.
# Compiled programs go to JAX's persistent cache in TEST_CACHE, emptied first, so that the tests which run the
# same program in several processes (a run, then its resumption) compile it once (the trainer's tests: 121 -> 101 s).
TEST_WORKERS ?= 2
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0
TEST_CACHE := .test_jax_cache
TEST_ENV = JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} JAX_COMPILATION_CACHE_DIR=$(CURDIR)/$(TEST_CACHE) \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
test: $(STAMP)
	rm -rf $(TEST_CACHE)
	$(TEST_ENV) XLA_FLAGS="$${XLA_FLAGS:-} $(TEST_XLA_FLAGS)" \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --ignore=tests/parallel $(PYTEST_ARGS)
	$(TEST_ENV) XLA_FLAGS="$${XLA_FLAGS:-} $(TEST_XLA_FLAGS) --xla_force_host_platform_device_count=8" \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests/parallel "tests/train/test_memory.py::test_the_report_counts_the_state_each_device_holds" \
			"tests/bench/test_bench_train.py::test_utilisation_is_per_device_on_a_mesh" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache $(TEST_CACHE)
