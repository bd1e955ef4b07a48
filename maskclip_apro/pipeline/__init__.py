"""Running the segmenter over a dataset: the per-image loop (sharded over torchrun ranks, read
ahead in worker processes, batched by image size), reuse of saved results, and the refine runner
that writes label files. The evaluation runner (scores, no files per image but its records) is
maskclip_apro.evaluation.runner; the commands in cli/ build the objects and call these."""
