"""The two studies' summaries: the weight-scale sweep (``weight_scale``) and the per-device
batch-size study (``batch_size``), each a CSV and a figure written into its directory
(``summary``). They read what the trainer wrote; the trainer never imports them."""
