"""Diffusion processes: Gaussian (MAR's DiffLoss, ADM/iDDPM)."""
