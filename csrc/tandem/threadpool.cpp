#include "tandem/threadpool.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <sched.h>

#include <chrono>
#include <cstdlib>
#include <set>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace tandem {

void Job::finish_one(int nthreads) {
  if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == nthreads) {
    std::lock_guard<std::mutex> lk(mu_);
    done_.store(true, std::memory_order_release);
    cv_.notify_all();
  }
}

void Job::wait() {
  if (done()) return;
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done(); });
}

void Barrier::arrive_and_wait() {
  const int phase = phase_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
    count_.store(0, std::memory_order_relaxed);
    phase_.fetch_add(1, std::memory_order_release);
    return;
  }
  while (phase_.load(std::memory_order_acquire) == phase) cpu_relax();
}

// Plain POSIX reads: iostreams here crashed inside a process that had loaded torch first (two libstdc++
// locale states; seen on the H200 machine's Python 3.12 + torch 2.11).
static int read_int(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return -1;
  char buf[32] = {0};
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  return n > 0 ? (int)std::strtol(buf, nullptr, 10) : -1;
}

std::vector<int> core_cpu_list() {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return {0};
  std::set<std::pair<int, int>> seen;  // (package, core) already taken: skip SMT siblings
  for (int c = 0; c < CPU_SETSIZE; c++) {
    if (!CPU_ISSET(c, &mask)) continue;
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    const int pkg = read_int(base + "physical_package_id"), core = read_int(base + "core_id");
    if (core >= 0 && !seen.insert(std::make_pair(pkg, core)).second) continue;
    cpus.push_back(c);
  }
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

int physical_cores() { return (int)core_cpu_list().size(); }

ThreadPool::ThreadPool(int nthreads) : cpus_(core_cpu_list()) {
  if (nthreads <= 0) nthreads = (int)cpus_.size();
  for (int t = 0; t < nthreads; t++) workers_.emplace_back([this, t] { loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    posted_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(std::move(job));
    if (current_) return;  // the last thread of the running job starts the next one
    current_ = std::move(queue_.front());
    queue_.pop_front();
    left_.store(size(), std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
}

void ThreadPool::loop(int tid) {
  {  // pin: one thread per physical core
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus_[tid % cpus_.size()], &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  }
  uint64_t seen = 0;
  for (;;) {
    // Spin ~2 ms for the next job (decode calls come back to back), then sleep.
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; posted_.load(std::memory_order_acquire) == seen; i++) {
      cpu_relax();
      if ((i & 1023) == 1023 && std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(2)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return posted_.load() != seen; });
        break;
      }
    }
    std::shared_ptr<Job> job;
    {
      std::lock_guard<std::mutex> lk(mu_);
      seen = posted_.load();
      if (stop_) return;
      job = current_;
    }
    job->run(tid, size());
    job->finish_one(size());
    if (left_.fetch_sub(1, std::memory_order_acq_rel) == 1) {  // last one out starts the next job
      bool posted = false;
      {
        std::lock_guard<std::mutex> lk(mu_);
        current_.reset();
        if (!queue_.empty()) {
          current_ = std::move(queue_.front());
          queue_.pop_front();
          left_.store(size(), std::memory_order_relaxed);
          posted_.fetch_add(1, std::memory_order_release);
          posted = true;
        }
      }
      if (posted) cv_.notify_all();
    }
  }
}

static std::mutex g_pool_mu;
static std::unique_ptr<ThreadPool> g_pool;

ThreadPool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(0);
  return *g_pool;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_pool.reset();  // joins the old threads after their queued jobs... callers must sync first
  g_pool = std::make_unique<ThreadPool>(n);
}

int num_threads() { return pool().size(); }

}  // namespace tandem
