"""Running the segmenter over a dataset: the per-image loop (sharded over torchrun ranks, read
ahead in worker processes, batched by image size), reuse of saved results, and the two runners
built on it: refine (pipeline.refine, label files) and score (pipeline.score, confusion matrices
for evaluate and compare). The commands in cli/ build the objects and call these; the metrics
themselves are maskclip_apro.evaluation."""
