// Reading the next hybrid layer's experts ahead, while the GPU works between two CPU calls.
//
// In a decode step the pool idles between two hybrid layers while the GPU runs the next layer's attention and
// router (H200 host, batch 1: ~50 us for Qwen3-30B-A3B, ~160 us for DeepSeek-V3), then reads that layer's experts
// from RAM at full speed. A doorbell may name a read-ahead: the experts the next layer's router is predicted to
// pick (the GPU applies that router to this layer's input while the CPU computes this layer, and writes the ids to
// pinned memory). After the doorbell's job the pool reads those experts' weights into its caches -- the most
// likely expert first, gate and up before down, as the call reads them -- until the next doorbell rings; the
// call then finds part of its bytes in cache. Results never change, only where the bytes come from.
#pragma once
#include <cstdint>
#include <memory>

#include "tandem/threadpool.h"

namespace tandem {

class Experts;
struct ForwardArgs;

struct ReadAhead {
  const Experts* experts = nullptr;  // the next layer's
  const int64_t* ids = nullptr;      // [rows, k] predicted expert ids (a GPU writes them; < 0 or >= E: skipped)
  int rows = 0, k = 0;
};

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
};
ReadAheadStats read_ahead_stats();

}  // namespace tandem
