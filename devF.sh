lscpu | grep -i "model name\|thread\|MHz\|L2\|L3\|hypervisor"; uptime
timeout 100 python3 bench/cpu_moe.py --shapes qwen3-30b-a3b --formats int4_g32 --no-prefill --tokens 1,4 --mem-gb 0.02 --json > $OUT/cpu_moe_cache.log 2>&1
timeout 100 python3 bench/cpu_moe.py --shapes qwen3-30b-a3b --formats int4_g32 --no-prefill --tokens 1,4 --json > $OUT/cpu_moe_ram.log 2>&1
grep -v "^{" $OUT/cpu_moe_cache.log $OUT/cpu_moe_ram.log | tail -6
