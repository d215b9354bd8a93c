"""Edges over diffusers/transformers: the only package allowed to import them."""
