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

namespace edgefn {
namespace worker {

constexpr std::uint8_t kProtocolVersion = 1;
constexpr std::uint32_t kMaxFrame = 64u * 1024u * 1024u;  // same bound as runtimes/protocol.py
constexpr std::uint32_t kFixedLen = 16;
constexpr std::uint16_t kFlagJson = 1;
// Threads per worker: EDGEFN_CONCURRENCY (the manifest's pool concurrency), clamped. Beyond a
// few dozen threads a CPU-bound worker only thrashes; the agent still bounds in-flight requests.
constexpr int kDefaultThreads = 4;
constexpr int kMaxThreads = 64;
constexpr std::size_t kReadChunk = 64 * 1024;

enum Kind : std::uint8_t {
    kInvoke = 1,
    kResult = 2,
    kError = 3,
    kLog = 4,
    kPing = 5,
    kPong = 6,
    kShutdown = 7,
    kReady = 8,
};

enum Key : std::uint8_t {
    kDeadlineMs = 1,
    kTraceId = 2,
    kFunction = 3,
    kVersion = 4,
    kErrorCode = 5,
    kLogLevel = 6,
    kContentType = 7,
    kRuntime = 8,
};

[[noreturn]] inline void die(int status, const std::string& why) {
    std::string line = "edgefn worker: " + why + "\n";
    ssize_t ignored = ::write(2, line.data(), line.size());
    (void)ignored;
    ::_exit(status);
}

inline void put_u16(std::string& s, std::uint16_t v) {
    s.push_back(static_cast<char>(v >> 8));
    s.push_back(static_cast<char>(v & 0xff));
}
inline void put_u32(std::string& s, std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) s.push_back(static_cast<char>((v >> shift) & 0xff));
}
inline void put_u64(std::string& s, std::uint64_t v) {
    for (int shift = 56; shift >= 0; shift -= 8) s.push_back(static_cast<char>((v >> shift) & 0xff));
}
inline std::uint32_t get_u32(const unsigned char* p) {
    return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) |
           std::uint32_t(p[3]);
}
inline std::uint64_t get_u64(const unsigned char* p) {
    return (std::uint64_t(get_u32(p)) << 32) | get_u32(p + 4);
}
// One TLV header entry; values longer than a u16 can say are cut (only log text could be).
inline void put_tlv(std::string& s, std::uint8_t key, std::string_view value) {
    if (value.size() > 0xffff) value = value.substr(0, 0xffff);
    s.push_back(static_cast<char>(key));
    put_u16(s, static_cast<std::uint16_t>(value.size()));
    s.append(value.data(), value.size());
}

// Writes whole frames to the protocol fd; one mutex makes every frame atomic on the pipe.
class Writer {
   public:
    explicit Writer(int fd) : fd_(fd) {}

    void send(std::uint8_t kind, std::uint16_t flags, std::uint64_t id, const std::string& header,
              const void* payload, std::size_t payload_len) {
        std::uint64_t body = std::uint64_t(kFixedLen) + header.size() + payload_len;
        if (body > kMaxFrame) {
            // An answer the agent would refuse as a protocol violation: say why instead.
            std::string h;
            put_tlv(h, kErrorCode, "function_error");
            std::string msg = "answer of " + std::to_string(payload_len) +
                              " bytes exceeds the protocol's frame maximum";
            send(kError, 0, id, h, msg.data(), msg.size());
            return;
        }
        std::string head;
        head.reserve(4 + kFixedLen + header.size());
        put_u32(head, static_cast<std::uint32_t>(body));
        head.push_back(static_cast<char>(kProtocolVersion));
        head.push_back(static_cast<char>(kind));
        put_u16(head, flags);
        put_u64(head, id);
        put_u32(head, static_cast<std::uint32_t>(header.size()));
        head += header;
        std::lock_guard<std::mutex> lock(mu_);
        write_all(head.data(), head.size(), static_cast<const char*>(payload), payload_len);
    }

   private:
    void write_all(const char* a, std::size_t alen, const char* b, std::size_t blen) {
        while (alen + blen > 0) {
            iovec iov[2];
            int n = 0;
            if (alen) iov[n++] = {const_cast<char*>(a), alen};
            if (blen) iov[n++] = {const_cast<char*>(b), blen};
            ssize_t w = ::writev(fd_, iov, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                // The agent closed our stdout: nobody can receive answers any more.
                die(1, std::string("cannot write frames to stdout: ") + std::strerror(errno));
            }
            std::size_t done = static_cast<std::size_t>(w);
            std::size_t from_a = done < alen ? done : alen;
            a += from_a;
            alen -= from_a;
            done -= from_a;
            b += done;
            blen -= done;
        }
    }

    int fd_;
    std::mutex mu_;
};

// Buffered reader of whole frames from stdin (only ever used by the main thread).
class Reader {
   public:
    explicit Reader(int fd) : fd_(fd), buf_(kReadChunk) {}

    // Fills `body` with the next frame's body (after the length). False on EOF between frames.
    bool next(std::string& body) {
        unsigned char prefix[4];
        std::size_t got = read_exact(reinterpret_cast<char*>(prefix), 4);
        if (got == 0) return false;
        if (got < 4) die(2, "stdin ended inside a frame length");
        std::uint32_t length = get_u32(prefix);
        if (length > kMaxFrame)
            die(2, "protocol violation: frame of " + std::to_string(length) +
                       " bytes exceeds the " + std::to_string(kMaxFrame) + "-byte maximum");
        if (length < kFixedLen)
            die(2, "protocol violation: frame of " + std::to_string(length) +
                       " bytes is shorter than its fixed part");
        body.resize(length);
        if (read_exact(body.data(), length) < length) die(2, "stdin ended inside a frame");
        return true;
    }

   private:
    std::size_t read_exact(char* dst, std::size_t n) {
        std::size_t done = 0;
        while (done < n) {
            if (start_ < end_) {
                std::size_t take = std::min(n - done, end_ - start_);
                std::memcpy(dst + done, buf_.data() + start_, take);
                start_ += take;
                done += take;
                continue;
            }
            // Large payloads go straight into their destination, small reads are batched.
            bool direct = n - done >= buf_.size();
            char* into = direct ? dst + done : buf_.data();
            std::size_t room = direct ? n - done : buf_.size();
            ssize_t r = ::read(fd_, into, room);
            if (r < 0) {
                if (errno == EINTR) continue;
                die(2, std::string("cannot read stdin: ") + std::strerror(errno));
            }
            if (r == 0) return done;
            if (direct) {
                done += static_cast<std::size_t>(r);
            } else {
                start_ = 0;
                end_ = static_cast<std::size_t>(r);
            }
        }
        return done;
    }

    int fd_;
    std::vector<char> buf_;
    std::size_t start_ = 0;
    std::size_t end_ = 0;
};

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
    std::string ready;
    put_tlv(ready, kRuntime, "cpp/" + std::to_string(EDGEFN_ABI_VERSION));
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
        } else if (kind == kPing) {
            worker.writer().send(kPong, 0, id, std::string(), nullptr, 0);
        } else if (kind == kShutdown) {
            break;
        } else if (kind >= kInvoke && kind <= kReady) {
            // A worker->agent kind sent to us: harmless, but worth a line in the log.
            std::fprintf(stderr, "edgefn worker: ignoring frame of kind %u from the agent\n", kind);
        } else {
            die(2, "protocol violation: unknown frame kind " + std::to_string(kind));
        }
    }
    // 6. Finish what is in flight, then leave.
    worker.drain();
    std::fflush(stdout);
    std::fflush(stderr);
    return 0;
}

}  // namespace worker
}  // namespace edgefn

#endif  // EDGEFN_WORKER_HPP
