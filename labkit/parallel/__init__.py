"""Part IV: distributed training on real torch.distributed process groups."""
