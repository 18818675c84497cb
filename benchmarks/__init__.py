"""Speed and memory benchmarks, run side by side with peers on this machine (`make bench`)."""
