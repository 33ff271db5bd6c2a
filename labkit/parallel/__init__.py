"""Part IV: distributed training on real torch.distributed process groups (gloo on CPU, NCCL on GPUs).

    launching ranks                labkit.parallel.launch    (every chapter of Part IV)
    ZeRO stages 0-3                labkit.parallel.zero      chapter 12
    ZeRO-Infinity offload          labkit.parallel.offload   chapter 12
    FSDP with offload and prefetch labkit.parallel.fsdp      chapter 13
    pipeline schedules             labkit.parallel.pipeline  chapter 14
    tensor parallelism             labkit.parallel.tensor    chapter 15

Used through their modules (`from labkit.parallel import launch; launch.launch(fn, 2)`): nothing is
re-exported here, so no function hides the module of the same name.
"""
