// A small fork-join pool for the host backend's row and column loops. The calling thread works
// too; one parallel region runs at a time (regions never nest).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fmoe::host {

class ThreadPool {
 public:
  // `threads` counts the caller: threads - 1 workers are started.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return int(workers_.size()) + 1; }

  // Calls task(i) for every i in [0, tasks) across the pool; returns when all are done. The first
  // exception a task throws is rethrown here (the remaining tasks are abandoned).
  void run(int64_t tasks, const std::function<void(int64_t)>& task);

  // Splits [begin, end) into chunks of at least `grain` indices and calls body(lo, hi) on each.
  void parallel_for(int64_t begin, int64_t end, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& body);

 private:
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // serialises regions
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// Thread count of the host backend: FMOE_HOST_THREADS when set (>= 1), else the hardware's.
int default_host_threads();

}  // namespace fmoe::host
