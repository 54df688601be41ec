"""Test and benchmark support: tiny Gemma-4 checkpoints, engine runners, hook helpers."""
