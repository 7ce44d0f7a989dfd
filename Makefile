# vmmd: `make run` boots the demo guest, `make test` runs the whole suite.
# Both install what they need first: Debian packages (when missing), a .venv
# with the package and its test dependencies, and the firmware images.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# gcc/binutils/make build firmware/ and the layout probes; linux-libc-dev holds the
# kernel headers the layout test compares against; ovmf feeds the measurement
# interop test; python3-venv makes the .venv on Debian.
APT_PACKAGES := gcc binutils make libc6-dev linux-libc-dev ovmf python3-venv
BENCH_APT_PACKAGES := qemu-system-x86
TIMEOUT ?= 60
# Wait (up to 10 minutes) for another apt/dpkg to release its lock instead of failing at once: fresh cloud
# machines run unattended-upgrades at boot. apt-get install waits by itself (apt.conf(5), DPkg::Lock::Timeout);
# apt-get update does not wait for the lists lock, so apt_install retries it.
APT_OPTS := -o DPkg::Lock::Timeout=600

.PHONY: all run test deps apt-deps bench-deps firmware lint bench clean

all: deps firmware

run: deps firmware
	$(VENV)/bin/vmctl run firmware/build/demo.bin --platform auto --timeout $(TIMEOUT)

test: deps firmware
	$(VENV)/bin/ruff check vmmd tests scripts
	VMMD_STRICT_SKIPS=1 $(PY) -m pytest -q tests

lint: deps
	$(VENV)/bin/ruff check vmmd tests scripts

# Every benchmark runs; each exits 1 when it missed a goal and 2 when it could not measure (scripts/bench/
# common.py). The summary names them, and make bench fails if any did.
bench: deps firmware bench-deps
	@failed=""; for b in scripts/bench/*.py "scripts/bench/net.py --mixed"; do \
	  case $$b in */common.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b; rc=$$?; \
	  case $$rc in 0) ;; 1) failed="$$failed\n  $$b: goal missed";; *) failed="$$failed\n  $$b: did not run (exit $$rc)";; esac; \
	done; \
	if [ -n "$$failed" ]; then printf "== bench summary: not every goal was met:$$failed\n" >&2; exit 1; fi; \
	echo "== bench summary: every goal met"

firmware:
	$(MAKE) -C firmware

deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | apt-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m compileall -q vmmd  # bytecode caches, as pip makes for installed packages: faster vmctl start
	touch $@

# Install Debian packages only when one is missing; say how when not root.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    for try in $$(seq 120); do \
	      out=$$(DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTS) update -qq 2>&1) && break; \
	      case "$$out" in *"Could not get lock"*) [ $$try = 1 ] && echo "waiting for another apt to finish ..."; \
	        sleep 5;; *) echo "$$out" >&2; exit 1;; esac; \
	    done && \
	    DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTS) install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi
endef

apt-deps:
	$(call apt_install,$(APT_PACKAGES))

bench-deps:
	$(call apt_install,$(BENCH_APT_PACKAGES))

clean:
	$(MAKE) -C firmware clean
	rm -rf $(VENV) *.egg-info .pytest_cache
