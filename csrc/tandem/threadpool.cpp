#include "tandem/threadpool.h"

#include "tandem/doorbell.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <new>

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
    if (on_done) on_done();
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

static long futex(std::atomic<int>* addr, int op, int val) {
  return syscall(SYS_futex, reinterpret_cast<int*>(addr), op, val, nullptr, nullptr, 0);
}

void Barrier::arrive_and_wait() {
  const int phase = phase_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
    count_.store(0, std::memory_order_relaxed);
    phase_.fetch_add(1);                // seq_cst: ordered against the sleepers_ load below
    if (sleepers_.load() > 0) futex(&phase_, FUTEX_WAKE_PRIVATE, INT_MAX);
    return;
  }
  // ~50-100 us of pause: a balanced phase ends well within it; past it, another thread is probably descheduled
  for (int i = 0; i < 2048; i++) {
    if (phase_.load(std::memory_order_acquire) != phase) return;
    cpu_relax();
  }
  for (int i = 0; i < 4; i++) {
    if (phase_.load(std::memory_order_acquire) != phase) return;
    sched_yield();
  }
  sleepers_.fetch_add(1);
  while (phase_.load() == phase) futex(&phase_, FUTEX_WAIT_PRIVATE, phase);  // returns at once if it moved
  sleepers_.fetch_sub(1);
}

Scratch::~Scratch() {
  if (p_) munmap(p_, n_);
}

uint8_t* Scratch::get(size_t bytes) {
  if (bytes <= n_) return p_;
  if (p_) munmap(p_, n_);
  const size_t huge = (size_t)2 << 20;
  n_ = std::max(huge, (bytes + huge - 1) / huge * huge);
  void* p = mmap(nullptr, n_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    p_ = nullptr;
    n_ = 0;
    throw std::bad_alloc();
  }
  madvise(p, n_, MADV_HUGEPAGE);
  p_ = (uint8_t*)p;
  return p_;
}

NodeMemory::NodeMemory(size_t bytes, int node) {
  const size_t huge = (size_t)2 << 20;
  n = std::max(huge, (bytes + huge - 1) / huge * huge);
  void* q = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (q == MAP_FAILED) throw std::bad_alloc();
  madvise(q, n, MADV_HUGEPAGE);
  if (node >= 0 && node < 64) {  // MPOL_PREFERRED: this node while it has memory; failure leaves first touch
    const unsigned long mask = 1ul << node;
    constexpr int kMpolPreferred = 1;
    syscall(SYS_mbind, q, n, kMpolPreferred, &mask, 64, 0);
  }
  p = (uint8_t*)q;
}

NodeMemory::~NodeMemory() {
  if (p) munmap(p, n);
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

int cpu_numa_node(int cpu) {  // /sys/devices/system/cpu/cpuN/ holds a link "nodeK"
  const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu);
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  int node = 0;
  while (dirent* e = readdir(d))
    if (std::strncmp(e->d_name, "node", 4) == 0 && e->d_name[4] >= '0' && e->d_name[4] <= '9') {
      node = (int)std::strtol(e->d_name + 4, nullptr, 10);
      break;
    }
  closedir(d);
  return node;
}

static std::atomic<uint64_t> g_generation{0};

ThreadPool::ThreadPool(int nthreads, int numa_nodes, int spin_us)
    : cpus_(core_cpu_list()), generation_(++g_generation), spin_us_(spin_us) {
  if (nthreads <= 0) nthreads = (int)cpus_.size();
  if (nthreads < (int)cpus_.size()) free_.assign(cpus_.begin() + nthreads, cpus_.end());
  std::map<int, int> dense;  // OS node -> 0..n-1, in order of the threads' cores
  std::vector<int> os_of_thread(nthreads);
  for (int t = 0; t < nthreads; t++) {
    os_of_thread[t] = cpu_numa_node(cpus_[t % cpus_.size()]);
    if (!dense.count(os_of_thread[t])) {
      const int k = (int)dense.size();
      dense[os_of_thread[t]] = k;
      node_os_.push_back(os_of_thread[t]);
    }
  }
  thread_node_.resize(nthreads);
  if (numa_nodes <= 0 || numa_nodes == (int)node_os_.size()) {
    for (int t = 0; t < nthreads; t++) thread_node_[t] = dense[os_of_thread[t]];
  } else {  // forced split (tests on a one-node machine, or a chosen grouping): no placement
    numa_nodes = std::min(numa_nodes, nthreads);
    node_os_.assign(numa_nodes, -1);
    for (int t = 0; t < nthreads; t++) thread_node_[t] = t * numa_nodes / nthreads;
  }
  for (int t = 0; t < nthreads; t++) workers_.emplace_back([this, t] { loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
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
    current_->posted_at = std::chrono::steady_clock::now();
    running_.store(current_.get(), std::memory_order_relaxed);
    left_.store(size(), std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
}

// Spin spin_us_ for the next job (decode calls come back to back), then sleep. Thread 0 also polls the doorbells
// while any is registered (a CUDA stream rings one per hybrid layer) and naps instead of sleeping.
void ThreadPool::wait_for_job(int tid, uint64_t seen) {
  auto t0 = std::chrono::steady_clock::now();
  const auto spin = std::chrono::microseconds(spin_us_);
  for (int i = 0; posted_.load(std::memory_order_acquire) == seen; i++) {
    cpu_relax();
    const bool bells = tid == 0 && doorbells_registered();
    if (bells && doorbell_poll(*this)) t0 = std::chrono::steady_clock::now();
    if ((i & 127) != 127) continue;
    const auto idle = std::chrono::steady_clock::now() - t0;
    if (idle < spin) continue;
    if (bells) {
      doorbell_nap(std::chrono::duration_cast<std::chrono::nanoseconds>(idle).count());
      continue;
    }
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return posted_.load() != seen || (tid == 0 && doorbells_registered()); });
    t0 = std::chrono::steady_clock::now();
  }
}

void ThreadPool::wake() {
  { std::lock_guard<std::mutex> lk(mu_); }
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
    wait_for_job(tid, seen);
    // No lock here: 15 threads taking one mutex at once queue on its futex, a wake-up each (12-22 us from the
    // first thread in to the last on the H200 host's Xeon). `running_` was stored before `posted_` moved, and
    // current_ keeps the job alive until every thread is out (left_).
    seen = posted_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_acquire)) return;
    Job* job = running_.load(std::memory_order_relaxed);
    job->run(tid, size());
    job->finish_one(size());
    if (left_.fetch_sub(1, std::memory_order_acq_rel) == 1) {  // last one out starts the next job
      bool posted = false;
      {
        std::lock_guard<std::mutex> lk(mu_);
        current_.reset();
        running_.store(nullptr, std::memory_order_relaxed);
        if (!queue_.empty()) {
          current_ = std::move(queue_.front());
          queue_.pop_front();
          current_->posted_at = std::chrono::steady_clock::now();
          running_.store(current_.get(), std::memory_order_relaxed);
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
static int g_threads = 0, g_numa = -1;  // -1: not read from TANDEM_NUMA_NODES yet

static void make_pool() {
  if (g_numa < 0) {
    const char* env = std::getenv("TANDEM_NUMA_NODES");
    g_numa = env && *env ? std::max(0, (int)std::strtol(env, nullptr, 10)) : 0;
  }
  const char* spin = std::getenv("TANDEM_CPU_SPIN_US");
  const int spin_us = spin && *spin ? std::max(0, (int)std::strtol(spin, nullptr, 10)) : 2000;
  g_pool.reset();  // joins the old threads after their queued jobs... callers must sync first
  g_pool = std::make_unique<ThreadPool>(g_threads, g_numa, spin_us);
}

ThreadPool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) make_pool();
  return *g_pool;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_threads = std::max(0, n);
  make_pool();
}

int num_threads() { return pool().size(); }

void set_numa_nodes(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_numa = std::max(0, n);
  make_pool();
}

int numa_nodes() { return pool().nodes(); }

void pin_to_free_cores() {
  thread_local uint64_t pinned_for = 0;
  // never the main thread: threads it starts later (OpenMP's) would inherit the narrow mask
  if (syscall(SYS_gettid) == getpid()) return;
  ThreadPool& p = pool();
  if (pinned_for == p.generation()) return;
  pinned_for = p.generation();  // TANDEM_PIN_DRIVER is read again for each new pool
  const char* env = std::getenv("TANDEM_PIN_DRIVER");
  cpu_set_t set;
  CPU_ZERO(&set);
  if (env && std::strcmp(env, "0") == 0) {
    if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) return;  // the process's mask: unpinned
  } else {
    if (p.free_cpus().empty()) return;
    for (int c : p.free_cpus()) CPU_SET(c, &set);
  }
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

}  // namespace tandem
