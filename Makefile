# Development loop. `make dev` once in a fresh virtualenv, then the other targets.
PYTHON ?= python

.PHONY: dev test lint typecheck bench wheel ci

dev:  ## editable install with the test and hf extras (re-run after changing Rust code)
	$(PYTHON) -m pip install -e ".[test,hf]"

test:  ## the Python suite and the Rust unit tests
	$(PYTHON) -m pytest -q
	cargo test

lint:  ## Rust and Python format and lint checks (as CI)
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests benches tools
	$(PYTHON) -m ruff format --check python tests benches tools

typecheck:  ## mypy over the package, stubtest of the extension's stub
	$(PYTHON) -m mypy python/ka_rs
	$(PYTHON) -m mypy.stubtest ka_rs._native --allowlist .ci/stubtest-allowlist.txt

bench:  ## criterion benchmarks of the Rust core, then the matcher against DETR's and SciPy
	cargo bench
	$(PYTHON) benches/bench_matcher.py --repeats 15

wheel:  ## a portable manylinux2014 abi3 wheel in dist/, its tag checked by auditwheel
	$(PYTHON) -m pip install -q "ziglang<0.14" auditwheel
	$(PYTHON) -m maturin build --release --zig --compatibility manylinux2014 --out dist
	$(PYTHON) -m auditwheel show dist/ka_rs-*manylinux*.whl

ci:  ## everything CI runs, on this checkout
	bash .ci/run
