"""Exercises of chapter 11-checkpointing (registered on import; graded by labkit.check).

    checkpointing.newest_valid     fn(checkpoints) -> step of the newest checkpoint whose manifest verifies, or None
    checkpointing.blocked_time     fn(n_steps, step_ms, interval, snapshot_ms, persist_ms) -> (sync_ms, async_ms)
    checkpointing.purge_set        fn(committed, partial, keep_last) -> sorted steps a keep-last-k purge deletes
    checkpointing.young_interval   fn(save_cost_s, mtbf_s) -> (best interval in seconds, fraction of time lost)
"""

from __future__ import annotations

import hashlib
import json

from labkit.exercises import Exercise, register
from labkit.train import checkpoint as ck

# --- checkpointing.newest_valid --------------------------------------------------------------------


def newest_valid(checkpoints: list[dict]) -> int | None:
    """Reference: checkpoints are dicts {"step": int, "manifest": str | None (MANIFEST.json's text),
    "files": {file name: bytes}}, in any order. Returns the largest step whose manifest parses and
    verifies (format, step, and every shard's size and sha256), else None."""
    for c in sorted(checkpoints, key=lambda c: c["step"], reverse=True):
        if c["manifest"] is None:
            continue
        try:
            ck.verify_manifest(json.loads(c["manifest"]), c["step"], lambda name: c["files"][name])
        except (ck.CheckpointError, ValueError):
            continue
        return c["step"]
    return None


def _checkpoint(rng, step: int, damage: str | None) -> dict:
    """A checkpoint of random shards, then optionally damaged one way."""
    files, shards = {}, {}
    for key in rng.sample(["model", "optimizer", "rng", "data", "scheduler"], rng.randint(1, 3)):
        name = f"{key}-{rng.getrandbits(32):08x}.pt"
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        files[name] = data
        shards[key] = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": ck.FORMAT, "step": step, "shards": shards}
    if damage == "flip":                                   # same size, one byte changed
        name = rng.choice(sorted(files))
        data = bytearray(files[name])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        files[name] = bytes(data)
    elif damage == "truncate":                             # a torn shard
        name = rng.choice(sorted(files))
        files[name] = files[name][:-1]
    elif damage == "missing":                              # a shard never written (or already purged)
        del files[rng.choice(sorted(files))]
    elif damage == "wrong_step":
        manifest["step"] = step + 1
    elif damage == "wrong_format":
        manifest["format"] = "something-else/1"
    text = json.dumps(manifest)
    if damage == "no_manifest":
        text = None
    elif damage == "torn_manifest":
        text = text[: rng.randrange(1, len(text))]
    return {"step": step, "manifest": text, "files": files}


_DAMAGES = ["flip", "truncate", "missing", "wrong_step", "wrong_format", "no_manifest", "torn_manifest"]


def _newest_cases(rng):
    yield dict(checkpoints=[])                                                  # nothing saved yet
    yield dict(checkpoints=[_checkpoint(rng, 100, None)])
    yield dict(checkpoints=[_checkpoint(rng, 100, None), _checkpoint(rng, 200, "flip")])   # bit flip in the newest
    yield dict(checkpoints=[_checkpoint(rng, 300, "no_manifest"), _checkpoint(rng, 200, None),
                            _checkpoint(rng, 100, None)])                       # a save interrupted before its commit
    for damage in _DAMAGES:                                                     # every kind, older ones fine
        yield dict(checkpoints=[_checkpoint(rng, 50, None), _checkpoint(rng, 70, damage)])
    yield dict(checkpoints=[_checkpoint(rng, s, rng.choice(_DAMAGES)) for s in (10, 20, 30)])  # none valid
    for _ in range(10):
        steps = rng.sample(range(0, 1000, 10), rng.randint(1, 6))
        cps = [_checkpoint(rng, s, rng.choice([None, None, *_DAMAGES])) for s in steps]
        rng.shuffle(cps)
        yield dict(checkpoints=cps)


register(Exercise(
    name="checkpointing.newest_valid",
    reference=newest_valid,
    cases=_newest_cases,
    hint="Newest step first; skip a checkpoint whose manifest is None, not JSON, of another format or step, or "
         "names a file that is missing, of another length, or whose hashlib.sha256(data).hexdigest() differs.",
))

# --- checkpointing.blocked_time ----------------------------------------------------------------------


def blocked_time(n_steps: int, step_ms: float, interval: int, snapshot_ms: float,
                 persist_ms: float) -> tuple[float, float]:
    """Reference: total ms the trainer is blocked by saves after every interval-th step, (sync, async)."""
    return ck.blocked_ms(n_steps, step_ms, interval, snapshot_ms, persist_ms)


def _blocked_cases(rng):
    yield dict(n_steps=10, step_ms=100.0, interval=5, snapshot_ms=20.0, persist_ms=300.0)   # persist fits
    yield dict(n_steps=10, step_ms=100.0, interval=2, snapshot_ms=20.0, persist_ms=500.0)   # it does not: waits
    yield dict(n_steps=4, step_ms=100.0, interval=5, snapshot_ms=20.0, persist_ms=300.0)    # no save at all
    yield dict(n_steps=6, step_ms=0.0, interval=1, snapshot_ms=1.0, persist_ms=10.0)        # back to back
    yield dict(n_steps=3, step_ms=50.0, interval=3, snapshot_ms=0.0, persist_ms=0.0)        # free saves
    for _ in range(15):
        yield dict(n_steps=rng.randint(1, 200), step_ms=rng.choice([0.0, rng.uniform(1, 500)]),
                   interval=rng.randint(1, 30), snapshot_ms=rng.uniform(0, 200), persist_ms=rng.uniform(0, 5000))


register(Exercise(
    name="checkpointing.blocked_time",
    reference=blocked_time,
    cases=_blocked_cases,
    rtol=1e-9, atol=1e-9,
    hint="Walk the steps with a clock t. Sync: each save adds snapshot_ms + persist_ms. Async: wait = "
         "max(0, end of the previous persist - t), then the snapshot; the new persist ends at t + persist_ms.",
))

# --- checkpointing.purge_set ---------------------------------------------------------------------------


def purge_set(committed: list[int], partial: list[int], keep_last: int) -> list[int]:
    """Reference: labkit.train.checkpoint.purge_plan."""
    return ck.purge_plan(committed, partial, keep_last)


def _purge_cases(rng):
    yield dict(committed=[], partial=[], keep_last=1)
    yield dict(committed=[100, 200, 300], partial=[], keep_last=2)
    yield dict(committed=[300, 100, 200], partial=[150, 400], keep_last=2)      # a torn old one, a save in flight
    yield dict(committed=[100], partial=[50], keep_last=2)                      # fewer than k: keep everything
    yield dict(committed=[10, 20, 30], partial=[5, 25], keep_last=1)
    yield dict(committed=[10, 20, 30], partial=[], keep_last=3)
    for _ in range(14):
        steps = rng.sample(range(0, 5000, 10), rng.randint(0, 12))
        cut = rng.randint(0, len(steps))
        yield dict(committed=steps[:cut], partial=steps[cut:], keep_last=rng.randint(1, 5))


register(Exercise(
    name="checkpointing.purge_set",
    reference=purge_set,
    cases=_purge_cases,
    hint="Find the keep_last-th newest committed step (none: delete nothing); delete every committed or "
         "partial step below it; return them sorted ascending.",
))

# --- checkpointing.young_interval -----------------------------------------------------------------------


def young_interval(save_cost_s: float, mtbf_s: float) -> tuple[float, float]:
    """Reference: (τ* = √(2·C·M), W* = √(2·C/M)), Young's optimum of W(τ) = C/τ + τ/(2M)."""
    return ck.young_interval(save_cost_s, mtbf_s)


def _young_cases(rng):
    yield dict(save_cost_s=1.0, mtbf_s=2.0)          # tau = 2, W = 1: checkpointing that costly is hopeless
    yield dict(save_cost_s=60.0, mtbf_s=86_400.0)    # a 1-minute save, a failure a day
    yield dict(save_cost_s=0.5, mtbf_s=86_400.0)     # the same run with async saves
    for _ in range(12):
        yield dict(save_cost_s=10 ** rng.uniform(-3, 3), mtbf_s=10 ** rng.uniform(2, 7))


register(Exercise(
    name="checkpointing.young_interval",
    reference=young_interval,
    cases=_young_cases,
    rtol=1e-9, atol=0.0,
    hint="Set dW/dτ = -C/τ² + 1/(2M) to zero: τ* = sqrt(2 C M); then W(τ*) = C/τ* + τ*/(2M) = sqrt(2 C / M).",
))

__all__ = ["blocked_time", "newest_valid", "purge_set", "young_interval"]
