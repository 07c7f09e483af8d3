# Two commands do everything on a fresh Debian machine:
#   make run    build the default kernel and boot it in QEMU (serial on the terminal)
#   make test   run the whole test suite
# Each installs what is missing first: Debian packages through apt-get, kgen and its test tools into .venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KGEN := $(VENV)/bin/kgen
STAMP := $(VENV)/.kgen-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?= -n auto

.PHONY: run test build bench mutants deps system-deps clean

run: deps
	$(KGEN) run

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

build: deps
	$(KGEN) build

bench: deps
	$(KGEN) bench
	$(KGEN) bench --harness

# The mutation run (docs/testing.md): bugs planted one at a time in the templates, the share `kgen test` catches.
MUTANTS ?= 120
mutants: deps
	$(PY) tests/mutation/mutate.py --sample $(MUTANTS) --seed 1 --report mutants.json

deps: system-deps $(STAMP)

# One command per tool kgen runs; a missing one names the Debian package that brings it.
system-deps:
	@missing=""; \
	command -v qemu-system-i386 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	command -v grub-mkrescue >/dev/null || missing="$$missing grub-common"; \
	[ -d /usr/lib/grub/i386-pc ] || missing="$$missing grub-pc-bin"; \
	[ -d /usr/lib/grub/x86_64-efi ] || missing="$$missing grub-efi-amd64-bin"; \
	[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing="$$missing ovmf"; \
	command -v xorriso >/dev/null || missing="$$missing xorriso"; \
	command -v mformat >/dev/null || missing="$$missing mtools"; \
	command -v objdump >/dev/null || missing="$$missing binutils"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf out build dist .pytest_cache mutants.json
