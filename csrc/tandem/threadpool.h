// Persistent thread pool: n threads pinned one per physical core, created once. A Job is run by all threads
// together (each calls run(tid)); jobs queue in FIFO order; submit() returns at once, Job::wait() blocks.
#pragma once
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace tandem {

class Job {
 public:
  virtual ~Job() = default;
  virtual void run(int tid, int nthreads) = 0;  // called once per pool thread
  void wait();                                  // blocks until every thread has returned from run
  bool done() const { return done_.load(std::memory_order_acquire); }
  std::function<void()> on_done;  // run by the last thread out, before wait() returns (a doorbell's `done`)
  std::chrono::steady_clock::time_point posted_at;  // when the pool made it the running job (profiles)

 private:
  friend class ThreadPool;
  void finish_one(int nthreads);
  std::atomic<int> finished_{0};
  std::atomic<bool> done_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Barrier for the threads of one job: spins a bounded while (phases are short), then sleeps on a futex, so an
// oversubscribed machine (more runnable threads than cores) does not burn the time slices it needs.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait();

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
  std::atomic<int> sleepers_{0};
};

// A growing, reused buffer (2 MB aligned, transparent huge pages asked for): per-call scratch of the kernels
// without page faults on every call. Only used from inside a running job (jobs run one at a time).
class Scratch {
 public:
  Scratch() = default;
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  uint8_t* get(size_t bytes);
  uint8_t* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
};

// Memory for weights: anonymous pages, huge pages asked for, placed on NUMA node `node` (OS id; -1: no
// placement, first touch decides). Freed by the destructor.
struct NodeMemory {
  uint8_t* p = nullptr;
  size_t n = 0;
  NodeMemory(size_t bytes, int node);
  ~NodeMemory();
  NodeMemory(const NodeMemory&) = delete;
  NodeMemory& operator=(const NodeMemory&) = delete;
};

class ThreadPool {
 public:
  // nthreads <= 0: one per physical core. numa_nodes <= 0: the NUMA nodes of the pinned cores (from /sys);
  // otherwise that many groups of threads (contiguous), placed on real nodes only if the count matches.
  // spin_us: how long an idle thread spins for the next job before it sleeps.
  ThreadPool(int nthreads, int numa_nodes, int spin_us = 2000);
  ~ThreadPool();
  int size() const { return (int)workers_.size(); }
  void submit(std::shared_ptr<Job> job);
  void wake();  // idle threads re-check why they sleep (a doorbell was registered: thread 0 polls while any is)
  int nodes() const { return (int)node_os_.size(); }
  int thread_node(int tid) const { return thread_node_[tid]; }  // 0 .. nodes() - 1
  int node_os_id(int node) const { return node_os_[node]; }     // OS node id, -1 when the split is virtual
  Scratch& scratch(int slot) { return scratch_[slot]; }          // slot < kScratchSlots
  const std::vector<int>& free_cpus() const { return free_; }    // one CPU per physical core left to others
  uint64_t generation() const { return generation_; }             // distinct for every pool made
  static constexpr int kScratchSlots = 8;

 private:
  void loop(int tid);
  void wait_for_job(int tid, uint64_t seen);
  std::vector<std::thread> workers_;
  std::vector<int> cpus_, free_;
  uint64_t generation_;
  std::vector<int> thread_node_, node_os_;
  Scratch scratch_[kScratchSlots];
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::shared_ptr<Job> current_;
  std::atomic<Job*> running_{nullptr};  // current_, read by the threads without the mutex
  std::atomic<uint64_t> posted_{0};
  std::atomic<int> left_{0};  // threads still in the current job
  std::atomic<bool> stop_{false};
  int spin_us_ = 2000;
};

int physical_cores();             // physical cores in this process's CPU affinity set
std::vector<int> core_cpu_list();  // one logical CPU per physical core, in the affinity set
int cpu_numa_node(int cpu);        // OS NUMA node of a logical CPU (0 if /sys does not say)
ThreadPool& pool();                // the shared pool (created on first use)
void set_num_threads(int n);       // recreate the shared pool (n <= 0: physical cores)
// Idle spin of the shared pool's threads before they sleep, microseconds: TANDEM_CPU_SPIN_US, read each time the
// pool is (re)created (default 2000: decode calls come back to back; a GPU host wants it short, see ops/moe.py).
int num_threads();
// NUMA groups of the shared pool: n <= 0 detects (TANDEM_NUMA_NODES overrides at first use); recreates the
// pool. Expert layers built afterwards split their intermediate dimension over this many nodes.
void set_numa_nodes(int n);
int numa_nodes();
// Pin the calling thread (CUDA's host-function thread) to the cores the shared pool leaves free, once per pool:
// left floating, it lands on cores whose pool threads spin, and a kernel call waits time slices for it.
// No-op on the process's main thread or when no core is free; TANDEM_PIN_DRIVER=0 (read per pool) unpins.
void pin_to_free_cores();

}  // namespace tandem
