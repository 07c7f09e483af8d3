"""Facts of the x86 hardware and of the Multiboot v1 and v2 protocols.

Nothing here is kgen's choice: these values come from the Intel SDM and the Multiboot specification. kgen's own
choices (where things go, which slot is recursive) live in `layout.py`.
"""

PAGE_SIZE = 0x1000
PAGE_SHIFT = 12

# Page-directory / page-table entry bits (SDM vol. 3, 4.3, tables 4-4..4-6).
PTE_P = 0x001      # present
PTE_RW = 0x002     # writable
PTE_US = 0x004     # user-accessible
PTE_PWT = 0x008    # write-through
PTE_PCD = 0x010    # cache disable
PTE_A = 0x020      # accessed
PTE_D = 0x040      # dirty (leaf entries only)
PTE_PS = 0x080     # page size: a 4 MiB page in a PDE
PTE_G = 0x100      # global: survives a CR3 reload when CR4.PGE is on
PTE_FRAME_MASK = 0xFFFFF000
# Bit 63 of a 64-bit (PAE or 4-level) entry: XD, execute-disable, when EFER.NXE is on; a reserved bit when it is off.
PTE_NX = 1 << 63

# Paging geometry (levels, index bits, entry size) is a PagingMode, in kgen.arch.paging.

# Control registers and flags.
CR0_PE = 1 << 0
CR0_WP = 1 << 16             # supervisor writes honour read-only pages
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PGE = 1 << 7
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20           # ring 0 may not execute user pages
CR4_SMAP = 1 << 21           # ring 0 may not touch user pages (unless EFLAGS.AC)
EFLAGS_IF = 1 << 9           # interrupts enabled

# EFER (MSR 0xC0000080, SDM vol. 3, 2.2.1).
EFER_LME = 1 << 8            # long mode enable
EFER_LMA = 1 << 10           # long mode active (set by the CPU)
EFER_NXE = 1 << 11           # bit 63 of 64-bit paging entries is XD rather than reserved

# Page-fault error code bits.
PF_P = 1 << 0                # 1: protection violation, 0: page not present
PF_W = 1 << 1                # the access was a write
PF_U = 1 << 2                # the access came from ring 3
PF_RSVD = 1 << 3             # a reserved bit was set in a paging entry
PF_I = 1 << 4                # the access was an instruction fetch

# Exceptions that push an error code (vectors 8, 10-14, 17, 21, 29, 30).
EXCEPTIONS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
EXCEPTION_COUNT = 32
VECTOR_GENERAL_PROTECTION = 13
VECTOR_PAGE_FAULT = 14
VECTOR_DOUBLE_FAULT = 8

# Multiboot v1.
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002   # in EAX at entry
MULTIBOOT_FLAG_PAGE_ALIGN = 1 << 0
MULTIBOOT_FLAG_MEMORY_INFO = 1 << 1
MULTIBOOT_HEADER_SEARCH_LIMIT = 8192      # the header must lie in the first 8 KiB of the file
MULTIBOOT_HEADER_SIZE = 12                # magic, flags, checksum
MULTIBOOT_ADDRESS_HEADER_SIZE = 32        # with MULTIBOOT_FLAG_ADDRESSES: header_addr, load_addr, load_end_addr,
                                          # bss_end_addr, entry_addr follow
MULTIBOOT_INFO_MEM = 1 << 0               # mbi.flags: mem_lower/mem_upper valid
MULTIBOOT_INFO_CMDLINE = 1 << 2           # mbi.flags: cmdline valid
MULTIBOOT_INFO_MMAP = 1 << 6              # mbi.flags: mmap_length/mmap_addr valid
MULTIBOOT_MMAP_AVAILABLE = 1              # memory-map entry type of usable RAM
MULTIBOOT_INFO_SIZE = 0x58                # the fixed part of the information structure
MULTIBOOT_INFO_MMAP_LENGTH = 0x2C         # mbi offsets: mmap_length, then mmap_addr (entries of size, base,
MULTIBOOT_INFO_MMAP_ADDR = 0x30           # length, type; `size` excludes its own 4 bytes)

# Multiboot 2 (the Multiboot2 specification 2.0; GRUB's `multiboot2` command). The header is a list of tags after
# magic, architecture, header_length and checksum (the four sum to 0), 8-byte aligned in the first 32 KiB.
MULTIBOOT2_HEADER_MAGIC = 0xE85250D6
MULTIBOOT2_BOOTLOADER_MAGIC = 0x36D76289  # in EAX at entry; EBX holds the boot information's physical address
MULTIBOOT2_HEADER_SEARCH_LIMIT = 32768    # the header must lie entirely in the first 32 KiB of the file
MULTIBOOT2_HEADER_ALIGN = 8               # at an offset that is a multiple of 8; tags are 8-aligned too
MULTIBOOT2_HEADER_FIXED_SIZE = 16         # magic, architecture, header_length, checksum
MULTIBOOT2_ARCHITECTURE_I386 = 0          # entered in 32-bit protected mode, paging off (also for x86-64 kernels)
# Header tag types (what the kernel asks of the loader).
MULTIBOOT2_HEADER_TAG_END = 0
MULTIBOOT2_HEADER_TAG_RELOCATABLE = 10    # min_addr, max_addr, align, preference: load anywhere in that range
MULTIBOOT2_HEADER_TAGS = {
    0: "end", 1: "information request", 2: "address", 3: "entry address", 4: "console flags", 5: "framebuffer",
    6: "module alignment", 7: "EFI boot services", 8: "EFI i386 entry address", 9: "EFI amd64 entry address",
    10: "relocatable",
}
MULTIBOOT2_RELOCATABLE_PREFERENCES = {0: "anywhere", 1: "lowest", 2: "highest"}

# PC platform. The first MiB holds the BIOS data area, VGA memory and option ROMs; Multiboot kernels load above it.
LOW_MEMORY_END = 0x100000
# The legacy window below 1 MiB shows VGA memory or BIOS shadow copies (the chipset's PAM registers decide): not RAM.
LEGACY_HOLE = (0xA0000, LOW_MEMORY_END)
# VGA text mode 3, which the BIOS leaves set: 80 x 25 cells, row after row, each the character then its attribute.
VGA_TEXT_BUFFER = 0xB8000
VGA_TEXT_COLUMNS = 80
VGA_TEXT_ROWS = 25
VGA_TEXT_CELL = 2
VGA_TEXT_CODEPAGE = "cp437"
# The serial ports' I/O bases and IRQ lines, COM1 first (kgen/protocol.py says which is used for what).
COM1_PORT = 0x3F8
COM2_PORT = 0x2F8
COM_PORTS = (COM1_PORT, COM2_PORT)

# Segment descriptors (SDM vol. 3, 3.4.5). Access bytes have the accessed bit preset so the CPU never writes the GDT.
SEG_ACCESS_KERNEL_CODE = 0x9B   # present, ring 0, code, readable, accessed
SEG_ACCESS_KERNEL_DATA = 0x93   # present, ring 0, data, writable, accessed
SEG_FLAGS_32BIT_4K = 0xC        # 4 KiB granularity, 32-bit default operand size
IDT_GATE_INTERRUPT32 = 0x8E00   # the type word of a gate: present, ring 0, 32-bit interrupt gate
SEG_ACCESS_DPL3 = 0x60          # descriptor privilege level 3 in an access byte: usable from ring 3
IDT_GATE_DPL3 = 0x6000          # the same in a gate's type word: `int n` from ring 3 may use the gate
SELECTOR_RPL3 = 0x3             # requested privilege level 3 in a selector
SEG_ACCESS_TSS32 = 0x89         # present, ring 0, available 32-bit TSS
TSS32_SIZE = 0x68
TSS_SP0 = 0x4                   # offset of the ring-0 stack pointer (esp0 / rsp0) in a TSS, both formats
TSS32_SS0 = 0x8                 # offset of the 32-bit TSS's ring-0 stack segment
TSS32_IOMAP = 0x66              # offset of the I/O map base: at the limit or beyond, ring 3 has no I/O port
EFLAGS_RESERVED = 0x2           # bit 1 reads as one; the user's flags start with IF clear (run to completion)


def segment_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """Pack a GDT entry; `limit` is in units of the granularity the flags select."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((base >> 24) & 0xFF) << 56)


def error_code_mask() -> int:
    """Bit v set when exception vector v pushes an error code."""
    return sum(1 << v for v in EXCEPTIONS_WITH_ERROR_CODE)


def multiboot_header_checksum(flags: int) -> int:
    return (-(MULTIBOOT_HEADER_MAGIC + flags)) & 0xFFFFFFFF


def multiboot2_header_checksum(architecture: int, header_length: int) -> int:
    return (-(MULTIBOOT2_HEADER_MAGIC + architecture + header_length)) & 0xFFFFFFFF

EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
    10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault", 13: "#GP general protection",
    14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check",
    19: "#XM SIMD error", 20: "#VE virtualization", 21: "#CP control protection",
}


def describe_page_fault_error(code: int) -> str:
    parts = ["protection violation" if code & PF_P else "page not present",
             "write" if code & PF_W else "read",
             "user" if code & PF_U else "supervisor"]
    if code & PF_RSVD:
        parts.append("reserved bit set")
    if code & PF_I:
        parts.append("instruction fetch")
    return ", ".join(parts)


# The exceptions whose error code names a selector (SDM vol. 3, 6.13): bit 0 EXT (raised while delivering an
# external event), bit 1 IDT (the index is an IDT vector), else bit 2 TI (LDT, not GDT); the index from bit 3 up.
SELECTOR_ERROR_VECTORS = (10, 11, 12, 13)


def describe_error_code(vector: int, code: int) -> str | None:
    """The error code's bits in words: a #PF's access, or the selector of a #TS, #NP, #SS or #GP; None when the
    code says nothing more than its number (0 for a #GP that names no selector, a vector without one)."""
    if vector == VECTOR_PAGE_FAULT:
        return describe_page_fault_error(code)
    if vector not in SELECTOR_ERROR_VECTORS or code == 0:
        return None
    table = "IDT vector" if code & 0b10 else "LDT selector" if code & 0b100 else "GDT selector"
    index = code >> 3
    text = f"{table} {index:#x}" if code & 0b10 else f"{table} {index * 8:#x}"
    return text + (", while delivering an external event" if code & 1 else "")

# 8259 PICs and the 16550 UART registers kgen touches.
PIC1_COMMAND, PIC1_DATA = 0x20, 0x21
PIC2_COMMAND, PIC2_DATA = 0xA0, 0xA1
PIC_EOI = 0x20
PIC_IRQ_COUNT = 16
COM1_IRQ = 4
COM2_IRQ = 3
COM_IRQS = (COM1_IRQ, COM2_IRQ)
UART_IER_RX_AVAILABLE = 0x01
UART_LSR_DATA_READY = 0x01
UART_LSR_TX_EMPTY = 0x20     # THRE: room for the next byte (the FIFO is empty); the last may still be sending
UART_LSR_TX_DONE = 0x40      # TEMT: FIFO and shift register empty, every byte handed on (QEMU: to the chardev)
UART_MCR_DTR_RTS_OUT2 = 0x0B    # OUT2 gates the UART's interrupt line to the PIC

# Long mode (SDM vol. 3, 4.5 and 5.2; AMD APM vol. 2, 14.6).
MSR_EFER = 0xC0000080
EFER_SCE = 1 << 0            # syscall/sysret enabled
MSR_STAR = 0xC0000081        # syscall's CS/SS (bits 47..32) and sysret's base selector (bits 63..48)
MSR_LSTAR = 0xC0000082       # syscall's 64-bit entry point
MSR_FMASK = 0xC0000084       # RFLAGS bits syscall clears
EFLAGS_TF_IF_DF = 0x700      # trap, interrupt and direction flags
CPUID_EXTENDED_MAX = 0x80000000
CPUID_EXTENDED_FEATURES = 0x80000001
CPUID_EDX_LONG_MODE = 1 << 29
CPUID_EDX_NX = 1 << 20
SEG_FLAGS_64BIT_CODE = 0xA   # 4 KiB granularity, L: a 64-bit code segment (D must be 0)
SEG_FLAG_L, SEG_FLAG_D = 0x2, 0x4   # a descriptor's flags nibble: L, 64-bit code; D, 32-bit default operands
SEG_ACCESS_CODE = 0x98       # the access bits every code descriptor has: present, S (code or data), code
SEG_ACCESS_TSS64 = 0x89      # present, ring 0, available 64-bit TSS
IDT_GATE_INTERRUPT64 = 0x8E00  # the type word of a long-mode interrupt gate: present, ring 0
TSS64_SIZE = 0x68
TSS64_IST1 = 0x24            # offset of the first interrupt stack table pointer
# Multiboot header flag 16: the header carries the load addresses, so a loader needs no ELF32 program headers
# (QEMU's -kernel takes an ELF64 kernel only this way).
MULTIBOOT_FLAG_ADDRESSES = 1 << 16
