module edgefn.dev/conformance

go 1.21

require edgefn.dev/sdk v0.0.0
