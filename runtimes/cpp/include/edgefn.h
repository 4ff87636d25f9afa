/*
 * edgefn C ABI, version 2: the only contract between a C++ function library and its host.
 *
 * A function library exports two symbols with C linkage:
 *
 *     uint32_t edgefn_abi_version(void);              returns EDGEFN_ABI_VERSION it was built with
 *     int32_t  edgefn_invoke(const edgefn_call *call); runs one invocation
 *
 * and may export a third, optional one (EDGEFN_FUNCTION of edgefn.hpp always does):
 *
 *     int32_t  edgefn_config_changed(...);            the `config()` change notification, below
 *
 * A host looks the optional symbol up and, when a library lacks it (a hand-written C ABI, or a
 * library built before it existed), simply never tells that library of config changes. It is
 * not part of the version check: adding it changed no struct, so ABI-1 and ABI-2 libraries
 * without it load exactly as before.
 *
 * Hosts (the in-process pybind11 host runtimes/cpp/_host.cpp and the isolated worker main in
 * edgefn_worker.hpp) refuse a library whose version they do not speak: the struct below may
 * change between versions, the two symbol names never do. Version 2 only appended `call` (the
 * building blocks), so a host of version 2 still loads version-1 libraries, which never read it.
 *
 * Memory ownership, plainly:
 *   - Everything the host passes in (payload, the strings, the call struct itself) is owned by
 *     the host and valid only until edgefn_invoke returns. Copy what you want to keep.
 *   - The answer is written into memory the HOST allocates: the library calls
 *     call->alloc(call->host, n) and gets n writable bytes (or NULL when the host is out of
 *     memory). Calling alloc again replaces the earlier buffer, which must no longer be used.
 *     The library never frees it and must not keep the pointer after returning. This keeps one
 *     allocator per buffer (no malloc/free pairing across a library boundary) and lets a host
 *     hand out memory that already is its final destination (a Python bytes object, a frame).
 *   - Return EDGEFN_OK: the buffer holds the response bytes (no alloc call = empty response).
 *     Return EDGEFN_ERROR: the buffer holds a UTF-8 error message (may be empty).
 *   - Nothing may unwind through edgefn_invoke: C++ exceptions must be caught inside the
 *     library (the EDGEFN_FUNCTION macro of edgefn.hpp does this) and turned into EDGEFN_ERROR.
 *
 * Threads: a host may call edgefn_invoke from several threads at once, so handlers must be
 * thread-safe. The callbacks below are safe to call from the calling thread during the call.
 */
#ifndef EDGEFN_H
#define EDGEFN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEFN_ABI_VERSION 2u
/* The oldest library version a host of this version still loads. */
#define EDGEFN_ABI_MIN_VERSION 1u

/* Return values of edgefn_invoke. Hosts treat any other value as an error as well. */
#define EDGEFN_OK 0
#define EDGEFN_ERROR 1

/* edgefn_call.flags */
#define EDGEFN_FLAG_JSON 1u /* the payload is UTF-8 JSON (the request said so) */

/* Levels for edgefn_call.log, same names as the protocol's LOG_LEVEL. */
#define EDGEFN_LOG_DEBUG 0
#define EDGEFN_LOG_INFO 1
#define EDGEFN_LOG_WARN 2
#define EDGEFN_LOG_ERROR 3

#if defined(__GNUC__)
#define EDGEFN_EXPORT __attribute__((visibility("default")))
#else
#define EDGEFN_EXPORT
#endif

/* A byte string that is not NUL-terminated. */
typedef struct edgefn_str {
    const char *data;
    size_t len;
} edgefn_str;

typedef struct edgefn_call {
    const uint8_t *payload; /* request bytes, owned by the host */
    size_t payload_len;
    edgefn_str request_id;   /* unique per in-flight request of this host */
    edgefn_str function;     /* function name from the manifest */
    edgefn_str version;      /* function version from the manifest */
    edgefn_str trace_id;     /* may be empty */
    edgefn_str content_type; /* request content type, may be empty */
    uint32_t flags;          /* EDGEFN_FLAG_* */
    uint32_t deadline_ms;    /* milliseconds left for this request when edgefn_invoke was called */

    void *host; /* opaque, pass back to the callbacks */
    /* n writable bytes owned by the host for the answer, or NULL (out of memory). */
    uint8_t *(*alloc)(void *host, size_t n);
    /* Content type of the answer (e.g. "application/json"); the bytes are copied. */
    void (*set_content_type)(void *host, const char *data, size_t len);
    /* One log line at EDGEFN_LOG_*; the bytes are copied. */
    void (*log)(void *host, int32_t level, const char *msg, size_t len);

    /* ABI 2. A building-block call made by this invocation (docs/building-blocks.md): `op` is
     * invoke | publish | state.get | state.set | state.delete | config | secret, `target` the
     * function, topic, state key or secret name (empty for config), `payload` the argument and
     * `content_type` its type (may be empty). Blocks the calling thread until the agent answers
     * or the invocation's deadline (less a reserve) passes. The answer is handed to
     * `sink(sink_ctx, code, code_len, data, len)` exactly once before `call` returns: on
     * EDGEFN_OK `code` is empty and `data` the answer bytes; on EDGEFN_ERROR `code` is the
     * stable code (not_permitted, not_found, timeout, quota_exceeded, unavailable, or a
     * callee's own code) and `data` the UTF-8 message. Everything passed either way is owned by
     * its giver and valid only during the call; copy it in `sink`. NULL when the host offers no
     * building blocks (a version-1 host never sets it). Safe from any thread of the library
     * while the invocation runs. */
    int32_t (*call)(void *host, const char *op, size_t op_len, const char *target,
                    size_t target_len, const uint8_t *payload, size_t payload_len,
                    const char *content_type, size_t content_type_len, void *sink_ctx,
                    void (*sink)(void *sink_ctx, const char *code, size_t code_len,
                                 const uint8_t *data, size_t len));
} edgefn_call;

EDGEFN_EXPORT uint32_t edgefn_abi_version(void);
EDGEFN_EXPORT int32_t edgefn_invoke(const edgefn_call *call);

/* Optional. The agent applied a desired config in which this function's `config` table changed:
 * `json`/`len` is the new table as JSON text (not NUL-terminated), owned by the host and valid
 * only during the call. Called outside any invocation, from a thread of the host's own (never
 * the thread that reads the agent's frames, never the agent's event loop), one call at a time
 * and in the order the agent sent them; a host may skip a config that a newer one replaced
 * before it could be delivered. `log(host, level, msg, len)` (may be NULL) writes one line to
 * the agent's log, e.g. why a listener failed. Returns EDGEFN_OK, or EDGEFN_ERROR when a
 * listener failed (already logged). Nothing may unwind through it. */
EDGEFN_EXPORT int32_t edgefn_config_changed(const char *json, size_t len, void *host,
                                            void (*log)(void *host, int32_t level,
                                                        const char *msg, size_t len));

/* Signatures for hosts that look the symbols up with dlsym. */
typedef uint32_t (*edgefn_abi_version_fn)(void);
typedef int32_t (*edgefn_invoke_fn)(const edgefn_call *call);
typedef int32_t (*edgefn_config_changed_fn)(const char *json, size_t len, void *host,
                                            void (*log)(void *host, int32_t level,
                                                        const char *msg, size_t len));

#ifdef __cplusplus
}
#endif

#endif /* EDGEFN_H */
