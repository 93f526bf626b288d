"""The run, stage by stage: open OUT, prepare views and maps (the CAM pass), plan each output, mix,
encode and write shards; ``run`` strings them together."""
