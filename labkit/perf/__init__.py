"""Performance models and tools: roofline and arithmetic intensity, torch.compile / Inductor, torch.export."""
