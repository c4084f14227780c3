# The two commands the README promises: `make demo` and `make test`. Both set themselves up.
PY := .venv/bin/python

.PHONY: setup demo test test-cython test-python bench fuzz clean

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

clean:
	rm -rf build .venv src/vhdcore/*.so src/vhdcore/_coalesce.c
