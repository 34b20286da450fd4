"""Networks: the MAR backbone, the causal GPT, the diffusion head, shared blocks."""
