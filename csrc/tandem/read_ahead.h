// Reading the next hybrid layer's experts ahead, while the GPU works between two CPU calls.
//
// In a decode step the pool idles between two hybrid layers while the GPU runs the next layer's attention and
// router (H200 host, batch 1: ~50 us for Qwen3-30B-A3B, ~160 us for DeepSeek-V3), then reads that layer's experts
// from RAM at full speed. A doorbell may name a read-ahead: the experts the next layer's router is predicted to
// pick (the GPU applies that router to this layer's input while the CPU computes this layer, and writes the ids to
// pinned memory). After the doorbell's job the pool reads those experts' gate and up rows (2/3 of the bytes, and
// what the call reads first) into its caches, the most likely expert first, until the next doorbell rings; the
// call then finds part of its bytes in cache. Results never change, only where the bytes come from.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tandem/threadpool.h"

namespace tandem {

class Experts;
struct ForwardArgs;

struct ReadAhead {
  const Experts* experts = nullptr;  // the next layer's
  const int64_t* ids = nullptr;      // [rows, k] predicted expert ids (a GPU writes them; < 0 or >= E: skipped)
  int rows = 0, k = 0;
};

// What the readers of a read-ahead read, for the call that follows. Reader j (pool thread j + 1, or thread 0 of a
// one-thread pool) reads rows [In * j / readers, In * (j + 1) / readers) of each (predicted expert, shard) unit's
// In gate and up rows, units in order (expert-major); it finished `done` units and `rows` rows of the next. The
// call computes those rows on that reader first, from its core's L2 (rows left in another core's L2 cost a snoop
// across the mesh).
struct ReadAheadRecord {
  struct Progress {
    alignas(64) int done = 0;  // a cache line per reader: each writes its own as it reads
    int rows = 0;
  };
  const Experts* experts = nullptr;
  uint64_t pool_generation = 0;
  int pool_threads = 0, shards = 0;
  std::vector<int> ids;  // predicted experts, best rank first
  std::unique_ptr<Progress[]> progress;  // [readers()]

  int readers() const { return pool_threads > 1 ? pool_threads - 1 : 1; }
  int reader_tid(int j) const { return pool_threads > 1 ? j + 1 : 0; }
  static int slice_lo(int in_rows, int j, int readers) { return (int)((int64_t)in_rows * j / readers); }
  // Rows reader j read of unit (rank k, shard s): [slice_lo, slice_lo + returned).
  int rows_read(int k, int s, int j, int in_rows) const {
    const int u = k * shards + s, len = slice_lo(in_rows, j + 1, readers()) - slice_lo(in_rows, j, readers());
    return u < progress[j].done ? len : u == progress[j].done ? progress[j].rows : 0;
  }
};

// The last read-ahead's record if it read `experts` with this pool; taken (a second call gets none).
std::shared_ptr<ReadAheadRecord> read_ahead_take(const Experts* experts, const ThreadPool& pool);

// A call used `bytes` of rows its readers had read (counted in the stats' `used`).
void read_ahead_count_used(uint64_t bytes);

// A job that reads ra's experts (as ids says when it starts) with every pool thread but thread 0, which polls
// the doorbells meanwhile and stops the job as soon as one rings (its job then runs next).
std::shared_ptr<Job> make_read_ahead_job(const ReadAhead& ra, ThreadPool& pool);

// Thread 0, when it posts a doorbell's job: counts which of the job's experts the last read-ahead of the same
// layer had predicted.
void read_ahead_score(const Experts* experts, const ForwardArgs& a);

// Whether doorbells' read-aheads run (default on; for measuring: tandem.kernels.cpu.set_read_ahead).
void read_ahead_set_enabled(bool on);
bool read_ahead_enabled();

// Stop every read-ahead job and wait until none runs (before experts or doorbells are freed).
void read_ahead_quiesce();

struct ReadAheadStats {
  uint64_t jobs = 0, stopped = 0, bytes = 0;  // jobs run, stopped by a ring before the end, bytes read
  uint64_t predicted = 0, needed = 0, hits = 0;  // distinct experts predicted / called / both (scored calls)
  uint64_t used = 0;  // bytes read ahead that the next call computed on the core that read them
};
ReadAheadStats read_ahead_stats();

}  // namespace tandem
