// The doorbell listener (doorbell.h): one thread, started on first registration, for the process's lifetime.
#include "doorbell.h"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "moe.h"
#include "threadpool.h"

namespace tandem {
namespace {

struct Entry {
  Doorbell* bell;
  const HostJob* job;
};

std::mutex g_mu;
std::vector<Entry> g_entries;             // guarded by g_mu; the listener copies it when g_version moves
std::atomic<uint64_t> g_version{0}, g_run{0};
std::atomic<uint64_t> g_in_use{0};  // the version of g_entries the listener's copy is (no older doorbell touched)
std::atomic<bool> g_stop{false};
std::thread g_thread;  // guarded by g_mu

// without a ring: spin 20 ms (decode steps come back to back), then poll every 50 us, after 1 s every 1 ms
constexpr int64_t kIdleSpinNs = 20'000'000, kIdleNapNs = 50'000, kIdleLongNs = 1'000'000'000,
                  kIdleLongNapNs = 1'000'000;

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void listen() {
  std::vector<Entry> mine;
  uint64_t seen = ~0ull;
  int64_t last = now_ns();
  while (!g_stop.load(std::memory_order_relaxed)) {
    if (g_version.load(std::memory_order_acquire) != seen) {
      std::lock_guard<std::mutex> lk(g_mu);
      mine = g_entries;
      seen = g_version.load(std::memory_order_relaxed);
      g_in_use.store(seen, std::memory_order_release);
    }
    bool any = false;
    for (const Entry& e : mine) {
      if (e.bell->ring == 0) continue;
      e.bell->ring = 0;  // taken: the stream rings again only after it has seen `done`
      std::atomic_thread_fence(std::memory_order_acquire);
      tandem_cpu_host_entry((void*)e.job);  // pins this thread to the pool's free cores, runs the forward
      std::atomic_thread_fence(std::memory_order_release);  // the output before `done`
      e.bell->done = 1;
      g_run.fetch_add(1, std::memory_order_relaxed);
      any = true;
    }
    if (any) {
      last = now_ns();
    } else if (const int64_t idle = now_ns() - last; idle > kIdleSpinNs) {
      timespec ts{0, idle > kIdleLongNs ? kIdleLongNapNs : kIdleNapNs};
      nanosleep(&ts, nullptr);  // no decode running: stop burning the driver's core
    } else {
      sched_yield();  // the core is the driver's: Python's main thread, woken at a step's end, gets it at once
    }
  }
}

}  // namespace

int doorbell_add(Doorbell* bell, const HostJob* job) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_entries.push_back({bell, job});
  g_version.fetch_add(1, std::memory_order_release);
  if (!g_thread.joinable()) {
    g_stop.store(false);
    g_thread = std::thread(listen);
  }
  return (int)g_entries.size();
}

void doorbell_remove(Doorbell* bell) {
  uint64_t version;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    g_entries.erase(std::remove_if(g_entries.begin(), g_entries.end(), [bell](const Entry& e) { return e.bell == bell; }),
                    g_entries.end());
    version = g_version.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (!g_thread.joinable()) return;
  }
  while (g_in_use.load(std::memory_order_acquire) < version && !g_stop.load()) std::this_thread::yield();
}

void doorbell_stop() {
  std::thread t;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!g_thread.joinable()) return;
    g_stop.store(true);
    t = std::move(g_thread);
  }
  t.join();
  std::lock_guard<std::mutex> lk(g_mu);
  g_entries.clear();
  g_version.fetch_add(1, std::memory_order_release);
}

namespace {
struct StopAtExit {
  ~StopAtExit() { doorbell_stop(); }  // a listener left running would read freed doorbells during teardown
} g_stop_at_exit;
}  // namespace

uint64_t doorbell_jobs_run() { return g_run.load(); }

}  // namespace tandem
