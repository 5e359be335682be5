//! Testbed and benchmarks for spegel: real containerd, real registry, network namespaces.
