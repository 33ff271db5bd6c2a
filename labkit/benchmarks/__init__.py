"""Chapter benchmarks: `labkit/benchmarks/<slug>.py` defines `run(quick=False) -> list[dict]`.

`labkit bench <chapter>` runs one and records it under data/bench/ (see labkit.bench).
"""
