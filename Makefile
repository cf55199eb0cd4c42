# The entry point everyone shares: `make run` and `make test` are the README's two commands.
CARGO ?= cargo
# A new directory per run: a run directory that holds a run is never reused silently.
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
BINARIES := coordinator worker gantry-eval

.PHONY: all libtorch build run test lint fmt bench clean

all: build

# libtorch 2.11.0 from PyPI into .cache/ (idempotent; skipped when LIBTORCH_USE_PYTORCH is set).
libtorch:
	@scripts/fetch-libtorch.sh

# Release binaries into target/release/.
build: libtorch
	$(CARGO) build --release $(addprefix --bin ,$(BINARIES))

# The main job: 4 data-parallel workers on the embedded MNIST-10k digits.
run: build
	target/release/coordinator --workers 4 --run-dir $(RUN_DIR)

# The whole test suite; --no-fail-fast so that one failing test binary does not hide the
# results of the ones after it.
test: libtorch
	$(CARGO) test --workspace --no-fail-fast

# Side-by-side benchmarks against PyTorch (bench/run.sh; not part of the tests).
bench: libtorch
	bench/run.sh

lint: libtorch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
