cat /sys/kernel/mm/transparent_hugepage/enabled; uptime
timeout 200 python3 bench/cpu_moe.py --formats int4_g32 --no-prefill --tokens 1 --json > $OUT/cpu_moe_probe.log 2>&1
grep -v "^{" $OUT/cpu_moe_probe.log | tail -4
timeout 230 python3 bench/e2e.py --models deepseek-v3:6 --gguf Q4_1 --dir /tmp/tandem-e2e --prefill 512 --batches 1 --decode-tokens 24 --trace --trace-knobs default --json --linears fp8 > $OUT/e2e-fp8.log 2>&1
tail -n 1 $OUT/e2e-fp8.log | python3 -c "
import sys,json
r=json.loads(sys.stdin.read())['results'][0]; d=r['decode_b1_layers']
print(r['ram_read_gbs_before_load'], r['ram_read_gbs_loaded'], d, r['decode_b1'], r['peak_rss_gb'], r['load_s'])"
