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

constexpr size_t kChunk = 8 << 10;  // bytes of gate (and of up) a reader takes at a time: it stops within ~1-2 us

std::atomic<uint64_t> g_jobs{0}, g_stopped{0}, g_bytes{0}, g_predicted{0}, g_needed{0}, g_hits{0};
std::atomic<uint64_t> g_gen{0};  // read_ahead_quiesce bumps it: jobs of an older generation stop
std::atomic<int> g_live{0};      // read-ahead jobs made and not finished
std::atomic<bool> g_on{true};

struct Last {  // the last read-ahead's experts and ids, scored against that layer's next call
  const Experts* experts = nullptr;
  std::vector<int> ids;
};
std::mutex g_last_mu;  // guards g_last and g_record
Last g_last;
std::shared_ptr<ReadAheadRecord> g_record;  // the last read-ahead's, until its layer's call takes it
std::atomic<uint64_t> g_used{0};

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
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

// Loads the cache lines of two runs side by side (two streams per core); the sum keeps the loads.
uint64_t touch2(const uint8_t* a, size_t na, const uint8_t* b, size_t nb) {
  uint64_t s0 = 0, s1 = 0;
  for (size_t o = 0; o < std::max(na, nb); o += 64) {
    if (o < na) s0 += *(const volatile uint64_t*)(a + o);
    if (o < nb) s1 += *(const volatile uint64_t*)(b + o);
  }
  return s0 + s1;
}

class ReadAheadJob : public Job {
 public:
  ReadAheadJob(const ReadAhead& ra, ThreadPool& pool) : ra_(ra), pool_(pool), gen_(g_gen.load()) {
    g_live.fetch_add(1);
  }
  ~ReadAheadJob() override { g_live.fetch_sub(1); }  // every thread is out of run (or a dropped pool never ran it)

  void run(int tid, int nthreads) override {
    if (g_gen.load(std::memory_order_relaxed) != gen_) return;
    if (tid == 0) start(nthreads);
    if (tid == 0 && nthreads > 1) {  // poll while the readers read (they wait for the record: `started_`)
      while (!stop_.load(std::memory_order_relaxed) && readers_.load(std::memory_order_acquire) < nthreads - 1) {
        if (doorbell_poll(pool_) || g_gen.load(std::memory_order_relaxed) != gen_) stop_.store(true);
        relax();
      }
      return;
    }
    bool go = true;  // thread 0 may have returned above (a quiesce): then no record comes
    while (go && !started_.load(std::memory_order_acquire)) {
      go = g_gen.load(std::memory_order_relaxed) == gen_;
      relax();
    }
    if (go) read(nthreads > 1 ? tid - 1 : 0, nthreads == 1);
    readers_.fetch_add(1, std::memory_order_release);
  }

 private:
  // Thread 0: the predicted ids (read once, now) and the record the next call of that layer takes.
  void start(int nthreads) {
    auto rec = std::make_shared<ReadAheadRecord>();
    rec->experts = ra_.experts;
    rec->pool_generation = pool_.generation();
    rec->pool_threads = nthreads;
    rec->shards = (int)ra_.experts->shards().size();
    rec->ids = predicted_ids(ra_);
    rec->progress.reset(new ReadAheadRecord::Progress[rec->readers()]);
    {
      std::lock_guard<std::mutex> lk(g_last_mu);
      g_last = {ra_.experts, rec->ids};
      g_record = rec;
    }
    rec_ = std::move(rec);
    started_.store(true, std::memory_order_release);
  }

  // Reader j: its slice of each unit's gate and up rows, a few KB at a time, until the end or a ring.
  void read(int j, bool poll) {
    ReadAheadRecord& rec = *rec_;
    ReadAheadRecord::Progress& pr = rec.progress[j];
    const int S = rec.shards, units = (int)rec.ids.size() * S;
    uint64_t sum = 0, bytes = 0;
    for (int u = 0; u < units && !stop_.load(std::memory_order_relaxed); u++) {
      const Shard& sh = ra_.experts->shards()[u % S];
      const ExpertMatrix &G = sh.m[0], &U = sh.m[1];
      const int e = rec.ids[u / S], in = sh.i1 - sh.i0;
      const int lo = ReadAheadRecord::slice_lo(in, j, rec.readers()), hi = ReadAheadRecord::slice_lo(in, j + 1,
                                                                                                    rec.readers());
      const int step = std::max<int>(1, (int)(kChunk / G.row_bytes));
      for (int r = lo; r < hi; r += step) {
        const int n = std::min(step, hi - r);
        sum += touch2(G.row(e, r), (size_t)n * G.row_bytes, U.row(e, r), (size_t)n * U.row_bytes);
        bytes += (size_t)n * (G.row_bytes + U.row_bytes);
        pr.rows = r + n - lo;
        if (poll && (doorbell_poll(pool_) || g_gen.load(std::memory_order_relaxed) != gen_)) stop_.store(true);
        if (stop_.load(std::memory_order_relaxed)) break;
      }
      if (pr.rows == hi - lo) {
        pr.done = u + 1;
        pr.rows = 0;
      }
    }
    sink_.fetch_add(sum, std::memory_order_relaxed);
    g_bytes.fetch_add(bytes, std::memory_order_relaxed);
    if (stop_.load() && pr.done < units && !counted_.exchange(true)) g_stopped.fetch_add(1);
  }

  const ReadAhead ra_;
  ThreadPool& pool_;
  const uint64_t gen_;
  std::shared_ptr<ReadAheadRecord> rec_;
  std::atomic<bool> started_{false};
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

std::shared_ptr<ReadAheadRecord> read_ahead_take(const Experts* experts, const ThreadPool& pool) {
  std::lock_guard<std::mutex> lk(g_last_mu);
  if (!g_record || g_record->experts != experts || g_record->pool_generation != pool.generation() ||
      g_record->pool_threads != pool.size())
    return nullptr;
  return std::move(g_record);
}

void read_ahead_count_used(uint64_t bytes) { g_used.fetch_add(bytes, std::memory_order_relaxed); }

void read_ahead_set_enabled(bool on) { g_on.store(on); }
bool read_ahead_enabled() { return g_on.load(std::memory_order_relaxed); }

void read_ahead_quiesce() {
  g_gen.fetch_add(1);
  while (g_live.load() > 0) std::this_thread::yield();
  std::lock_guard<std::mutex> lk(g_last_mu);
  g_last = {};
  g_record.reset();
}

ReadAheadStats read_ahead_stats() {
  return {g_jobs.load(), g_stopped.load(), g_bytes.load(), g_predicted.load(), g_needed.load(), g_hits.load(),
          g_used.load()};
}

}  // namespace tandem
