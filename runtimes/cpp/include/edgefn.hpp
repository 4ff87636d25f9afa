// edgefn C++ layer: write a handler, name it once, get the C ABI of edgefn.h.
//
//     #include <edgefn.hpp>
//
//     std::string handle(std::string_view request, edgefn::Context& ctx) {
//         ctx.log(edgefn::Level::info, "got " + std::to_string(request.size()) + " bytes");
//         return std::string(request);
//     }
//     EDGEFN_FUNCTION(handle)
//
// The same source builds the in-process library (<entry>.so) and the isolated worker executable
// (<entry>, which adds edgefn_worker.hpp's main); see docs/runtime-cpp.md.
//
// A handler takes (std::string_view) or (std::string_view, edgefn::Context&) and returns
// anything convertible to std::string_view (usually std::string). Any exception it throws,
// std:: or not, becomes an error answer (`function_error`): nothing unwinds into the host.
// Handlers can run on several threads at once and must be thread-safe.
#ifndef EDGEFN_HPP
#define EDGEFN_HPP

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <type_traits>

#include "edgefn.h"

namespace edgefn {

enum class Level : std::int32_t {
    debug = EDGEFN_LOG_DEBUG,
    info = EDGEFN_LOG_INFO,
    warn = EDGEFN_LOG_WARN,
    error = EDGEFN_LOG_ERROR,
};

// What the host knows about the current invocation. Valid only during the handler call.
class Context {
   public:
    explicit Context(const edgefn_call& call) noexcept
        : call_(call),
          deadline_(std::chrono::steady_clock::now() + std::chrono::milliseconds(call.deadline_ms)) {}

    std::string_view request_id() const noexcept { return view(call_.request_id); }
    std::string_view function() const noexcept { return view(call_.function); }
    std::string_view version() const noexcept { return view(call_.version); }
    std::string_view trace_id() const noexcept { return view(call_.trace_id); }
    std::string_view content_type() const noexcept { return view(call_.content_type); }

    // The request said its payload is JSON (protocol JSON flag or application/json).
    bool is_json() const noexcept {
        if (call_.flags & EDGEFN_FLAG_JSON) return true;
        return content_type().substr(0, 16) == "application/json";
    }

    std::chrono::steady_clock::time_point deadline() const noexcept { return deadline_; }
    // Milliseconds until the deadline; negative once it passed. In process isolation the agent
    // kills the worker at the deadline; in-process it cannot, so long handlers should check.
    std::int64_t deadline_ms_left() const noexcept {
        return std::chrono::duration_cast<std::chrono::milliseconds>(
                   deadline_ - std::chrono::steady_clock::now())
            .count();
    }
    bool expired() const noexcept { return std::chrono::steady_clock::now() >= deadline_; }

    void log(Level level, std::string_view msg) const noexcept {
        if (call_.log) call_.log(call_.host, static_cast<std::int32_t>(level), msg.data(), msg.size());
    }
    void log(std::string_view msg) const noexcept { log(Level::info, msg); }

    // Content type of the answer; without it the answer is application/octet-stream.
    void set_content_type(std::string_view type) const noexcept {
        if (call_.set_content_type) call_.set_content_type(call_.host, type.data(), type.size());
    }

    const edgefn_call& raw() const noexcept { return call_; }

   private:
    static std::string_view view(const edgefn_str& s) noexcept {
        return s.data ? std::string_view(s.data, s.len) : std::string_view();
    }
    const edgefn_call& call_;
    std::chrono::steady_clock::time_point deadline_;
};

// A JSON string literal (quotes included) for `text`; bytes >= 0x80 pass through unchanged.
inline std::string json_quote(std::string_view text) {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    out.reserve(text.size() + 2);
    out.push_back('"');
    for (char c : text) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (static_cast<unsigned char>(c) < 0x20) {
                    out += "\\u00";
                    out.push_back(hex[(c >> 4) & 0xf]);
                    out.push_back(hex[c & 0xf]);
                } else {
                    out.push_back(c);
                }
        }
    }
    out.push_back('"');
    return out;
}

namespace detail {

// Copies `bytes` into host memory. Never throws: it runs after the handler's try block.
inline std::int32_t answer(const edgefn_call* call, std::string_view bytes,
                           std::int32_t status) noexcept {
    if (bytes.empty()) return status;
    std::uint8_t* out = call->alloc(call->host, bytes.size());
    if (out == nullptr) {
        static const char oom[] = "edgefn: the host could not allocate memory for the answer";
        std::uint8_t* msg = call->alloc(call->host, sizeof(oom) - 1);
        if (msg != nullptr) std::memcpy(msg, oom, sizeof(oom) - 1);
        return EDGEFN_ERROR;
    }
    std::memcpy(out, bytes.data(), bytes.size());
    return status;
}

template <class F>
std::int32_t invoke(F&& handler, const edgefn_call* call) noexcept {
    if (call == nullptr || call->alloc == nullptr) return EDGEFN_ERROR;
    std::string message;
    try {
        Context ctx(*call);
        std::string_view request(reinterpret_cast<const char*>(call->payload), call->payload_len);
        if (call->payload == nullptr) request = std::string_view();
        if constexpr (std::is_invocable_v<F&, std::string_view, Context&>) {
            auto&& out = handler(request, ctx);
            return answer(call, std::string_view(out), EDGEFN_OK);
        } else {
            static_assert(std::is_invocable_v<F&, std::string_view>,
                          "an edgefn handler takes (std::string_view) or "
                          "(std::string_view, edgefn::Context&)");
            auto&& out = handler(request);
            return answer(call, std::string_view(out), EDGEFN_OK);
        }
    } catch (const std::exception& exc) {
        try {
            message = exc.what();
        } catch (...) {
            message.clear();
        }
    } catch (...) {
        // `throw 42;` and friends: there is no message to show, so say what happened.
        return answer(call, "unknown C++ exception (not derived from std::exception)",
                      EDGEFN_ERROR);
    }
    return answer(call, message, EDGEFN_ERROR);
}

}  // namespace detail
}  // namespace edgefn

// Exports the C ABI for `handler`. Use it once per library, at namespace scope.
#define EDGEFN_FUNCTION(handler)                                              \
    extern "C" EDGEFN_EXPORT uint32_t edgefn_abi_version(void) {              \
        return EDGEFN_ABI_VERSION;                                            \
    }                                                                         \
    extern "C" EDGEFN_EXPORT int32_t edgefn_invoke(const edgefn_call* call) { \
        return ::edgefn::detail::invoke(handler, call);                       \
    }

#endif  // EDGEFN_HPP
