"""GB6 benchmark harness (figures, never pass/fail). See bench/README.md."""
