"""Where KV groups are stored and how they move: layout, host slabs, disks, the disk pool, row copies."""
