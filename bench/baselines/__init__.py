"""Baselines that clusterfuse is measured against: PyTorch blocks under one CUDA graph
(`torch_blocks`) and a gpt-fast-style whole-model decode step (`gpt_fast_decode`)."""
