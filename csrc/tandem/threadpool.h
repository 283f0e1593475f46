// Persistent thread pool: n threads pinned one per physical core, created once. A Job is run by all threads
// together (each calls run(tid)); jobs queue in FIFO order; submit() returns at once, Job::wait() blocks.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
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

 private:
  friend class ThreadPool;
  void finish_one(int nthreads);
  std::atomic<int> finished_{0};
  std::atomic<bool> done_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Spin barrier for the threads of one job.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait();

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};

class ThreadPool {
 public:
  explicit ThreadPool(int nthreads);
  ~ThreadPool();
  int size() const { return (int)workers_.size(); }
  void submit(std::shared_ptr<Job> job);

 private:
  void loop(int tid);
  std::vector<std::thread> workers_;
  std::vector<int> cpus_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::shared_ptr<Job> current_;
  std::atomic<uint64_t> posted_{0};
  std::atomic<int> left_{0};  // threads still in the current job
  bool stop_ = false;
};

int physical_cores();             // physical cores in this process's CPU affinity set
std::vector<int> core_cpu_list();  // one logical CPU per physical core, in the affinity set
ThreadPool& pool();                // the shared pool (created on first use)
void set_num_threads(int n);       // recreate the shared pool (n <= 0: physical cores)
int num_threads();

}  // namespace tandem
