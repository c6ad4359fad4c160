"""Pipeline stages: each reads and writes plain files so it can be resumed, rerun or swapped."""
