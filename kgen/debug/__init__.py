"""`kgen debug`: a kernel held under QEMU's gdbstub with gdb, its symbols and kgen's view of its memory.

Files by job: `launcher.py` (the subcommand: build, QEMU paused with -gdb, gdb in front of the terminal, no orphan),
`symbols.py` (where the ELF's sections are loaded: the second copy of the symbols for the boot stub), `gdb_kgen.py`
(the helper gdb sources: kgen-load, kgen-pt, kgen-free; it runs inside gdb's own Python). docs/debugging.md is the
user's guide.
"""
