// runtimes.cpp._host: the in-process C++ host, a thin pybind11 layer over dlopen + edgefn.h.
//
// Library(path, function, version) dlopens a function library (RTLD_NOW | RTLD_LOCAL: every
// symbol resolved up front, none leaking into other libraries), checks that it exports the two
// ABI symbols and speaks our ABI version, and refuses it with a LoadError naming the file and
// what is wrong otherwise. Library.call() runs one invocation:
//   - release_gil=False ("inline"): called on the caller's thread with the GIL held, and the
//     answer is written straight into a Python bytes object (no extra copy). Costs ~0.1 us of
//     pybind11 on top of the function.
//   - release_gil=True ("pooled"): the GIL is released around the function so other threads and
//     the event loop keep running; the answer lands in a C++ buffer and is copied into bytes
//     once the GIL is back.
// Library.call(..., caller) also takes the Python callable that answers the function's
// building-block calls (edgefn_call.call; runtimes/cpp/inproc_calls.py); pooled calls only.
// Library.config_changed(json) hands a config change to the library's optional
// edgefn_config_changed (looked up with dlsym; `takes_config` is False without it, and such a
// library loads as before), with the GIL released; the executor calls it from a thread of its own
// (runtimes/cpp/inproc_notify.py). It counts as a running call, so close() waits for it.
// Library.close() dlcloses the library once no call is running: at once when idle, otherwise
// when the last running call returns (unmapping code that a thread is executing would crash).
// Policy (deadlines, thread pool, error mapping, logging) lives in runtimes/cpp/inproc.py.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "edgefn.h"

namespace py = pybind11;

namespace {

// A chatty function must not make one call buffer unbounded log text before Python sees it.
constexpr std::size_t kMaxLogLines = 1000;
constexpr std::size_t kMaxLogBytes = 1 << 20;

struct LoadError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct LogLine {
    std::int32_t level;
    std::string message;
};

// Per-call host state behind edgefn_call.host.
struct HostCall {
    bool gil_held = false;
    PyObject* caller = nullptr;  // borrowed (the call's argument): building blocks, or None
    PyObject* bytes = nullptr;  // inline: the answer, written in place
    std::unique_ptr<std::uint8_t[]> buffer;  // pooled: the answer until the GIL is back
    std::size_t length = 0;
    std::string content_type;
    std::vector<LogLine> logs;
    std::size_t log_bytes = 0;
    std::size_t logs_dropped = 0;

    ~HostCall() {
        // Only reached with the GIL held (both paths return to Python before destruction).
        Py_XDECREF(bytes);
    }
};

std::uint8_t* host_alloc(void* host, std::size_t n) {
    auto* hc = static_cast<HostCall*>(host);
    if (hc->gil_held) {
        Py_CLEAR(hc->bytes);
        hc->bytes = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
        if (hc->bytes == nullptr) {
            PyErr_Clear();
            return nullptr;
        }
        return reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(hc->bytes));
    }
    hc->buffer.reset(new (std::nothrow) std::uint8_t[n ? n : 1]);
    hc->length = hc->buffer ? n : 0;
    return hc->buffer.get();
}

void host_set_content_type(void* host, const char* data, std::size_t len) {
    auto* hc = static_cast<HostCall*>(host);
    try {
        hc->content_type.assign(data, len);
    } catch (...) {
    }
}

void host_log(void* host, std::int32_t level, const char* msg, std::size_t len) {
    auto* hc = static_cast<HostCall*>(host);
    if (hc->logs.size() >= kMaxLogLines || hc->log_bytes + len > kMaxLogBytes) {
        ++hc->logs_dropped;
        return;
    }
    try {
        hc->logs.push_back(LogLine{level, std::string(msg, len)});
        hc->log_bytes += len;
    } catch (...) {
        ++hc->logs_dropped;
    }
}

using Sink = void (*)(void*, const char*, std::size_t, const std::uint8_t*, std::size_t);

std::int32_t sink_error(void* ctx, Sink sink, std::string_view code, std::string_view msg) {
    sink(ctx, code.data(), code.size(), reinterpret_cast<const std::uint8_t*>(msg.data()),
         msg.size());
    return EDGEFN_ERROR;
}

// edgefn_call.call: a building-block call, answered by the executor's Python callable
// (runtimes/cpp/inproc_calls.py), which waits on the agent's event loop.
std::int32_t host_call(void* host, const char* op, std::size_t op_len, const char* target,
                       std::size_t target_len, const std::uint8_t* payload,
                       std::size_t payload_len, const char* ctype, std::size_t ctype_len,
                       void* sink_ctx, Sink sink) {
    auto* hc = static_cast<HostCall*>(host);
    if (hc->gil_held)
        return sink_error(sink_ctx, sink, "unavailable",
                          "building blocks are not available to inline in-process functions: "
                          "they run on the agent's event loop, which waiting for an answer "
                          "would stall (drop `inline = true`, or use isolation = \"process\")");
    if (hc->caller == nullptr || hc->caller == Py_None)
        return sink_error(sink_ctx, sink, "unavailable", "this host offers no building blocks");
    py::gil_scoped_acquire gil;
    try {
        py::object fn = py::reinterpret_borrow<py::object>(hc->caller);
        auto text = [](const char* d, std::size_t n) {
            PyObject* obj = PyUnicode_DecodeUTF8(d, static_cast<Py_ssize_t>(n), "replace");
            if (obj == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::str>(obj);
        };
        py::tuple answer = fn(text(op, op_len), text(target, target_len),
                              py::bytes(reinterpret_cast<const char*>(payload), payload_len),
                              text(ctype, ctype_len));
        std::string code = answer[0].cast<std::string>();
        char* data = nullptr;
        Py_ssize_t size = 0;
        py::bytes bytes = answer[1];
        if (PyBytes_AsStringAndSize(bytes.ptr(), &data, &size) != 0) throw py::error_already_set();
        sink(sink_ctx, code.data(), code.size(), reinterpret_cast<const std::uint8_t*>(data),
             static_cast<std::size_t>(size));
        return code.empty() ? EDGEFN_OK : EDGEFN_ERROR;
    } catch (py::error_already_set& exc) {
        std::string why = exc.what();
        return sink_error(sink_ctx, sink, "unavailable", "the host could not make the call: " + why);
    } catch (const std::exception& exc) {
        return sink_error(sink_ctx, sink, "unavailable", exc.what());
    }
}

edgefn_str utf8_of(py::handle text) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    return edgefn_str{data, static_cast<std::size_t>(size)};
}

py::str decode(const std::string& text) {
    PyObject* obj = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
    if (obj == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(obj);
}

class Library {
   public:
    Library(std::string path, std::string function, std::string version)
        : path_(std::move(path)), function_(std::move(function)), version_(std::move(version)) {
        dlerror();
        handle_ = dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (handle_ == nullptr) {
            const char* why = dlerror();
            throw LoadError(path_ + ": cannot load the function library: " +
                            (why ? why : "unknown dlopen error"));
        }
        auto* abi = reinterpret_cast<edgefn_abi_version_fn>(dlsym(handle_, "edgefn_abi_version"));
        invoke_ = reinterpret_cast<edgefn_invoke_fn>(dlsym(handle_, "edgefn_invoke"));
        std::string problem;
        if (abi == nullptr || invoke_ == nullptr) {
            std::string missing = invoke_ == nullptr ? "'edgefn_invoke'" : "";
            if (abi == nullptr) missing += std::string(missing.empty() ? "" : " and ") + "'edgefn_abi_version'";
            problem = path_ + ": not an edgefn function library: it does not export " + missing +
                      " (define the function with EDGEFN_FUNCTION(handler) from edgefn.hpp, or " +
                      "export the C ABI of edgefn.h)";
        } else if (std::uint32_t theirs = abi();
                   theirs < EDGEFN_ABI_MIN_VERSION || theirs > EDGEFN_ABI_VERSION) {
            problem = path_ + ": built for edgefn C ABI version " + std::to_string(theirs) +
                      ", but this host speaks versions " + std::to_string(EDGEFN_ABI_MIN_VERSION) +
                      " to " + std::to_string(EDGEFN_ABI_VERSION) +
                      "; rebuild the function against this edgefn release";
        }
        if (!problem.empty()) {
            dlclose(handle_);
            handle_ = nullptr;
            throw LoadError(problem);
        }
        // Optional: absent in hand-written C ABI libraries and those built before it existed.
        config_changed_ =
            reinterpret_cast<edgefn_config_changed_fn>(dlsym(handle_, "edgefn_config_changed"));
        dlerror();
    }

    ~Library() {
        // Python dropped the object without close(): unload only if nothing runs (it cannot,
        // a running call holds a reference through its bound method).
        std::lock_guard<std::mutex> lock(mu_);
        if (handle_ != nullptr && active_ == 0) dlclose(handle_);
        handle_ = nullptr;
    }

    py::tuple call(py::bytes payload, py::str request_id, py::str trace_id, py::str content_type,
                   std::uint32_t deadline_ms, std::uint32_t flags, bool release_gil,
                   py::object caller) {
        edgefn_invoke_fn fn;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (handle_ == nullptr || closing_)
                throw std::runtime_error(path_ + ": the function library is closed");
            fn = invoke_;
            ++active_;
        }
        HostCall hc;
        hc.gil_held = !release_gil;
        hc.caller = caller.ptr();
        char* data = nullptr;
        Py_ssize_t size = 0;
        PyBytes_AsStringAndSize(payload.ptr(), &data, &size);

        edgefn_call c{};
        c.payload = reinterpret_cast<const std::uint8_t*>(data);
        c.payload_len = static_cast<std::size_t>(size);
        c.function = edgefn_str{function_.data(), function_.size()};
        c.version = edgefn_str{version_.data(), version_.size()};
        try {
            c.request_id = utf8_of(request_id);
            c.trace_id = utf8_of(trace_id);
            c.content_type = utf8_of(content_type);
        } catch (...) {
            finished();
            throw;
        }
        c.flags = flags;
        c.deadline_ms = deadline_ms;
        c.host = &hc;
        c.alloc = &host_alloc;
        c.set_content_type = &host_set_content_type;
        c.log = &host_log;
        c.call = &host_call;

        std::int32_t status;
        if (release_gil) {
            py::gil_scoped_release nogil;
            status = guarded(fn, &c, hc);
            finished();
        } else {
            status = guarded(fn, &c, hc);
            finished();
        }

        py::bytes answer;
        if (hc.bytes != nullptr) {
            answer = py::reinterpret_steal<py::bytes>(hc.bytes);
            hc.bytes = nullptr;
        } else {
            answer = py::bytes(reinterpret_cast<const char*>(hc.buffer.get()), hc.length);
        }
        return py::make_tuple(status, std::move(answer), decode(hc.content_type), log_lines(hc));
    }

    // (status, log lines or None), or None when the library does not take config changes or is
    // closed. Runs with the GIL released: listeners are user code and may take their time.
    py::object config_changed(py::bytes json) {
        edgefn_config_changed_fn fn;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (handle_ == nullptr || closing_ || config_changed_ == nullptr) return py::none();
            fn = config_changed_;
            ++active_;
        }
        char* data = nullptr;
        Py_ssize_t size = 0;
        PyBytes_AsStringAndSize(json.ptr(), &data, &size);
        HostCall hc;  // only its log lines are used
        std::int32_t status;
        {
            py::gil_scoped_release nogil;
            try {
                status = fn(data, static_cast<std::size_t>(size), &hc, &host_log);
            } catch (...) {
                static const char msg[] = "the function library let a C++ exception escape "
                                          "edgefn_config_changed";
                host_log(&hc, EDGEFN_LOG_ERROR, msg, sizeof(msg) - 1);
                status = EDGEFN_ERROR;
            }
            finished();
        }
        return py::make_tuple(status, log_lines(hc));
    }

    bool takes_config() {
        std::lock_guard<std::mutex> lock(mu_);
        return handle_ != nullptr && config_changed_ != nullptr;
    }

    // True when the library is unloaded now; false when the last running call will unload it.
    bool close() {
        std::lock_guard<std::mutex> lock(mu_);
        closing_ = true;
        if (handle_ != nullptr && active_ == 0) {
            dlclose(handle_);
            handle_ = nullptr;
        }
        return handle_ == nullptr;
    }

    bool loaded() {
        std::lock_guard<std::mutex> lock(mu_);
        return handle_ != nullptr;
    }

    int active() {
        std::lock_guard<std::mutex> lock(mu_);
        return active_;
    }

    const std::string& path() const { return path_; }

   private:
    // The call's log lines as [(level, text)], or None when it logged nothing (GIL held).
    static py::object log_lines(const HostCall& hc) {
        if (hc.logs.empty() && !hc.logs_dropped) return py::none();
        py::list lines;
        for (const auto& line : hc.logs) lines.append(py::make_tuple(line.level, decode(line.message)));
        if (hc.logs_dropped)
            lines.append(py::make_tuple(
                EDGEFN_LOG_WARN, py::str(std::to_string(hc.logs_dropped) +
                                         " log lines of this call dropped (over the "
                                         "in-process per-call log bound)")));
        return std::move(lines);
    }

    // A library that does not use edgefn.hpp could still let an exception escape: stop it here.
    static std::int32_t guarded(edgefn_invoke_fn fn, const edgefn_call* c, HostCall& hc) noexcept {
        try {
            return fn(c);
        } catch (...) {
            static const char msg[] = "the function library let a C++ exception escape edgefn_invoke";
            std::uint8_t* out = host_alloc(&hc, sizeof(msg) - 1);
            if (out != nullptr) std::memcpy(out, msg, sizeof(msg) - 1);
            return EDGEFN_ERROR;
        }
    }

    // Called without the GIL in pooled mode; dlclose runs the library's static destructors.
    void finished() {
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0 && closing_ && handle_ != nullptr) {
            dlclose(handle_);
            handle_ = nullptr;
        }
    }

    std::string path_, function_, version_;
    std::mutex mu_;
    void* handle_ = nullptr;
    edgefn_invoke_fn invoke_ = nullptr;
    edgefn_config_changed_fn config_changed_ = nullptr;
    int active_ = 0;
    bool closing_ = false;
};

}  // namespace

PYBIND11_MODULE(_host, m) {
    m.doc() = "In-process host for edgefn C++ function libraries (see runtimes/cpp/inproc.py).";
    m.attr("ABI_VERSION") = EDGEFN_ABI_VERSION;
    m.attr("OK") = EDGEFN_OK;
    m.attr("ERROR") = EDGEFN_ERROR;
    m.attr("FLAG_JSON") = EDGEFN_FLAG_JSON;
    py::register_exception<LoadError>(m, "LoadError", PyExc_RuntimeError);
    py::class_<Library>(m, "Library")
        .def(py::init<std::string, std::string, std::string>(), py::arg("path"),
             py::arg("function"), py::arg("version"))
        .def("call", &Library::call, py::arg("payload"), py::arg("request_id"),
             py::arg("trace_id"), py::arg("content_type"), py::arg("deadline_ms"),
             py::arg("flags"), py::arg("release_gil"), py::arg("caller") = py::none())
        .def("config_changed", &Library::config_changed, py::arg("json"))
        .def("close", &Library::close)
        .def_property_readonly("loaded", &Library::loaded)
        .def_property_readonly("active", &Library::active)
        .def_property_readonly("takes_config", &Library::takes_config)
        .def_property_readonly("path", &Library::path);
}
