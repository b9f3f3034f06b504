"""Experiments built from the trainer and the evaluators: the ablation study of SCALE's claims."""
