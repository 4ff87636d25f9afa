// edgefn isolated C++ worker: the main() that turns a function library into a worker process
// speaking docs/protocol.md over stdin/stdout. runtimes/cppbuild.py links it in through
// runtimes/cpp/worker_main.cpp; function authors never include this file.
//
// Flow:
//   1. Ask the kernel for SIGKILL when the parent dies; ignore SIGPIPE (a closed pipe becomes an
//      error we handle, not a silent death).
//   2. Keep a private duplicate of fd 1 for frames and point fd 1 at stderr, so printf and
//      std::cout in user code end up in the agent's log instead of corrupting the framing.
//   3. Check the linked library's ABI version, send READY with RUNTIME "cpp/<abi>".
//   4. The main thread reads frames: INVOKE goes on a queue served by EDGEFN_CONCURRENCY threads
//      (default 4), PING is answered at once, SHUTDOWN or EOF stops reading.
//   5. Each answer (RESULT/ERROR) and each log line is written as one frame by whichever thread
//      has it, under a single mutex, so frames never interleave. Answers leave in any order.
//   6. On SHUTDOWN or EOF: the queue is drained, the threads are joined, exit 0.
// Building blocks: a handler's ctx.invoke/publish/state/config/secret sends a CALL frame from its
// own thread and waits for the CALL_RESULT/CALL_ERROR, which the main thread hands over (Calls);
// a wait never outlives the invocation's deadline.
// Config changes: when the library defines edgefn_config_changed (EDGEFN_FUNCTION does), READY
// announces FEATURES "notify"; the main thread puts each NOTIFY `config` payload in a one-slot
// mailbox (Notices) and a notification thread of its own hands it to the library, so a slow or
// throwing listener never stalls frame reading (PING, CALL answers) or kills the worker.
// A crash of the handler (segfault, abort) takes down only this process; the pool replaces it.
#ifndef EDGEFN_WORKER_HPP
#define EDGEFN_WORKER_HPP

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "edgefn.h"
#include "edgefn_calls.hpp"
#include "edgefn_frames.hpp"

// Weak: a library that writes the C ABI by hand may not define it (then no FEATURES "notify").
extern "C" int32_t edgefn_config_changed(const char* json, size_t len, void* host,
                                         void (*log)(void*, int32_t, const char*, size_t))
    __attribute__((weak));

namespace edgefn {
namespace worker {

struct Job {
    std::uint64_t id = 0;
    std::uint16_t flags = 0;
    std::string body;  // the whole frame body; the payload is its tail
    std::size_t payload_at = 0;
    std::string request_id, trace_id, function, version, content_type;
    bool has_deadline = false;
    std::chrono::steady_clock::time_point deadline;
};

class Worker;

// Per-call state behind edgefn_call.host: the answer buffer the library writes into.
struct CallState {
    Worker* worker;
    const Job* job;
    std::unique_ptr<std::uint8_t[]> out;
    std::size_t out_len = 0;
    std::string content_type;
};

class Worker {
   public:
    Worker(int out_fd, int threads, std::string function, std::string version)
        : writer_(out_fd), function_(std::move(function)), version_(std::move(version)) {
        for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { serve(); });
    }

    Writer& writer() { return writer_; }

    void submit(Job job) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            queue_.push_back(std::move(job));
        }
        cv_.notify_one();
    }

    // Finish everything queued and running, then return (SHUTDOWN and EOF).
    void drain() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stopping_ = true;
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();
        threads_.clear();
    }

    void send_error(std::uint64_t id, std::string_view code, std::string_view message) {
        std::string header;
        put_tlv(header, kErrorCode, code);
        writer_.send(kError, 0, id, header, message.data(), message.size());
    }

    void log(const Job& job, std::int32_t level, const char* msg, std::size_t len) {
        static const char* const names[] = {"debug", "info", "warn", "error"};
        const char* name = level >= 0 && level <= 3 ? names[level] : "info";
        std::string header;
        put_tlv(header, kLogLevel, name);
        if (!job.trace_id.empty()) put_tlv(header, kTraceId, job.trace_id);
        writer_.send(kLog, 0, job.id, header, msg, len);
    }

    const std::string& function() const { return function_; }
    const std::string& version() const { return version_; }
    Calls& calls() { return calls_; }

   private:
    void serve() {
        for (;;) {
            Job job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
                if (queue_.empty()) return;  // stopping and nothing left
                job = std::move(queue_.front());
                queue_.pop_front();
            }
            run(job);
        }
    }

    static std::uint8_t* on_alloc(void* host, std::size_t n) {
        auto* st = static_cast<CallState*>(host);
        st->out.reset(new (std::nothrow) std::uint8_t[n ? n : 1]);
        st->out_len = st->out ? n : 0;
        return st->out.get();
    }
    static void on_content_type(void* host, const char* data, std::size_t len) {
        auto* st = static_cast<CallState*>(host);
        try {
            st->content_type.assign(data, len);
        } catch (...) {
        }
    }
    static void on_log(void* host, std::int32_t level, const char* msg, std::size_t len) {
        auto* st = static_cast<CallState*>(host);
        try {
            st->worker->log(*st->job, level, msg, len);
        } catch (...) {
        }
    }

    // edgefn_call.call: CALL frame out, wait for its answer (main thread), hand it to `sink`.
    static std::int32_t on_call(void* host, const char* op, std::size_t op_len, const char* target,
                                std::size_t target_len, const std::uint8_t* payload,
                                std::size_t payload_len, const char* ctype, std::size_t ctype_len,
                                void* sink_ctx,
                                void (*sink)(void*, const char*, std::size_t, const std::uint8_t*,
                                             std::size_t)) {
        auto* st = static_cast<CallState*>(host);
        auto fail = [&](std::string_view code, std::string_view msg) {
            sink(sink_ctx, code.data(), code.size(), reinterpret_cast<const std::uint8_t*>(msg.data()),
                 msg.size());
            return EDGEFN_ERROR;
        };
        try {
            auto slot = std::make_shared<Calls::Slot>();
            Calls& calls = st->worker->calls();
            std::uint64_t id = calls.open(slot);
            std::string header;
            put_tlv(header, kOp, std::string_view(op, op_len));
            put_tlv(header, kTarget, std::string_view(target, target_len));
            put_tlv(header, kParentId, u32_bytes(static_cast<std::uint32_t>(st->job->id)));
            if (ctype_len) put_tlv(header, kContentType, std::string_view(ctype, ctype_len));
            st->worker->writer().send(kCall, 0, id, header, payload, payload_len);
            // The agent bounds the call by the parent's deadline and answers `timeout` itself;
            // waiting until the deadline (plus a grace for that answer) is only a backstop.
            auto until = st->job->has_deadline
                             ? st->job->deadline + std::chrono::milliseconds(100)
                             : std::chrono::steady_clock::now() + std::chrono::hours(24);
            if (!calls.wait(id, slot, until))
                return fail("timeout", "no answer to the call before the invocation's deadline");
            if (!slot->ok) return fail(slot->code.empty() ? "unavailable" : slot->code, slot->data);
            sink(sink_ctx, "", 0, reinterpret_cast<const std::uint8_t*>(slot->data.data()),
                 slot->data.size());
            return EDGEFN_OK;
        } catch (const std::bad_alloc&) {
            return fail("unavailable", "out of memory making the call");
        }
    }

    static edgefn_str str(const std::string& s) { return edgefn_str{s.data(), s.size()}; }

    void run(const Job& job) {
        std::uint32_t left = 0xffffffffu;
        if (job.has_deadline) {
            auto now = std::chrono::steady_clock::now();
            if (now >= job.deadline) {
                // It waited in our queue past its deadline: running it would waste a thread.
                send_error(job.id, "deadline_exceeded",
                           "the request's deadline passed while it waited for a worker thread");
                return;
            }
            auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(job.deadline - now);
            left = static_cast<std::uint32_t>(ms.count());
        }
        CallState st{this, &job, nullptr, 0, {}};
        edgefn_call call{};
        call.payload = reinterpret_cast<const std::uint8_t*>(job.body.data() + job.payload_at);
        call.payload_len = job.body.size() - job.payload_at;
        call.request_id = str(job.request_id);
        call.function = str(job.function.empty() ? function_ : job.function);
        call.version = str(job.version.empty() ? version_ : job.version);
        call.trace_id = str(job.trace_id);
        call.content_type = str(job.content_type);
        call.flags = (job.flags & kFlagJson) ? EDGEFN_FLAG_JSON : 0u;
        call.deadline_ms = left;
        call.host = &st;
        call.alloc = &Worker::on_alloc;
        call.set_content_type = &Worker::on_content_type;
        call.log = &Worker::on_log;
        call.call = &Worker::on_call;

        std::int32_t status = edgefn_invoke(&call);

        if (status == EDGEFN_OK) {
            std::string header;
            std::uint16_t flags = 0;
            if (!st.content_type.empty()) {
                put_tlv(header, kContentType, st.content_type);
                if (st.content_type.compare(0, 16, "application/json") == 0) flags = kFlagJson;
            }
            writer_.send(kResult, flags, job.id, header, st.out.get(), st.out_len);
        } else {
            std::string_view msg(reinterpret_cast<const char*>(st.out.get()), st.out_len);
            if (msg.empty()) msg = "function failed";
            send_error(job.id, "function_error", msg);
        }
    }

    Writer writer_;
    std::string function_, version_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Job> queue_;
    bool stopping_ = false;
    std::vector<std::thread> threads_;
    Calls calls_;
};

// Decodes an INVOKE body into `job`; returns an error message, empty when it is fine.
inline std::string parse_invoke(Job& job) {
    const auto* p = reinterpret_cast<const unsigned char*>(job.body.data());
    std::uint32_t header_len = get_u32(p + 12);
    std::size_t end = kFixedLen + std::size_t(header_len);
    std::size_t pos = kFixedLen;
    while (pos < end) {
        if (pos + 3 > end) return "truncated header entry";
        std::uint8_t key = p[pos];
        std::size_t len = (std::size_t(p[pos + 1]) << 8) | p[pos + 2];
        pos += 3;
        if (pos + len > end) return "header entry " + std::to_string(key) + " runs past the header";
        std::string_view value(reinterpret_cast<const char*>(p + pos), len);
        switch (key) {
            case kDeadlineMs:
                if (len != 4) return "DEADLINE_MS must be 4 bytes";
                job.has_deadline = true;
                job.deadline = std::chrono::steady_clock::now() +
                               std::chrono::milliseconds(get_u32(p + pos));
                break;
            case kTraceId: job.trace_id.assign(value); break;
            case kFunction: job.function.assign(value); break;
            case kVersion: job.version.assign(value); break;
            case kContentType: job.content_type.assign(value); break;
            default: break;  // unknown keys are skipped: new keys need no version bump
        }
        pos += len;
    }
    job.payload_at = end;
    return {};
}

// The value of header `key` of a frame body into `out`; an error message when malformed.
inline std::string header_value(const std::string& body, std::uint8_t key, std::string& out) {
    const auto* p = reinterpret_cast<const unsigned char*>(body.data());
    std::size_t end = kFixedLen + std::size_t(get_u32(p + 12));
    for (std::size_t pos = kFixedLen; pos < end;) {
        if (pos + 3 > end) return "truncated header entry";
        std::size_t len = (std::size_t(p[pos + 1]) << 8) | p[pos + 2];
        if (pos + 3 + len > end) return "header entry runs past the header";
        if (p[pos] == key) out.assign(reinterpret_cast<const char*>(p + pos + 3), len);
        pos += 3 + len;
    }
    return {};
}

inline int env_threads() {
    const char* raw = std::getenv("EDGEFN_CONCURRENCY");
    if (raw == nullptr || *raw == '\0') return kDefaultThreads;
    char* stop = nullptr;
    long n = std::strtol(raw, &stop, 10);
    if (stop == raw || *stop != '\0' || n < 1) return kDefaultThreads;
    return n > kMaxThreads ? kMaxThreads : static_cast<int>(n);
}

inline std::string env_text(const char* name) {
    const char* raw = std::getenv(name);
    return raw ? std::string(raw) : std::string();
}

inline int run() {
    // 1. Die with the agent even if it is SIGKILLed. If it died before prctl took effect we
    // were already reparented: nobody will ever read our answers.
    pid_t parent = ::getppid();
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) die(1, "parent exited during start-up");
    ::signal(SIGPIPE, SIG_IGN);

    // 2. stdout belongs to the protocol: frames go to a private duplicate, fd 1 becomes stderr.
    int out_fd = ::fcntl(1, F_DUPFD_CLOEXEC, 3);
    if (out_fd < 0) die(1, std::string("stdout is not open: ") + std::strerror(errno));
    if (::dup2(2, 1) < 0) die(1, std::string("cannot redirect stdout: ") + std::strerror(errno));
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // user printf lines reach the log promptly

    // 3. Library and host come from one build, but say so loudly if they ever disagree.
    if (edgefn_abi_version() != EDGEFN_ABI_VERSION)
        die(1, "function library ABI " + std::to_string(edgefn_abi_version()) +
                   " does not match the worker's ABI " + std::to_string(EDGEFN_ABI_VERSION));

    Worker worker(out_fd, env_threads(), env_text("EDGEFN_FUNCTION"), env_text("EDGEFN_VERSION"));
    Notices notices(worker.writer());
    std::string ready;
    put_tlv(ready, kRuntime, "cpp/" + std::to_string(EDGEFN_ABI_VERSION));
    if (Notices::supported()) put_tlv(ready, kFeatures, "notify");
    worker.writer().send(kReady, 0, 0, ready, nullptr, 0);

    // 4. Read frames until SHUTDOWN or EOF.
    Reader reader(0);
    std::string body;
    for (;;) {
        if (!reader.next(body)) break;  // EOF: the agent went away or closed our stdin
        const auto* p = reinterpret_cast<const unsigned char*>(body.data());
        if (p[0] != kProtocolVersion)
            die(2, "protocol violation: unsupported protocol version " + std::to_string(p[0]));
        std::uint8_t kind = p[1];
        std::uint16_t flags = static_cast<std::uint16_t>((p[2] << 8) | p[3]);
        std::uint64_t id = get_u64(p + 4);
        std::uint32_t header_len = get_u32(p + 12);
        if (std::size_t(kFixedLen) + header_len > body.size())
            die(2, "protocol violation: header length runs past the frame");
        if (kind == kInvoke) {
            Job job;
            job.id = id;
            job.flags = flags;
            job.request_id = std::to_string(id);
            job.body.swap(body);
            std::string bad = parse_invoke(job);
            if (!bad.empty()) {
                worker.send_error(id, "bad_request", "cannot decode the request: " + bad);
                continue;
            }
            worker.submit(std::move(job));
        } else if (kind == kCallResult || kind == kCallError) {
            std::string code, bad;
            if (kind == kCallError) bad = header_value(body, kErrorCode, code);
            if (!bad.empty()) die(2, "protocol violation: CALL_ERROR " + bad);
            std::string data = body.substr(kFixedLen + header_len);
            if (!worker.calls().answer(id, kind == kCallResult, std::move(code), std::move(data)))
                die(2, "protocol violation: answer for call " + std::to_string(id) +
                           " that this worker never made");
        } else if (kind == kNotify) {
            // No answer; an OP this host does not know is ignored, like an unknown header key.
            std::string op;
            std::string bad = header_value(body, kOp, op);
            if (!bad.empty()) die(2, "protocol violation: NOTIFY " + bad);
            if (op == "config") notices.post(body.substr(kFixedLen + header_len));
        } else if (kind == kPing) {
            worker.writer().send(kPong, 0, id, std::string(), nullptr, 0);
        } else if (kind == kShutdown) {
            break;
        } else if (kind >= kInvoke && kind <= kCall) {
            // A worker->agent kind sent to us: harmless, but worth a line in the log.
            std::fprintf(stderr, "edgefn worker: ignoring frame of kind %u from the agent\n", kind);
        } else {
            die(2, "protocol violation: unknown frame kind " + std::to_string(kind));
        }
    }
    // 6. Finish what is in flight, then leave.
    notices.stop();
    worker.drain();
    std::fflush(stdout);
    std::fflush(stderr);
    return 0;
}

}  // namespace worker
}  // namespace edgefn

#endif  // EDGEFN_WORKER_HPP
