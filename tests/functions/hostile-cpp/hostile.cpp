// A deliberately hostile function for the limit tests. Every loop is bounded: it overshoots a
// limit by a fixed amount and then stops, so a broken limit cannot harm the test machine.
//   "alloc" touches up to 1 GiB in 16 MiB steps, then holds it for 10 s
//   "fork"  forks up to 300 children that each sleep 2 s; answers how many it got
//   "spin"  burns CPU for at most 20 s
//   "detach TOKEN [then]" leaves two processes that carry TOKEN in their command line and
//          sleep 60 s: one plain child, one detached (own session, double fork); then, after
//          0.5 s, does `then`: "hang" (sleeps 30 s), "crash" (aborts), "alloc" (as above);
//          without `then` it answers at once
//   other   echoes the request
#include <edgefn.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

// A shell (not exec'd away: two commands) whose command line carries the token; sleeps 60 s.
[[noreturn]] void linger(const std::string& token) {
    std::string script = "sleep 60; : " + token;
    ::execl("/bin/sh", "sh", "-c", script.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
}

void leave_children(const std::string& token) {
    if (::fork() == 0) linger(token);  // a plain child
    pid_t first = ::fork();
    if (first == 0) {  // a detached grandchild: new session, its parent exits (double fork)
        ::setsid();
        if (::fork() == 0) linger(token);
        ::_exit(0);
    }
    if (first > 0) ::waitpid(first, nullptr, 0);
}

std::string alloc_gib() {
    std::vector<char*> blocks;
    const size_t step = 16u << 20;
    for (int i = 0; i < 64; ++i) {  // 64 x 16 MiB = 1 GiB at most
        char* p = static_cast<char*>(std::malloc(step));
        if (p == nullptr) return "malloc failed after " + std::to_string(i * 16) + " MiB";
        std::memset(p, 1, step);
        blocks.push_back(p);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::this_thread::sleep_for(std::chrono::seconds(10));
    for (char* p : blocks) std::free(p);
    return "allocated 1024 MiB";
}

}  // namespace

std::string handle(std::string_view req, edgefn::Context& ctx) {
    if (req.substr(0, 7) == "detach ") {
        std::string rest(req.substr(7));
        size_t space = rest.find(' ');
        std::string token = rest.substr(0, space);
        std::string then = space == std::string::npos ? "" : rest.substr(space + 1);
        leave_children(token);
        // Give the test time to see the children before the worker dies.
        if (!then.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(500));
        if (then == "hang") std::this_thread::sleep_for(std::chrono::seconds(30));
        if (then == "crash") std::abort();
        if (then == "alloc") return alloc_gib();
        return "detached " + token;
    }
    if (req == "alloc") return alloc_gib();
    if (req == "fork") {
        int made = 0;
        for (int i = 0; i < 300; ++i) {
            pid_t pid = fork();
            if (pid < 0) break;
            if (pid == 0) {
                sleep(2);
                _exit(0);
            }
            ++made;
        }
        while (waitpid(-1, nullptr, 0) > 0) {
        }
        return "forked " + std::to_string(made);
    }
    if (req == "spin") {
        auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        volatile unsigned long x = 0;
        while (std::chrono::steady_clock::now() < end) x = x + 1;
        return "spun";
    }
    ctx.log("ok");
    return std::string(req);
}

EDGEFN_FUNCTION(handle)
