"""Hydra config groups of patchify (a package so that Hydra finds them in an installed copy too)."""
