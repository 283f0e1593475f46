// Doorbells: a CUDA stream hands the CPU experts their work through pinned memory instead of a host node.
//
// A host node (cudaLaunchHostFunc) costs two driver hand-offs per layer: the driver's callback thread is woken
// when the stream reaches it, and the stream resumes only after the driver learns that it returned (~15-20 us
// each on an H200 host). With a doorbell the stream writes `ring` (cuStreamWriteValue32, after a system-wide
// fence, so the staged inputs are visible first) and waits in its front end for `done` (cuStreamWaitValue32).
// The pool's thread 0 polls every registered doorbell while it waits for work (the pool's threads spin between
// decode calls anyway), posts a rung doorbell's job to the pool itself, and the job's last thread out sets
// `done`: no thread sleeps or wakes on the way. Nothing here depends on CUDA: the stream side is in
// tandem/gpu/doorbell.py.
#pragma once
#include <cstdint>

namespace tandem {

struct HostJob;
struct ReadAhead;
class ThreadPool;

// One doorbell: two 32-bit words 64 bytes apart in pinned memory (the caller's).
struct Doorbell {
  volatile uint32_t ring;   // the stream sets 1; the pool clears it when it takes the job
  uint32_t pad0[15];
  volatile uint32_t done;   // the job's last thread sets 1; the stream clears it after its wait
  uint32_t pad1[15];
};
static_assert(sizeof(Doorbell) == 128, "Doorbell size");

// Register a doorbell and the job it rings (both outlive their registration: the caller keeps them). Returns the
// number of doorbells registered; throws when the table (kMaxDoorbells) is full.
int doorbell_add(Doorbell* bell, const HostJob* job);
// After each of this doorbell's jobs, read `ra`'s experts ahead until a doorbell rings (read_ahead.h); replaces
// an earlier one. Throws if the doorbell is not registered.
void doorbell_read_ahead(Doorbell* bell, const ReadAhead& ra);
// Forget a doorbell (and its read-ahead); returns once no thread can touch it any more (its memory, and the
// read-ahead's experts, may then be freed).
void doorbell_remove(Doorbell* bell);
// Forget every doorbell (at exit, before Python frees them).
void doorbell_stop();
// Jobs run for rung doorbells since the process started (tests, benchmarks).
uint64_t doorbell_jobs_run();
constexpr int kMaxDoorbells = 4096;

// For the pool's thread 0 (threadpool.cpp): whether any doorbell is registered; one pass over them, posting each
// rung one's job to `pool` (true if any); a pause while none rings, longer the longer the idle time.
bool doorbells_registered();
bool doorbell_poll(ThreadPool& pool);
void doorbell_nap(int64_t idle_ns);

}  // namespace tandem
