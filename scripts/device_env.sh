#!/usr/bin/env bash
# Set up tandem on the lent H200 machine (torch, triton, transformers already there; no network):
# carried wheels (.whl/) into /tmp/site, then the package with its C++ kernels built in place (editable).
# Use: `source scripts/device_env.sh` at the start of a device command, with `.whl` carried.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/tandem-build.log 2>&1 \
  || { grep -m4 -A4 "error:" /tmp/tandem-build.log; exit 1; }
python3 -c "import tandem.kernels.cpu as k; print('tandem kernels:', k.available_isas())"
set +e
