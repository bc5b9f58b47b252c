"""Backends of the rank computation: each computes DESIGN.md §1 and §3 for (Q, N) scores."""
