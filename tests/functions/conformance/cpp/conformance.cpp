// Conformance function for the C++ host (docs/protocol.md, "Conformance"), plus ops only C++
// needs: "segfault" (a real null-pointer write), "throw_nonstd" (`throw 42`), and for the
// config-change notification "unwatch_config" (cancels the watch_config listener, answers
// {"watching":false}), "watch_config_throwing" (adds a listener that throws `message`) and
// "config_latest" (answers {"latest": edgefn::latest_config() or null}), "watch_config_gated"
// (a listener that records like watch_config's but first waits, at most 10 s, until
// {"op":"config_gate","message":"open"}; "config_gate" answers {"waiting":N}, the listeners waiting).
// Anything that is not a JSON object with a string "op" is echoed byte for byte.
#include <edgefn.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

// Upper bound for "hang", so a mistaken request cannot pin a thread for longer than this.
constexpr long kMaxHangMs = 60000;

// Top-level fields of a flat JSON object: strings decoded, numbers and literals kept as text,
// nested values skipped. Enough for the op requests; returns false on anything malformed.
class FlatJson {
   public:
    explicit FlatJson(std::string_view s) : s_(s) {}

    bool parse(std::map<std::string, std::string>& out) {
        ws();
        if (!eat('{')) return false;
        ws();
        if (eat('}')) return end();
        for (;;) {
            std::string key, value;
            ws();
            if (!string(key)) return false;
            ws();
            if (!eat(':')) return false;
            ws();
            if (peek() == '"') {
                if (!string(value)) return false;
            } else if (!scalar_or_skip(value)) {
                return false;
            }
            out[key] = value;
            ws();
            if (eat(',')) continue;
            if (eat('}')) return end();
            return false;
        }
    }

   private:
    char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
    bool eat(char c) {
        if (peek() != c) return false;
        ++i_;
        return true;
    }
    void ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t'))
            ++i_;
    }
    bool end() {
        ws();
        return i_ == s_.size();
    }
    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out.push_back(static_cast<char>(cp));
        } else if (cp < 0x800) {
            out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
            out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
        } else {
            out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
            out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
            out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
        }
    }
    bool string(std::string& out) {
        if (!eat('"')) return false;
        while (i_ < s_.size()) {
            char c = s_[i_++];
            if (c == '"') return true;
            if (c != '\\') {
                out.push_back(c);
                continue;
            }
            if (i_ >= s_.size()) return false;
            char e = s_[i_++];
            switch (e) {
                case '"': case '\\': case '/': out.push_back(e); break;
                case 'b': out.push_back('\b'); break;
                case 'f': out.push_back('\f'); break;
                case 'n': out.push_back('\n'); break;
                case 'r': out.push_back('\r'); break;
                case 't': out.push_back('\t'); break;
                case 'u': {
                    if (i_ + 4 > s_.size()) return false;
                    unsigned cp = std::stoul(std::string(s_.substr(i_, 4)), nullptr, 16);
                    i_ += 4;
                    utf8(out, cp);  // surrogate pairs are not joined: fine for test messages
                    break;
                }
                default: return false;
            }
        }
        return false;
    }
    // A number or literal as its text; an object or array as its raw JSON text.
    bool scalar_or_skip(std::string& out) {
        if (peek() == '{' || peek() == '[') {
            std::size_t from = i_;
            int depth = 0;
            while (i_ < s_.size()) {
                char c = s_[i_];
                if (c == '"') {
                    std::string ignored;
                    if (!string(ignored)) return false;
                    continue;
                }
                ++i_;
                if (c == '{' || c == '[') ++depth;
                if ((c == '}' || c == ']') && --depth == 0) {
                    out.assign(s_.substr(from, i_ - from));
                    return true;
                }
            }
            return false;
        }
        std::size_t start = i_;
        while (i_ < s_.size() && s_[i_] != ',' && s_[i_] != '}' && s_[i_] != ' ' && s_[i_] != '\n')
            ++i_;
        out.assign(s_.substr(start, i_ - start));
        return !out.empty();
    }

    std::string_view s_;
    std::size_t i_ = 0;
};

long number(const std::map<std::string, std::string>& req, const char* key, long fallback) {
    auto it = req.find(key);
    if (it == req.end()) return fallback;
    try {
        return static_cast<long>(std::stod(it->second));
    } catch (const std::exception&) {
        return fallback;
    }
}

std::string text(const std::map<std::string, std::string>& req, const char* key) {
    auto it = req.find(key);
    return it == req.end() ? std::string() : it->second;
}

// Node and Go report the protocol's numeric request id as a number; do the same when it is one.
std::string request_id_json(std::string_view id) {
    bool digits = !id.empty() && id.size() < 16;
    for (char c : id) digits = digits && c >= '0' && c <= '9';
    return digits ? std::string(id) : edgefn::json_quote(id);
}

// The flat objects of a JSON array (the "blocks" op's calls), in order.
std::vector<std::map<std::string, std::string>> objects_of(std::string_view array) {
    std::vector<std::map<std::string, std::string>> out;
    std::size_t i = 0;
    while ((i = array.find('{', i)) != std::string_view::npos) {
        std::map<std::string, std::string> obj;
        std::size_t depth = 0, j = i;
        bool in_string = false;
        for (; j < array.size(); ++j) {
            char c = array[j];
            if (in_string) {
                if (c == '\\') ++j;
                else if (c == '"') in_string = false;
            } else if (c == '"') {
                in_string = true;
            } else if (c == '{') {
                ++depth;
            } else if (c == '}' && --depth == 0) {
                break;
            }
        }
        FlatJson(array.substr(i, j + 1 - i)).parse(obj);
        out.push_back(std::move(obj));
        i = j + 1;
    }
    return out;
}

// One building-block call through the SDK, reported the way every runtime does.
std::string run_block(edgefn::Context& ctx, const std::map<std::string, std::string>& b) {
    const std::string op = text(b, "op"), target = text(b, "target"), payload = text(b, "payload");
    try {
        std::string value;
        if (op == "invoke") {
            value = ctx.invoke(target, payload);
        } else if (op == "publish") {
            ctx.publish(target, payload);
        } else if (op == "state.get") {
            auto got = ctx.state().get(target);
            if (!got) return "{\"missing\":true}";
            value = *got;
        } else if (op == "state.set") {
            ctx.state().set(target, payload);
        } else if (op == "state.delete") {
            ctx.state().erase(target);
        } else if (op == "config") {
            value = ctx.config();
        } else if (op == "secret") {
            value = ctx.secret(target);
        } else {
            value = ctx.call(op, target, payload);  // what the agent says of an unknown op
        }
        return "{\"value\":" + edgefn::json_quote(value) + "}";
    } catch (const edgefn::CallError& e) {
        return "{\"code\":" + edgefn::json_quote(e.code()) +
               ",\"message\":" + edgefn::json_quote(e.what()) + "}";
    }
}

// Config changes this worker (or library) was told about: ops watch_config / config_seen.
std::mutex watch_mu;
std::vector<std::string> seen_configs;  // JSON texts, oldest first
edgefn::ConfigSubscription watching, throwing, gated;
std::mutex gate_mu;
std::condition_variable gate_cv;
bool gate_open = true;
int gate_waiting = 0;

// Subscriptions are swapped under watch_mu but cancelled outside it: cancel() waits for a
// running listener, and the watch_config listener itself takes watch_mu.
std::string watch_op(const std::string& op, const std::string& message) {
    edgefn::ConfigSubscription old;
    if (op == "watch_config") {
        std::lock_guard<std::mutex> lock(watch_mu);
        if (!watching.active())
            watching = edgefn::on_config_change([](std::string_view json) {
                std::lock_guard<std::mutex> seen_lock(watch_mu);
                seen_configs.emplace_back(json);
            });
        return "{\"watching\":true}";
    }
    if (op == "watch_config_throwing") {
        auto sub = edgefn::on_config_change(
            [message](std::string_view) { throw std::runtime_error(message); });
        std::lock_guard<std::mutex> lock(watch_mu);
        old = std::exchange(throwing, std::move(sub));
    } else if (op == "watch_config_gated") {
        {
            std::lock_guard<std::mutex> lock(gate_mu);
            gate_open = false;
        }
        auto sub = edgefn::on_config_change([](std::string_view json) {
            {
                std::unique_lock<std::mutex> lock(gate_mu);
                ++gate_waiting;
                gate_cv.wait_for(lock, std::chrono::seconds(10), [] { return gate_open; });
                --gate_waiting;
            }
            std::lock_guard<std::mutex> seen_lock(watch_mu);
            seen_configs.emplace_back(json);
        });
        std::lock_guard<std::mutex> lock(watch_mu);
        old = std::exchange(gated, std::move(sub));
    } else if (op == "config_gate") {
        std::lock_guard<std::mutex> lock(gate_mu);
        if (message == "open") gate_open = true;
        gate_cv.notify_all();
        return "{\"waiting\":" + std::to_string(gate_waiting) + "}";
    } else if (op == "unwatch_config") {
        {
            std::lock_guard<std::mutex> lock(watch_mu);
            old = std::move(watching);
        }
        old.cancel();
        return "{\"watching\":false}";
    } else if (op == "config_seen") {
        std::lock_guard<std::mutex> lock(watch_mu);
        std::string out = "{\"seen\":[";
        for (std::size_t i = 0; i < seen_configs.size(); ++i) out += (i ? "," : "") + seen_configs[i];
        return out + "]}";
    } else if (op == "config_latest") {
        auto latest = edgefn::latest_config();
        return "{\"latest\":" + (latest ? *latest : std::string("null")) + "}";
    }
    return "{\"watching\":true}";
}

[[noreturn]] void nested_throw(const std::string& message) { throw std::runtime_error(message); }

std::string handle(std::string_view request, edgefn::Context& ctx) {
    std::map<std::string, std::string> req;
    if (request.empty() || request[0] != '{' || !FlatJson(request).parse(req) ||
        req.find("op") == req.end()) {
        return std::string(request);  // not an op: echo byte for byte
    }
    const std::string op = req["op"];
    const std::string message = text(req, "message");
    if (op == "sleep") {
        long ms = number(req, "ms", 0);
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        ctx.set_content_type("application/json");
        return "{\"slept\":" + std::to_string(ms) + "}";
    }
    if (op == "throw") throw std::runtime_error(message);
    if (op == "panic") {
        // Thrown two frames down, through a lambda: still must come back as an ERROR answer.
        auto deeper = [&] { nested_throw(message); };
        deeper();
    }
    if (op == "throw_nonstd") throw 42;
    if (op == "log") {
        ctx.log(edgefn::Level::info, message);
        ctx.set_content_type("application/json");
        return "{\"logged\":true}";
    }
    if (op == "stdout") {
        std::printf("%s\n", message.c_str());
        std::fflush(stdout);
        std::cout << message << std::endl;
        ctx.set_content_type("application/json");
        return "{\"printed\":true}";
    }
    if (op == "context") {
        ctx.set_content_type("application/json");
        return "{\"request_id\":" + request_id_json(ctx.request_id()) +
               ",\"function\":" + edgefn::json_quote(ctx.function()) +
               ",\"version\":" + edgefn::json_quote(ctx.version()) +
               ",\"trace_id\":" + edgefn::json_quote(ctx.trace_id()) +
               ",\"deadline_ms_left\":" + std::to_string(ctx.deadline_ms_left()) + "}";
    }
    if (op == "blocks") {
        // Every call at once, each on its own thread: many in flight on one invocation.
        auto calls = objects_of(text(req, "calls"));
        std::vector<std::string> results(calls.size());
        std::vector<std::thread> threads;
        if (calls.size() == 1) results[0] = run_block(ctx, calls[0]);  // no thread for one
        for (std::size_t i = 0; calls.size() > 1 && i < calls.size(); ++i)
            threads.emplace_back([&, i] { results[i] = run_block(ctx, calls[i]); });
        for (auto& t : threads) t.join();
        std::string out = "{\"results\":[";
        for (std::size_t i = 0; i < results.size(); ++i) out += (i ? "," : "") + results[i];
        ctx.set_content_type("application/json");
        return out + "]}";
    }
    if (op == "watch_config" || op == "watch_config_throwing" || op == "unwatch_config" ||
        op == "config_seen" || op == "config_latest" || op == "watch_config_gated" ||
        op == "config_gate") {
        ctx.set_content_type("application/json");
        return watch_op(op, message);
    }
    if (op == "crash") std::abort();
    if (op == "segfault") {
        volatile int* volatile nowhere = nullptr;
        *nowhere = 1;  // a real SIGSEGV, not a raise(): what a buggy function does
        return "unreachable";
    }
    if (op == "hang") {
        long ms = number(req, "ms", kMaxHangMs);
        ms = ms < 0 ? 0 : (ms > kMaxHangMs ? kMaxHangMs : ms);
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        ctx.set_content_type("application/json");
        return "{\"hung\":" + std::to_string(ms) + "}";
    }
    throw std::invalid_argument("unknown op " + edgefn::json_quote(op));
}

}  // namespace

EDGEFN_FUNCTION(handle)
