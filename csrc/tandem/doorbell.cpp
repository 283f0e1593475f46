// Doorbells (doorbell.h): a table of registered doorbells that the pool's thread 0 polls while idle.
#include "doorbell.h"

#include <time.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "moe.h"
#include "read_ahead.h"
#include "threadpool.h"

namespace tandem {
namespace {

struct Slot {
  std::atomic<Doorbell*> bell{nullptr};
  std::atomic<const HostJob*> job{nullptr};  // written before `bell`, read after it
  std::atomic<ReadAhead*> ahead{nullptr};    // owned; read after `bell`
};

Slot g_slots[kMaxDoorbells];
std::atomic<int> g_high{0}, g_count{0};  // slots [0, g_high) may be in use; g_count are
std::mutex g_mu;                         // add / remove (the poller never takes it)
// The poller's pass: `polling` is 1 while it reads slots, `pass` counts finished passes; a remover that cleared
// a slot waits out a pass in progress, after which no one holds the old pointers.
std::atomic<int> g_polling{0};
std::atomic<uint64_t> g_pass{0}, g_run{0};

// With doorbells registered thread 0 never sleeps on the pool's condition variable: it spins 20 ms past the
// last job (decode layers come back to back), then polls every 50 us, after 1 s every 1 ms.
constexpr int64_t kIdleSpinNs = 20'000'000, kIdleNapNs = 50'000, kIdleLongNs = 1'000'000'000,
                  kIdleLongNapNs = 1'000'000;

void wait_for_poller() {  // caller holds g_mu, after clearing slots
  if (g_polling.load() == 0) return;
  const uint64_t pass = g_pass.load();
  while (g_polling.load() != 0 && g_pass.load() == pass) std::this_thread::yield();
}

void post(ThreadPool& pool, Doorbell* bell, const HostJob* h, const ReadAhead* ahead) {
  const int64_t t0 = host_trace_clock();
  std::shared_ptr<Job> job;
  try {
    job = h->experts->make_job(h->args, pool);
  } catch (...) {
    bell->done = 1;  // bad ids: the output stays as it was, but the stream must not wait forever
    return;
  }
  job->on_done = [bell, h, t0] {
    host_trace_record(*h, t0);
    std::atomic_thread_fence(std::memory_order_release);  // every thread's output before `done`
    bell->done = 1;
  };
  g_run.fetch_add(1, std::memory_order_relaxed);
  read_ahead_score(h->experts, h->args);
  pool.submit(std::move(job));
  if (ahead != nullptr && read_ahead_enabled())  // queued: runs once the job is done
    pool.submit(make_read_ahead_job(*ahead, pool));
}

// Free read-aheads taken out of their slots (caller holds g_mu, after clearing the slots).
void free_read_aheads(std::vector<ReadAhead*>& taken) {
  if (taken.empty()) return;
  wait_for_poller();
  read_ahead_quiesce();
  for (ReadAhead* ra : taken) delete ra;
}

}  // namespace

int doorbell_add(Doorbell* bell, const HostJob* job) {
  int count;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    int i = 0;
    while (i < kMaxDoorbells && g_slots[i].bell.load() != nullptr) i++;
    if (i == kMaxDoorbells)
      throw std::runtime_error("doorbell table full (" + std::to_string(kMaxDoorbells) + "): free unused graphs");
    g_slots[i].job.store(job, std::memory_order_relaxed);
    g_slots[i].bell.store(bell, std::memory_order_release);
    g_high.store(std::max(g_high.load(), i + 1), std::memory_order_release);
    count = g_count.fetch_add(1) + 1;
  }
  pool().wake();  // thread 0 may sleep on the pool's condition variable: from now on it polls
  return count;
}

void doorbell_read_ahead(Doorbell* bell, const ReadAhead& ra) {
  std::lock_guard<std::mutex> lk(g_mu);
  for (int i = 0; i < g_high.load(); i++)
    if (g_slots[i].bell.load() == bell) {
      std::vector<ReadAhead*> old{g_slots[i].ahead.exchange(new ReadAhead(ra))};
      if (old[0] == nullptr) old.clear();
      free_read_aheads(old);
      return;
    }
  throw std::invalid_argument("doorbell_read_ahead: the doorbell is not registered");
}

void doorbell_remove(Doorbell* bell) {
  std::lock_guard<std::mutex> lk(g_mu);  // held while waiting: no add may reuse the slot mid-pass
  std::vector<ReadAhead*> taken;
  for (int i = 0; i < g_high.load(); i++)
    if (g_slots[i].bell.load() == bell) {
      g_slots[i].bell.store(nullptr);
      g_count.fetch_sub(1);
      if (ReadAhead* ra = g_slots[i].ahead.exchange(nullptr)) taken.push_back(ra);
    }
  wait_for_poller();
  free_read_aheads(taken);
}

void doorbell_stop() {
  std::lock_guard<std::mutex> lk(g_mu);
  std::vector<ReadAhead*> taken;
  for (int i = 0; i < g_high.load(); i++) {
    if (g_slots[i].bell.exchange(nullptr) != nullptr) g_count.fetch_sub(1);
    if (ReadAhead* ra = g_slots[i].ahead.exchange(nullptr)) taken.push_back(ra);
  }
  wait_for_poller();
  free_read_aheads(taken);
}

namespace {
struct StopAtExit {
  ~StopAtExit() { doorbell_stop(); }  // the pool would otherwise read freed doorbells during teardown
} g_stop_at_exit;
}  // namespace

uint64_t doorbell_jobs_run() { return g_run.load(); }

bool doorbells_registered() { return g_count.load(std::memory_order_relaxed) > 0; }

bool doorbell_poll(ThreadPool& pool) {
  g_polling.store(1);  // seq_cst: ordered before the slot loads (a remover then sees it or we see its null)
  bool posted = false;
  const int n = g_high.load(std::memory_order_acquire);
  for (int i = 0; i < n; i++) {
    Doorbell* bell = g_slots[i].bell.load(std::memory_order_acquire);
    if (bell == nullptr || bell->ring == 0) continue;
    bell->ring = 0;  // taken: the stream rings again only after it has seen `done`
    std::atomic_thread_fence(std::memory_order_acquire);  // the staged inputs after the ring
    post(pool, bell, g_slots[i].job.load(std::memory_order_relaxed), g_slots[i].ahead.load());
    posted = true;
  }
  g_pass.fetch_add(1);
  g_polling.store(0);
  return posted;
}

void doorbell_nap(int64_t idle_ns) {
  if (idle_ns < kIdleSpinNs) return;
  timespec ts{0, idle_ns > kIdleLongNs ? kIdleLongNapNs : kIdleNapNs};
  nanosleep(&ts, nullptr);
}

}  // namespace tandem
