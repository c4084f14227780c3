# The two commands the README promises: `make demo` and `make test`. Both set themselves up.
PY := .venv/bin/python

.PHONY: setup demo test test-cython test-python bench fuzz dist clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m vhdcore.demo demo-out

# The whole suite, once per kernel backend (Cython, then the pure-Python twin).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
	VHDCORE_PUREPYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,median,mean,ops --benchmark-sort=name

# Long coverage-guided fuzzing run (atheris; fork mode: atheris keeps numpy temporaries alive). See fuzz/README.md.
fuzz: setup
	.venv/bin/pip install -q -e ".[fuzz]"
	mkdir -p fuzz/corpus
	.venv/bin/python fuzz/fuzz_vhd.py fuzz/corpus -fork=2 -max_len=128 -len_control=0 \
		-max_total_time=$${FUZZ_SECONDS:-3600} -timeout=20 -rss_limit_mb=4096

# Release files in dist/: the sdist (with the generated C file, tests, docs, LICENSE) and the manylinux wheel.
dist: setup
	PYTHON=$(PY) bash scripts/dist.sh dist

clean:
	rm -rf build dist .venv src/vhdcore/*.so src/vhdcore/_coalesce.c
