"""Diffusion processes: noise schedules, the training loss and samplers."""
