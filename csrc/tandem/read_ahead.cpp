// Read-ahead of the next hybrid layer's predicted experts (read_ahead.h).
#include "tandem/read_ahead.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "tandem/doorbell.h"
#include "tandem/moe.h"

namespace tandem {
namespace {

constexpr size_t kChunk = 8 << 10;  // bytes a reader takes at a time: it stops within ~1-2 us of a ring

std::atomic<uint64_t> g_jobs{0}, g_stopped{0}, g_bytes{0}, g_predicted{0}, g_needed{0}, g_hits{0};
std::atomic<uint64_t> g_gen{0};  // read_ahead_quiesce bumps it: jobs of an older generation stop
std::atomic<int> g_live{0};      // read-ahead jobs made and not finished
std::atomic<bool> g_on{true};

struct Last {  // the last read-ahead's experts and ids, scored against that layer's next call
  const Experts* experts = nullptr;
  std::vector<int> ids;
};
std::mutex g_last_mu;
Last g_last;

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// One load per cache line; the sum keeps the loads.
uint64_t touch(const uint8_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0;
  size_t o = 0;
  for (; o + 128 <= n; o += 128) {
    s0 += *(const volatile uint64_t*)(p + o);
    s1 += *(const volatile uint64_t*)(p + o + 64);
  }
  for (; o < n; o += 64) s0 += *(const volatile uint64_t*)(p + o);
  return s0 + s1;
}

// Distinct valid ids, best rank first (every row's first choice, then every row's second, ...).
std::vector<int> predicted_ids(const ReadAhead& ra) {
  std::vector<int> out;
  for (int j = 0; j < ra.k; j++)
    for (int r = 0; r < ra.rows; r++) {
      const int64_t e = ra.ids[(size_t)r * ra.k + j];
      if (e >= 0 && e < ra.experts->E() && std::find(out.begin(), out.end(), (int)e) == out.end())
        out.push_back((int)e);
    }
  return out;
}

// A run of chunks: one expert's gate and up rows of one shard in alternating chunks (an item reads gate and up
// rows side by side), or its down rows (b == nullptr).
struct Segment {
  const uint8_t *a, *b;
  size_t n;       // bytes of each of a, b
  size_t chunks;  // chunks of the segment
};

// What the call reads, in its order: every expert's gate and up, then every expert's down rows. A few segments
// (not one entry per chunk): each thread builds them in ~1 us.
std::vector<Segment> plan_segments(const Experts& ex, const std::vector<int>& ids) {
  std::vector<Segment> out;
  for (int p : {0, 2})
    for (int e : ids)
      for (const Shard& s : ex.shards()) {
        const size_t n = (size_t)s.m[p].rows * s.m[p].row_bytes, per = (n + kChunk - 1) / kChunk;
        out.push_back({s.m[p].row(e, 0), p == 0 ? s.m[1].row(e, 0) : nullptr, n, p == 0 ? 2 * per : per});
      }
  return out;
}

// Chunk c of the segments (c < their total): its address and length.
const uint8_t* chunk_at(const std::vector<Segment>& segs, size_t c, size_t* len) {
  for (const Segment& s : segs) {
    if (c >= s.chunks) {
      c -= s.chunks;
      continue;
    }
    const size_t i = s.b ? c / 2 : c, off = i * kChunk;
    *len = std::min(kChunk, s.n - off);
    return (s.b && c % 2 ? s.b : s.a) + off;
  }
  *len = 0;
  return nullptr;
}

class ReadAheadJob : public Job {
 public:
  ReadAheadJob(const ReadAhead& ra, ThreadPool& pool) : ra_(ra), pool_(pool), gen_(g_gen.load()) {
    g_live.fetch_add(1);
  }
  ~ReadAheadJob() override { g_live.fetch_sub(1); }  // every thread is out of run (or a dropped pool never ran it)

  void run(int tid, int nthreads) override {
    if (g_gen.load(std::memory_order_relaxed) != gen_) return;
    const std::vector<int> ids = predicted_ids(ra_);  // every thread: the ids are read once the job starts
    const std::vector<Segment> segs = plan_segments(*ra_.experts, ids);
    size_t total = 0;
    for (const Segment& s : segs) total += s.chunks;
    if (tid == 0) {
      std::lock_guard<std::mutex> lk(g_last_mu);
      g_last = {ra_.experts, ids};
    }
    if (tid == 0 && nthreads > 1) {
      while (!stop_.load(std::memory_order_relaxed) && readers_.load(std::memory_order_acquire) < nthreads - 1) {
        if (doorbell_poll(pool_) || g_gen.load(std::memory_order_relaxed) != gen_) stop_.store(true);
        relax();
      }
      return;
    }
    uint64_t sum = 0, bytes = 0;
    for (size_t c; !stop_.load(std::memory_order_relaxed) && (c = next_.fetch_add(1)) < total;) {
      size_t len;
      const uint8_t* p = chunk_at(segs, c, &len);
      sum += touch(p, len);
      bytes += len;
      if (nthreads == 1 && (doorbell_poll(pool_) || g_gen.load(std::memory_order_relaxed) != gen_))
        stop_.store(true);
    }
    sink_.fetch_add(sum, std::memory_order_relaxed);
    g_bytes.fetch_add(bytes, std::memory_order_relaxed);
    if (stop_.load() && next_.load() < total && !counted_.exchange(true)) g_stopped.fetch_add(1);
    readers_.fetch_add(1, std::memory_order_release);
  }

 private:
  const ReadAhead ra_;
  ThreadPool& pool_;
  const uint64_t gen_;
  std::atomic<size_t> next_{0};
  std::atomic<int> readers_{0};
  std::atomic<bool> stop_{false}, counted_{false};
  std::atomic<uint64_t> sink_{0};
};

}  // namespace

std::shared_ptr<Job> make_read_ahead_job(const ReadAhead& ra, ThreadPool& pool) {
  g_jobs.fetch_add(1, std::memory_order_relaxed);
  return std::make_shared<ReadAheadJob>(ra, pool);
}

void read_ahead_score(const Experts* experts, const ForwardArgs& a) {
  std::lock_guard<std::mutex> lk(g_last_mu);
  if (g_last.experts != experts) return;
  const int T = a.T_ptr ? std::min(*a.T_ptr, a.T) : a.T;
  std::vector<int> need;
  for (int64_t i = 0; i < (int64_t)T * a.K; i++) {
    const int64_t e = a.ids_dtype == DT_I32 ? (int64_t)((const int32_t*)a.ids)[i] : ((const int64_t*)a.ids)[i];
    if (e >= 0 && e < experts->E() && std::find(need.begin(), need.end(), (int)e) == need.end())
      need.push_back((int)e);
  }
  uint64_t hits = 0;
  for (int e : g_last.ids) hits += std::find(need.begin(), need.end(), e) != need.end();
  g_predicted.fetch_add(g_last.ids.size(), std::memory_order_relaxed);
  g_needed.fetch_add(need.size(), std::memory_order_relaxed);
  g_hits.fetch_add(hits, std::memory_order_relaxed);
  g_last = {};
}

void read_ahead_set_enabled(bool on) { g_on.store(on); }
bool read_ahead_enabled() { return g_on.load(std::memory_order_relaxed); }

void read_ahead_quiesce() {
  g_gen.fetch_add(1);
  while (g_live.load() > 0) std::this_thread::yield();
  std::lock_guard<std::mutex> lk(g_last_mu);
  g_last = {};
}

ReadAheadStats read_ahead_stats() {
  return {g_jobs.load(), g_stopped.load(), g_bytes.load(), g_predicted.load(), g_needed.load(), g_hits.load()};
}

}  // namespace tandem
