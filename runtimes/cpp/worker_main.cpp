// main() of an isolated C++ worker: compiled and linked next to the function's sources by
// runtimes/cppbuild.py. Everything lives in the header so the protocol host is one file to read.
#include "edgefn_worker.hpp"

int main() { return edgefn::worker::run(); }
