"""`make bench`: kvbento side by side with its peers; results go to BENCHMARKS.md."""
