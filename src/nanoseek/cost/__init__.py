"""What a model and a run cost: parameters, FLOPs, throughput, MFU."""
