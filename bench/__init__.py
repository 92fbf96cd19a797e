"""Benchmarks of Tollgate against a direct upstream and a bare pass-through proxy."""
