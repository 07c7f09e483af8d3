"""kgen: generate a freestanding higher-half x86 kernel and check its paging on a QEMU machine.

Data flows one way: config -> layout -> assembled units -> linked image -> ELF -> ISO -> machine -> inspection.
"""

__version__ = "0.1.0"
