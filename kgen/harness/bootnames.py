"""The names of the ways a --kernel can be booted (kgen/harness/bootpath.py) and of the firmware, in a module of
their own: the command line lists them in its help without importing what boots."""

BOOT_METHODS = ("direct", "grub", "grub-multiboot2")
FIRMWARES = ("bios", "uefi")
