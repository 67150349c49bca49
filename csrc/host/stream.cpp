// HostStream: the host backend's stream, a queue of work run in order on a thread of its own.
#include <exception>

#include "fmoe.h"
#include "host/host_backend.h"

namespace fmoe::host {

HostStream::~HostStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void HostStream::enqueue(Work work) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The thread first: if it cannot be started, nothing is queued that no one would run.
    if (!thread_.joinable()) thread_ = std::thread([this] { run_queue(); });
    queue_.push_back(std::move(work));
  }
  wake_.notify_one();
}

bool HostStream::idle() {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.empty() && !running_;
}

Status HostStream::synchronize() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return queue_.empty() && !running_; });
  if (error_ == FMOE_OK) return FMOE_OK;
  const Status e = error_;
  const std::string message = std::move(error_message_);
  error_ = FMOE_OK;
  error_message_.clear();
  return set_error(e, "%s", message.c_str());
}

void HostStream::run_queue() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // What was queued before the stream's destruction still runs (its results may be awaited).
    wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;
    Work work = std::move(queue_.front());
    queue_.pop_front();
    running_ = true;
    lock.unlock();
    Status st = FMOE_OK;
    std::string message;
    try {
      st = work();
      if (st != FMOE_OK) message = fmoe_last_error();
    } catch (const std::exception& e) {
      st = FMOE_ERR_INTERNAL;
      message = std::string("host stream: internal error: ") + e.what();
    }
    work = nullptr;  // the closure's captures are released before the stream counts as idle
    lock.lock();
    running_ = false;
    if (st != FMOE_OK && error_ == FMOE_OK) {
      error_ = st;
      error_message_ = std::move(message);
    }
    if (queue_.empty()) idle_.notify_all();
  }
}

}  // namespace fmoe::host
