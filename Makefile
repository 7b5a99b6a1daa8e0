# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsynth-installed
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test check docs lint bench clean fashion-mnist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# Inception-v3 FID/IS (eval.inception_weights). --no-deps: its torchvision requirement is
	# only for its dataset helpers, and a torchvision wheel built for another torch build
	# (CUDA wheel over CPU torch) breaks `import diffusers`.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps torch-fidelity==0.4.0
	# A standalone EVM node (anvil, shipped inside an npm package) for the test that runs a
	# decentralized round over JSON-RPC; without npm that one test is skipped.
	if command -v npm >/dev/null; then \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/anvil @foundry-rs/anvil@1.7.1 \
	  || echo "anvil not installed: the standalone-node test will be skipped"; \
	else echo "npm not found: anvil not installed, the standalone-node test will be skipped"; fi
	# Fashion-MNIST for data.dataset = "fashion-mnist": Debian's dataset-fashion-mnist package
	# (the four IDX files), unpacked without installing into $(VENV)/data; not needed by make test.
	$(MAKE) --no-print-directory fashion-mnist
	# Compile the round contract (ledger/rounds.vy) with vyper now rather than at first use.
	$(BIN)/python -c "from fedsynth.ledger.chain import compiled_contract; compiled_contract()"
	touch $(STAMP)

install: $(STAMP)

FASHION := $(VENV)/data/fashion-mnist
fashion-mnist:
	@if [ -f $(FASHION)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
	  echo "Fashion-MNIST not installed (no apt-get): put its four IDX files in $(FASHION) or set data.path"; exit 0; fi; \
	tmp=$$(mktemp -d); \
	( cd $$tmp && apt-get download -qq dataset-fashion-mnist 2>/dev/null \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download -qq dataset-fashion-mnist 2>/dev/null; } ) \
	&& dpkg-deb -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/x \
	&& mkdir -p $(VENV)/data && cp -r $$tmp/x/usr/share/datasets/fashion-mnist $(VENV)/data/ \
	&& echo "Fashion-MNIST installed in $(FASHION)" \
	|| echo "Fashion-MNIST not installed (apt-get download dataset-fashion-mnist failed): put its four IDX files in $(FASHION) or set data.path"; \
	rm -rf $$tmp

demo: install
	$(BIN)/fedsynth run configs/digits-federated-finetune.toml --out $(RUN_DIR)

test: install docs
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15

# The edit-test loop: lint, import layers and every test not marked slow (no end-to-end run).
check: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow" --durations=5

# The documentation site, built offline with warnings as errors (broken links, orphan pages).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
