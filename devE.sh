uptime
python3 - <<'PY'
import sys, time; sys.path.insert(0, "bench")
from cpu_moe import ProbeBuffer
from tandem.kernels import cpu as K
p = ProbeBuffer(2.0)
for rnd in range(2):
    row = []
    for pf in (0, 1024, 4096, 8192):
        for s in (1, 2, 4, 8):
            best = 0
            for r in range(3):
                t0 = time.perf_counter(); K._C.read_buffer(p.p, p.n, s, pf); best = max(best, p.n / (time.perf_counter() - t0) / 1e9)
            row.append(f"pf{pf}/s{s}={best:.1f}")
    print("round", rnd, " ".join(row), flush=True)
print("bandwidth_probe", K._C.bandwidth_probe(2 << 30, 4))
PY
timeout 150 python3 bench/cpu_moe.py --formats int4_g32 --no-prefill --tokens 1,4 --json > $OUT/cpu_moe2.log 2>&1
grep -v "^{" $OUT/cpu_moe2.log | tail -5
