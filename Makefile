# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsynth-installed
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test lint bench clean

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
	# Compile the round contract (ledger/rounds.vy) with vyper now rather than at first use.
	$(BIN)/python -c "from fedsynth.ledger.chain import compiled_contract; compiled_contract()"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsynth run configs/digits-federated.toml --out $(RUN_DIR)

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
