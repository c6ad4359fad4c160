"""Model-specific knowledge: which modules are decoder layers and linears (arch.py), and loading."""
