"""The guest view: what a stopped machine holds, read through page tables, registers and the ELF."""
