cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag /sys/kernel/mm/transparent_hugepage/khugepaged/defrag
grep -i "huge\|MemFree\|MemAvail\|^Cached" /proc/meminfo; uptime
timeout 260 python3 bench/cpu_moe.py --formats int4_g32 --no-prefill --tokens 1 --pages kernel,file,kernel,file --json > $OUT/cpu_moe_pages.log 2>&1
grep -v "^{" $OUT/cpu_moe_pages.log | tail -12
E="python3 bench/e2e.py --models deepseek-v3:6 --gguf Q4_1 --dir /tmp/tandem-e2e --prefill 512 --batches 1 --decode-tokens 24 --trace --trace-knobs default --json --linears fp8 --keep"
(while sleep 15; do grep AnonHuge /proc/meminfo; done) &
i=0
for v in copy mmap copy; do
  i=$((i+1))
  f=""; [ $v = mmap ] && f="--experts-mmap"
  timeout 170 $E $f > $OUT/e2e-$v-$i.log 2>&1 || true
  tail -n 1 $OUT/e2e-$v-$i.log | python3 -c "
import sys,json
r=json.loads(sys.stdin.read())['results'][0]; d=r['decode_b1_layers']
print('$v', r['ram_read_gbs_before_load'], r['ram_read_gbs_loaded'], d['call_ms'], d['gap_ms'], d['layer_ratio'], r['decode_b1']['tok_s'], r['peak_rss_gb'], r['load_s'])" 2>&1 | tail -2
  grep -i anonhuge /proc/meminfo
done
