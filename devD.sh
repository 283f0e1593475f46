timeout 300 python3 -m pytest -q -x -m gpu tests/gpu/test_fused.py tests/gpu/test_mla_entry.py tests/gpu/test_fused_layer.py 2>&1 | tail -8
