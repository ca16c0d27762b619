"""The demo application's trainer: a job of one or many networks (members) trained with DDP over
a group of ranks, exact across world sizes, resumable from its run directory.

config (the typed schema) -> data, models, members -> loop (with resume, evaluation, records) and
checkpoint. It uses the layer and ``syncbn.distributed``; the experiments, the bench and
``syncbn.train`` use it.
"""
