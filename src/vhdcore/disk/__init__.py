"""A disk as vhdcore reads and writes it: one .vhd file (image), the chain of parents as one virtual disk (chain),
the runs every operation consumes (extents), and the one lock order of every chain writer (locks)."""
