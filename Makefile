# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project when needed (the stamp is redone when pyproject.toml changes).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install flops clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch alone first: pip then takes the host's own build (the CPU wheel on CPU machines) instead of
	# backtracking into the registry's CUDA build while resolving the rest.
	$(PIP) install --quiet torch==2.13.0
	# compat mode puts the repository root on sys.path, so `python jobs/pretrain.py` and `deepspeed` find the
	# model/, pipeline/, jobs/ and tools/ packages without a build step.
	$(PIP) install --quiet -e . --config-settings editable_mode=compat
	touch $(STAMP)

# Both run as if the venv were activated (its bin/ first on PATH), so every process they start finds the venv's tools,
# ninja included: DeepSpeed JIT-builds its CPU ops with the first ninja on PATH, and the system's and the venv's
# (1.11 and 1.13 here) log their builds differently, so each rebuilt them (~36 s on 2 cores) whenever the other had
# built last: the SLURM script's launch (the venv first on its PATH) and every other launch took turns.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

demo: $(STAMP)
	$(RUN) $(PY) -m jobs.demo $(if $(DUMP),--dump $(DUMP),)

# Two pytest-xdist workers: the learning proof beside the rest, which runs in order on the other (tests/conftest.py).
test: $(STAMP)
	$(RUN) $(PY) -m pytest -n 2 $(PYTEST_ARGS)

flops: $(STAMP)
	$(PY) -m model.flops

clean:
	rm -rf $(VENV) demo runs .pytest_cache
