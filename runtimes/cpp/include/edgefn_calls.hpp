// edgefn worker hand-offs from the frame-reading thread to the others: the answers of
// building-block calls a handler thread waits on (Calls; edgefn_worker.hpp sends the CALL
// frames) and config-change notifications for the delivering thread (Notices).
#ifndef EDGEFN_CALLS_HPP
#define EDGEFN_CALLS_HPP

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

#include "edgefn.h"
#include "edgefn_frames.hpp"

namespace edgefn {
namespace worker {

// Building-block calls in flight: call id -> the slot its answer goes to. Handler threads wait
// on their slot; the main thread (which reads every frame) fills it. A handler that stops
// waiting (its deadline passed) removes its slot, and a late answer for it is dropped.
class Calls {
   public:
    struct Slot {
        bool done = false;
        bool ok = false;
        std::string code, data;
    };

    std::uint64_t open(std::shared_ptr<Slot> slot) {
        std::lock_guard<std::mutex> lock(mu_);
        std::uint64_t id = ++last_;
        slots_[id] = std::move(slot);
        return id;
    }

    // Waits until answered or `until`; false on timeout (the slot is then forgotten).
    bool wait(std::uint64_t id, const std::shared_ptr<Slot>& slot,
              std::chrono::steady_clock::time_point until) {
        std::unique_lock<std::mutex> lock(mu_);
        bool answered = cv_.wait_until(lock, until, [&] { return slot->done; });
        slots_.erase(id);
        return answered;
    }

    // Main thread: an answer arrived. False when the id was never used by this worker.
    bool answer(std::uint64_t id, bool ok, std::string code, std::string data) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (id == 0 || id > last_) return false;
            auto it = slots_.find(id);
            if (it == slots_.end()) return true;  // its caller stopped waiting: drop it
            it->second->ok = ok;
            it->second->code = std::move(code);
            it->second->data = std::move(data);
            it->second->done = true;
        }
        cv_.notify_all();
        return true;
    }

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    std::uint64_t last_ = 0;
    std::unordered_map<std::uint64_t, std::shared_ptr<Slot>> slots_;
};

// The config-change notifications of one worker: the main thread posts, one thread delivers.
// One slot: a config that arrives while an older one waits replaces it, so a slow listener gets
// the newest config instead of a backlog (as Go's ConfigChanges channel does).
class Notices {
   public:
    explicit Notices(Writer& writer) : writer_(writer) {
        if (supported()) thread_ = std::thread([this] { serve(); });
    }
    ~Notices() { stop(); }

    static bool supported() { return &edgefn_config_changed != nullptr; }

    void post(std::string config) {
        if (!thread_.joinable()) return;
        {
            std::lock_guard<std::mutex> lock(mu_);
            pending_ = std::move(config);
            has_pending_ = true;
        }
        cv_.notify_one();
    }

    // A config still waiting is dropped: the worker is going away.
    void stop() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stopping_ = true;
        }
        cv_.notify_one();
        if (thread_.joinable()) thread_.join();
    }

   private:
    static void on_log(void* host, std::int32_t level, const char* msg, std::size_t len) {
        static const char* const names[] = {"debug", "info", "warn", "error"};
        try {
            std::string header;
            put_tlv(header, kLogLevel, level >= 0 && level <= 3 ? names[level] : "info");
            static_cast<Notices*>(host)->writer_.send(kLog, 0, 0, header, msg, len);
        } catch (...) {
        }
    }

    void serve() {
        for (;;) {
            std::string config;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [this] { return stopping_ || has_pending_; });
                if (stopping_) return;
                config.swap(pending_);
                has_pending_ = false;
            }
            edgefn_config_changed(config.data(), config.size(), this, &Notices::on_log);
        }
    }

    Writer& writer_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::string pending_;
    bool has_pending_ = false;
    bool stopping_ = false;
    std::thread thread_;
};

}  // namespace worker
}  // namespace edgefn

#endif  // EDGEFN_CALLS_HPP
