# Quick start (Debian 12, as root):  make demo   |   make test
# Both targets install what they need and are safe to run twice.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev libxxhash-dev pkg-config gcc python3-venv python3-dev fio attr
STAMP := $(VENV)/.installed

.PHONY: demo test deps system-deps venv bench lint clean mount-helper

demo: deps
	$(PY) tools/demo.py

test: deps
	$(PY) -m pytest -q tests

bench: deps
	$(PY) bench/bench_hash.py
	$(PY) bench/bench_mount.py
	$(PY) bench/bench_replication.py

# mount(8) runs /sbin/mount.TYPE for "mount -t zfsrep" and fstab entries of type zfsrep
mount-helper: deps
	ln -sfn $(CURDIR)/$(VENV)/bin/mount.zfsrep /sbin/mount.zfsrep
	@echo "/sbin/mount.zfsrep -> $(CURDIR)/$(VENV)/bin/mount.zfsrep"

lint: deps
	$(VENV)/bin/ruff check zfsrep mountd tools tests bench native

deps: system-deps venv

# Installs the Debian packages only when one is missing, so a second run needs no network.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info zfsrep/_blockhash*.so zfsrep/_blockhash.c
