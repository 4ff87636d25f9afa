module edgefn.dev/sdk

go 1.21
