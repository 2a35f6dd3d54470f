# The two commands of the README: `make demo` and `make test`. Each creates (or reuses) the
# virtual environment .venv inside the checkout and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; an unpinned torch would pull the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-cluster clean horovod docker

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[mpich,test]"
	touch $@

# A new run each time (trainer.overwrite: the demo replaces the previous demo's results)
demo: install
	launch/local.sh --nodes 2 --ranks-per-node 2 configs/mnist_cnn_daso.yaml \
		--set trainer.overwrite=true

test: install
	$(PY) -m pytest -q

# Tests that need root services (a Docker daemon, a two-node Slurm cluster on this host); each
# set-up script installs what its tests need (Debian packages) and starts it. CI runs this.
test-cluster: install
	$(PY) -m pytest -q tests/cluster

clean:
	rm -rf $(VENV) runs .cache .pytest_cache

# Horovod 0.28.1 needs a C++17 build against this torch: see docker/install_horovod.sh.
horovod: install
	docker/install_horovod.sh

# The CPU image daso:cpu (docker/Dockerfile), as root; where Docker or a base image is missing,
# docker/build.sh installs Docker, starts dockerd and makes a base image with debootstrap.
docker:
	docker/build.sh --build-arg TORCH_SPEC="$(TORCH_SPEC)"
