# Quick start: `make demo` and `make test`; each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
L2L_VERSION := 0.2.0
L2L_STAMP := $(VENV)/.learn2learn

.PHONY: demo test venv clean learn2learn

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo,serve,jobs,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fewshot demo --out demo-output

test: $(STAMP) $(L2L_STAMP)
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-output .pytest_cache site

# Durability under stress (issue #5): the crash tests with 2000 random SIGKILLs instead of 200, and
# ten times the bit flips and truncations of the fuzz test (about 24,000 mutated registries).
.PHONY: stress
stress: $(STAMP)
	FEWSHOT_STRESS_KILLS=2000 FEWSHOT_STRESS_FUZZ=10 $(BIN)/python -m pytest -q -s \
		tests/test_crash_safety.py tests/test_integrity_fuzz.py tests/test_concurrency.py

# learn2learn 0.2.0 ships only an sdist whose generated C does not compile on Python >= 3.11:
# regenerate its three Cython modules with Cython 3, then install without its heavy declared
# dependencies (qpth pins numpy<2; gsutil is large); `gym` and `requests` are all it needs to import.
learn2learn: $(L2L_STAMP)

$(L2L_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet "cython>=3.0" "gym>=0.26" requests
	rm -rf $(VENV)/l2l-build && mkdir -p $(VENV)/l2l-build
	$(BIN)/python -m pip download --quiet --no-deps --no-binary learn2learn learn2learn==$(L2L_VERSION) -d $(VENV)/l2l-build
	tar -xzf $(VENV)/l2l-build/learn2learn-$(L2L_VERSION).tar.gz -C $(VENV)/l2l-build
	cd $(VENV)/l2l-build/learn2learn-$(L2L_VERSION) && \
		../../bin/cython -3 learn2learn/data/meta_dataset.pyx learn2learn/data/task_dataset.pyx learn2learn/data/transforms.pyx && \
		../../bin/python -m pip install --quiet --no-deps --no-build-isolation .
	$(BIN)/python -c "import learn2learn; print('learn2learn', learn2learn.__version__)"
	rm -rf $(VENV)/l2l-build
	touch $(L2L_STAMP)

# Benchmarks (speed figures, not tests): `make bench` runs them all and prints markdown tables; see
# benchmarks/README.md. easyfsl is only a benchmark baseline, so it (and pandas, which it imports) goes
# to .bench-site/ with `make bench-env`, outside the venv; benchmarks/episodes.py puts it on sys.path.
BENCH_SITE := .bench-site
BENCH_STAMP := $(BENCH_SITE)/.installed

.PHONY: bench bench-env

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(BENCH_SITE) \
		easyfsl==1.5.0 "pandas>=2" python-dateutil six tzdata
	touch $(BENCH_STAMP)

bench: $(STAMP) $(L2L_STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/embedding.py
	$(BIN)/python benchmarks/episodes.py
	$(BIN)/python benchmarks/registry_scale.py --sweep
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/openset.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/export.py
	$(BIN)/python benchmarks/jobs.py
	$(BIN)/python benchmarks/startup.py
