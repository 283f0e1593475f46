set -x
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
grep -i huge /proc/meminfo; nproc; uptime
E="python3 bench/e2e.py --models deepseek-v3:6 --gguf Q4_1 --dir /tmp/tandem-e2e --prefill 512 --batches 1 --decode-tokens 24 --trace --trace-knobs default --json"
for v in copy mmap copy mmap; do
  f=""; [ $v = mmap ] && f="--experts-mmap"
  timeout 200 $E $f > $OUT/dsv3-$v-$RANDOM.log 2>&1
  tail -1 $OUT/dsv3-$v-*.log | python3 -c "
import sys,json
for l in sys.stdin:
  l=l.strip()
  if l.startswith('{'):
    r=json.loads(l); r=r.get('results',[r])[0] if 'results' in r else r
    print(json.dumps({k:r.get(k) for k in ('experts_memory','load_s','ram_read_gbs','decode_b1_layers','decode_tok_s','peak_rss_gb')})[:1500])
"
  grep -i "anonhuge" /proc/meminfo
done
