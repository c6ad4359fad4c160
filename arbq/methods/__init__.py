"""Binarization algorithms: pure tensor math, no file or CLI access."""
