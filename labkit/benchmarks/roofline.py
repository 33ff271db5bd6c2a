"""Benchmarks of chapter 01-roofline: measured points to place on the roofline.

The machine's own roofs (a matmul's FLOP/s and a copy's bytes/s, `probe_device`), then GEMMs
of growing size, an elementwise add, a softmax, an RMSNorm, decode GEMVs at batch 1 and 64,
and naive vs fused attention. Each result names the device, and carries the op's FLOPs,
bytes, intensity, median time, achieved TFLOP/s and GB/s, and the fraction of the roofline
bound (from the probed roofs) it reached. fp32 on a CPU, bf16 on a GPU.
"""

from __future__ import annotations

from labkit import runtime
from labkit.perf import roofline as rl


def cases(quick: bool = False) -> list[tuple[str, dict]]:
    """(kind, shape) of every measured op for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"cases: quick must be a bool, got {type(quick).__name__}")
    gpu = runtime.on_gpu()
    if gpu:
        gemm_sizes = (256, 1024, 4096) if quick else (256, 1024, 2048, 4096, 8192)
        n_elem, rows, cols, hidden = (2**26, 8192, 4096, 4096) if quick else (2**28, 32768, 4096, 8192)
        gemv_dim, T, heads = (4096, 1024, 16) if quick else (8192, 4096, 32)
    else:
        gemm_sizes = (32, 128, 384) if quick else (32, 128, 256, 512)
        n_elem, rows, cols, hidden = (2**18, 256, 256, 512) if quick else (2**20, 1024, 512, 1024)
        gemv_dim, T, heads = (512, 128, 2) if quick else (1024, 256, 4)
    out: list[tuple[str, dict]] = [("gemm", dict(M=n, N=n, K=n)) for n in gemm_sizes]
    out += [
        ("elementwise", dict(n=n_elem)),
        ("softmax", dict(rows=rows, cols=cols)),
        ("rmsnorm", dict(tokens=rows, hidden=hidden)),
        ("gemv", dict(N=gemv_dim, K=gemv_dim, batch=1)),
        ("gemv", dict(N=gemv_dim, K=gemv_dim, batch=64)),
        ("attention", dict(batch=1, heads=heads, seq_len=T, head_dim=64 if not gpu else 128, fused=False)),
        ("attention", dict(batch=1, heads=heads, seq_len=T, head_dim=64 if not gpu else 128, fused=True)),
    ]
    return out


def run(quick: bool = False) -> list[dict]:
    """Measure every case on the current device; one dict per op (plus the probed roofs)."""
    from tqdm.auto import tqdm

    dtype = runtime.pick(cpu="fp32", gpu="bf16")
    probe = rl.probe_device((dtype,))
    peak, bw = probe.peak(dtype), probe.bandwidth
    results = [{"name": "probe: matmul peak", "kind": "probe", "dtype": dtype, "device": probe.name,
                "tflops": peak / 1e12},
               {"name": "probe: copy bandwidth", "kind": "probe", "dtype": dtype, "device": probe.name,
                "gb_per_s": bw / 1e9}]
    for kind, shape in tqdm(cases(quick), desc="roofline benchmarks", leave=False):
        m = rl.measure_op(kind, dtype=dtype, repeats=5 if quick else 10, **shape)
        row = m.as_dict()
        row["roof_fraction"] = m.flops_per_s / rl.attainable(probe, m.intensity, dtype)
        results.append(row)
    return results


def device_from_record(record: dict) -> rl.Device:
    """The probed roofs stored in a record (from `run`, or `labkit.bench.load("01-roofline")`)."""
    if isinstance(record, dict) and "results" in record:
        record = record["results"]
    if not isinstance(record, list):
        raise TypeError(f"device_from_record: expected a record or its results list, got {type(record).__name__}")
    peak = next((r for r in record if r.get("name") == "probe: matmul peak"), None)
    copy = next((r for r in record if r.get("name") == "probe: copy bandwidth"), None)
    if peak is None or copy is None:
        raise ValueError("device_from_record: the record has no 'probe: ...' rows")
    return rl.Device(peak["device"], {peak["dtype"]: peak["tflops"] * 1e12}, copy["gb_per_s"] * 1e9,
                     source="labkit.benchmarks.roofline record")


__all__ = ["cases", "device_from_record", "run"]
