# Two commands do everything on a fresh machine:  make demo  |  make test
# The venv gets torch first (the build on this machine's disk), then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difcompress-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,quantize,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/difcompress demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) runs
