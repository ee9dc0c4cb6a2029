# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench parity clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,sim]'
	# openpi's PyPI client drives the policy server in the tests; it pins numpy<2, which vlax cannot take, and
	# really imports only msgpack, websockets, numpy, pillow and dm-tree (all installed above).
	$(PY) -m pip install --quiet --no-deps openpi-client==0.1.2
	touch $(STAMP)

# Two workers, one per core of the CI machine; a test file stays on one worker (its module fixtures are built once).
# Most tests run on 2 fake CPU devices; the sharding tests (marked eight_devices) on 8, in a second run.
test: $(STAMP)
	VLAX_TEST_DEVICES=2 $(PY) -m pytest -q -n 2 --dist loadfile -m "not eight_devices" tests
	VLAX_TEST_DEVICES=8 $(PY) -m pytest -q -n 2 --dist loadfile -m eight_devices tests

demo: $(STAMP)
	$(PY) -m experiments.demo

parity: $(STAMP)
	$(PY) -m experiments.checkpoint_parity

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV)
