"""Getting a chain out: packages (vhd, fixed, raw, chain-tar byte streams), compression, digests, export (one
pass to a file or an object store through upload/), verify (an exported copy against its source)."""
