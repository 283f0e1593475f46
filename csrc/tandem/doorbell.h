// Doorbells: a CUDA stream hands the CPU experts their work through pinned memory instead of a host node.
//
// A host node (cudaLaunchHostFunc) costs two driver hand-offs per layer: the driver's callback thread is woken
// when the stream reaches it, and the stream resumes only after the driver learns that it returned (~15-20 us
// each on an H200 host). With a doorbell the stream writes `ring` (cuStreamWriteValue32, after a system-wide
// fence, so the staged inputs are visible first) and waits in its front end for `done` (cuStreamWaitValue32);
// one listener thread, pinned to the core the kernel's pool leaves free, spins over every registered doorbell,
// runs the job of a rung one on the pool and sets its `done`. Nothing here depends on CUDA: the stream side is
// in tandem/gpu/doorbell.py.
#pragma once
#include <cstdint>

namespace tandem {

struct HostJob;

// One doorbell: two 32-bit words 64 bytes apart in pinned memory (the caller's).
struct Doorbell {
  volatile uint32_t ring;   // the stream sets 1; the listener clears it when it takes the job
  uint32_t pad0[15];
  volatile uint32_t done;   // the listener sets 1 when the job is done; the stream clears it after its wait
  uint32_t pad1[15];
};
static_assert(sizeof(Doorbell) == 128, "Doorbell size");

// Register a doorbell and the job it rings (both outlive the listener's use: the caller keeps them); starts the
// listener thread on first use. Returns the number of doorbells registered.
int doorbell_add(Doorbell* bell, const HostJob* job);
// Forget a doorbell; returns once the listener can no longer touch it (its memory may then be freed).
void doorbell_remove(Doorbell* bell);
// Stop the listener and forget every doorbell (the process's exit does it; registering again restarts it).
void doorbell_stop();
// Jobs the listener has run since start (tests, benchmarks).
uint64_t doorbell_jobs_run();

}  // namespace tandem
