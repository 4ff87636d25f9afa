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
//
// Building blocks (docs/building-blocks.md) are methods of the context; each blocks until the
// agent answers and throws edgefn::CallError with the stable code when it fails:
//
//     std::string eta = ctx.invoke("eta-node", R"({"from":"a","to":"b"})", "application/json");
//     ctx.publish("traffic/jam", "{...}");
//     std::optional<std::string> n = ctx.state().get("count");   // nullopt: not set
//     ctx.state().set("count", "1");  ctx.state().erase("count");
//     std::string cfg = ctx.config();                           // JSON text, "{}" without one
//     std::string key = ctx.secret("maps-api-key");
//
// Config changes reach the function without an invocation (thread-safe, any thread):
//
//     static const edgefn::ConfigSubscription watch = edgefn::on_config_change(
//         [](std::string_view json) { /* refresh what you derived from the config */ });
//     std::optional<std::string> cfg = edgefn::latest_config();  // newest pushed, no call
#ifndef EDGEFN_HPP
#define EDGEFN_HPP

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "edgefn.h"

namespace edgefn {

enum class Level : std::int32_t {
    debug = EDGEFN_LOG_DEBUG,
    info = EDGEFN_LOG_INFO,
    warn = EDGEFN_LOG_WARN,
    error = EDGEFN_LOG_ERROR,
};

// A building-block call failed. code(): not_permitted, not_found, timeout, quota_exceeded,
// unavailable, or the callee's own code for a failed nested invoke (e.g. function_error).
class CallError : public std::runtime_error {
   public:
    CallError(std::string code, const std::string& message)
        : std::runtime_error(message), code_(std::move(code)) {}
    const std::string& code() const noexcept { return code_; }

   private:
    std::string code_;
};

class Context;

// The function's own key-value store (ctx.state()); keys and values are byte strings.
class State {
   public:
    explicit State(const Context& ctx) noexcept : ctx_(ctx) {}
    std::optional<std::string> get(std::string_view key) const;  // nullopt: the key is not set
    void set(std::string_view key, std::string_view value) const;
    void erase(std::string_view key) const;  // no error when the key is not set

   private:
    const Context& ctx_;
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

    // Building blocks; each throws CallError (see the top of this file).
    std::string invoke(std::string_view function, std::string_view payload,
                       std::string_view content_type = {}) const {
        return call("invoke", function, payload, content_type);
    }
    void publish(std::string_view topic, std::string_view payload) const {
        call("publish", topic, payload);
    }
    State state() const noexcept { return State(*this); }
    std::string config() const { return call("config", {}, {}); }
    std::string secret(std::string_view name) const { return call("secret", name, {}); }

    // Any building-block operation by name (what the typed methods above use).
    std::string call(std::string_view op, std::string_view target, std::string_view payload,
                     std::string_view content_type = {}) const {
        if (call_.call == nullptr)
            throw CallError("unavailable", "this host offers no building blocks");
        Answer answer;
        std::int32_t status = call_.call(
            call_.host, op.data(), op.size(), target.data(), target.size(),
            reinterpret_cast<const std::uint8_t*>(payload.data()), payload.size(),
            content_type.data(), content_type.size(), &answer, &Context::sink);
        if (answer.failed_to_copy) throw std::bad_alloc();
        if (status != EDGEFN_OK) {
            if (answer.code.empty()) answer.code = "unavailable";
            throw CallError(std::move(answer.code), answer.data);
        }
        return std::move(answer.data);
    }

    const edgefn_call& raw() const noexcept { return call_; }

   private:
    struct Answer {
        std::string code, data;
        bool failed_to_copy = false;
    };
    // Runs inside the host's call(): copies what the host lends us, never throws.
    static void sink(void* ctx, const char* code, std::size_t code_len, const std::uint8_t* data,
                     std::size_t len) noexcept {
        auto* a = static_cast<Answer*>(ctx);
        try {
            a->code.assign(code ? code : "", code ? code_len : 0);
            a->data.assign(reinterpret_cast<const char*>(data), data ? len : 0);
        } catch (...) {
            a->failed_to_copy = true;
        }
    }

    static std::string_view view(const edgefn_str& s) noexcept {
        return s.data ? std::string_view(s.data, s.len) : std::string_view();
    }
    const edgefn_call& call_;
    std::chrono::steady_clock::time_point deadline_;
};

inline std::optional<std::string> State::get(std::string_view key) const {
    try {
        return ctx_.call("state.get", key, {});
    } catch (const CallError& e) {
        if (e.code() == "not_found") return std::nullopt;
        throw;
    }
}
inline void State::set(std::string_view key, std::string_view value) const {
    ctx_.call("state.set", key, value);
}
inline void State::erase(std::string_view key) const { ctx_.call("state.delete", key, {}); }

// ---- config() change notification --------------------------------------------------------
//
// The host calls the library's edgefn_config_changed (defined by EDGEFN_FUNCTION) whenever the
// agent applies a changed config for this function; every registered listener then runs with
// the new config's JSON text, on the host's notification thread, one notification at a time.

using ConfigListener = std::function<void(std::string_view json)>;

namespace detail {

class ConfigRegistry {
   public:
    using LogFn = void (*)(void*, std::int32_t, const char*, std::size_t);

    std::uint64_t add(ConfigListener fn) {
        auto shared = std::make_shared<ConfigListener>(std::move(fn));
        std::lock_guard<std::mutex> lock(mu_);
        listeners_.emplace_back(++last_, std::move(shared));
        return last_;
    }

    // After it returns the listener is not running and will not run again, unless it is called
    // from a listener itself (then the current notification may still finish its own call).
    void remove(std::uint64_t id) noexcept {
        {
            std::lock_guard<std::mutex> lock(mu_);
            listeners_.erase(std::remove_if(listeners_.begin(), listeners_.end(),
                                            [id](const Entry& e) { return e.first == id; }),
                             listeners_.end());
        }
        if (delivering_.load() != std::this_thread::get_id()) {
            std::lock_guard<std::mutex> wait(run_mu_);  // a running notification ends first
        }
    }

    std::optional<std::string> latest() const {
        std::lock_guard<std::mutex> lock(mu_);
        return latest_;
    }

    // Runs every listener on `json`; a listener that throws is logged and the others still run.
    std::int32_t deliver(std::string_view json, void* host, LogFn log) noexcept {
        std::lock_guard<std::mutex> run(run_mu_);
        std::vector<Entry> now;
        try {
            std::lock_guard<std::mutex> lock(mu_);
            latest_.emplace(json);
            now = listeners_;
        } catch (...) {
            report(host, log, "out of memory delivering a config change");
            return EDGEFN_ERROR;
        }
        delivering_.store(std::this_thread::get_id());
        std::int32_t status = EDGEFN_OK;
        for (const Entry& e : now) {
            if (!still_registered(e.first)) continue;  // removed by an earlier listener
            try {
                (*e.second)(json);
            } catch (const std::exception& exc) {
                status = EDGEFN_ERROR;
                report(host, log, std::string("a config-change listener threw: ") + exc.what());
            } catch (...) {
                status = EDGEFN_ERROR;
                report(host, log, "a config-change listener threw a non-std exception");
            }
        }
        delivering_.store(std::thread::id());
        return status;
    }

   private:
    using Entry = std::pair<std::uint64_t, std::shared_ptr<ConfigListener>>;

    bool still_registered(std::uint64_t id) const {
        std::lock_guard<std::mutex> lock(mu_);
        return std::any_of(listeners_.begin(), listeners_.end(),
                           [id](const Entry& e) { return e.first == id; });
    }
    static void report(void* host, LogFn log, std::string_view msg) noexcept {
        if (log) log(host, EDGEFN_LOG_ERROR, msg.data(), msg.size());
    }

    mutable std::mutex mu_;  // listeners_, latest_, last_
    std::mutex run_mu_;      // held by the notification being delivered
    std::atomic<std::thread::id> delivering_{};
    std::vector<Entry> listeners_;
    std::optional<std::string> latest_;
    std::uint64_t last_ = 0;
};

// One per library (the build passes -fno-gnu-unique, so dlclose still unloads it). Never
// destroyed: a ConfigSubscription held in a static of the function may be destroyed after it
// would have been (static destructors run in reverse order of construction), and must still
// find it. Its storage goes away with the library; only a listener still registered then leaks.
inline ConfigRegistry& config_registry() {
    alignas(ConfigRegistry) static unsigned char storage[sizeof(ConfigRegistry)];
    static ConfigRegistry* registry = new (storage) ConfigRegistry();
    return *registry;
}

}  // namespace detail

class ConfigSubscription;
ConfigSubscription on_config_change(ConfigListener listener);

// Keeps a listener registered; cancel() or destroying it unregisters. Move-only.
class [[nodiscard]] ConfigSubscription {
   public:
    ConfigSubscription() noexcept = default;
    ConfigSubscription(ConfigSubscription&& other) noexcept : id_(std::exchange(other.id_, 0)) {}
    ConfigSubscription& operator=(ConfigSubscription&& other) noexcept {
        if (this != &other) {
            cancel();
            id_ = std::exchange(other.id_, 0);
        }
        return *this;
    }
    ConfigSubscription(const ConfigSubscription&) = delete;
    ConfigSubscription& operator=(const ConfigSubscription&) = delete;
    ~ConfigSubscription() { cancel(); }

    // Idempotent. Once it returns the listener no longer runs (see ConfigRegistry::remove).
    void cancel() noexcept {
        if (id_ != 0) detail::config_registry().remove(std::exchange(id_, 0));
    }
    bool active() const noexcept { return id_ != 0; }

   private:
    friend ConfigSubscription on_config_change(ConfigListener listener);
    explicit ConfigSubscription(std::uint64_t id) noexcept : id_(id) {}
    std::uint64_t id_ = 0;
};

// Registers `listener`, called with the new config's JSON text whenever the agent applies a
// changed config for this function: outside any invocation, on the host's notification thread,
// never concurrently with itself or another listener. Keep it quick (a slow listener delays
// later notifications, which are then coalesced to the newest); it may not use a Context. What
// it throws is logged, never fatal. Thread-safe; registering from a handler is fine.
inline ConfigSubscription on_config_change(ConfigListener listener) {
    if (!listener) throw std::invalid_argument("edgefn::on_config_change: empty listener");
    return ConfigSubscription(detail::config_registry().add(std::move(listener)));
}

// The newest config the agent pushed to this worker or library since it started (JSON text),
// without a call; nullopt until the first change. Start from ctx.config(), then prefer this.
inline std::optional<std::string> latest_config() { return detail::config_registry().latest(); }

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

// Exports the C ABI for `handler` (and the config-change notification). Use it once per
// library, at namespace scope.
#define EDGEFN_FUNCTION(handler)                                                           \
    extern "C" EDGEFN_EXPORT uint32_t edgefn_abi_version(void) {                           \
        return EDGEFN_ABI_VERSION;                                                         \
    }                                                                                      \
    extern "C" EDGEFN_EXPORT int32_t edgefn_invoke(const edgefn_call* call) {              \
        return ::edgefn::detail::invoke(handler, call);                                    \
    }                                                                                      \
    extern "C" EDGEFN_EXPORT int32_t edgefn_config_changed(                                \
        const char* json, size_t len, void* host,                                          \
        void (*log)(void*, int32_t, const char*, size_t)) {                                \
        return ::edgefn::detail::config_registry().deliver(                                \
            std::string_view(json ? json : "", json ? len : 0), host, log);                \
    }

#endif  // EDGEFN_HPP
