// edgefn worker frames: the wire layer of docs/protocol.md for the isolated C++ worker, apart
// from what the worker does with the frames (edgefn_worker.hpp). Constants mirror
// runtimes/protocol.py; Writer makes every frame atomic on the pipe, Reader reads whole frames.
#ifndef EDGEFN_FRAMES_HPP
#define EDGEFN_FRAMES_HPP

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

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
    kCall = 9,         // worker -> agent: a building-block call (edgefn_worker.hpp Calls)
    kCallResult = 10,  // agent -> worker: its answer
    kCallError = 11,   // agent -> worker: it failed (ERROR_CODE)
    kNotify = 12,      // agent -> worker: OP "config", payload = the new config (edgefn_worker.hpp Notices)
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
    kOp = 9,
    kTarget = 10,
    kParentId = 11,
    kFeatures = 12,  // on READY: optional agent -> worker frames this host takes ("notify")
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
inline std::string u32_bytes(std::uint32_t v) {
    std::string s;
    put_u32(s, v);
    return s;
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

}  // namespace worker
}  // namespace edgefn

#endif  // EDGEFN_FRAMES_HPP
