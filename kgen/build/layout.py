"""Where everything goes: every address, slot and size of the kernel, computed once from the config.

Templates receive these values as named assembler constants (`Layout.asm_constants`); tests and the harness read
them from the same object. Nothing else in kgen decides an address.
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen import protocol
from kgen.arch import hw
from kgen.arch import Arch, named
from kgen.build.config import DECIMAL_KEYS, PMM_KINDS, Config, show_int, show_value
from kgen.build.variants import VARIANT_NAMES, VARIANTS
from kgen.errors import ConfigError

MIB = 1 << 20
FOUR_GIB = 1 << 32
MIN_MEMORY_MIB = 16
# Guest RAM the kernel needs above its image window, beyond the tables vmm_init makes at boot: frames for page
# tables, the heap and the temp-map round trips of `kgen test` (which take their frames above the image).
RAM_ABOVE_IMAGE = 4 * MIB
# The i386 user half [0, kernel.virtual_base) is at least this large: user programs and the suite's address spaces
# put their pages there (x86_64's user half is always the lower canonical half).
I386_MIN_USER_HALF = 0x40000000
# Room the vmm window keeps for vmm_alloc beyond the heap's slab window, in last-level page tables' spans: enough
# for ranges that make page tables and give them back.
VMM_ROOM_TABLES = 2
# The image of an x86_64 kernel lies in the top 2 GiB, so every kernel address is a sign-extended 32-bit value:
# `push offset label`, `mov [label], eax` and call/jump targets encode in 32 bits (GCC's -mcmodel=kernel).
TOP_2_GIB = (1 << 64) - (1 << 31)


@dataclass(frozen=True)
class Region:
    """A named half-open range of virtual (or physical) addresses."""
    name: str
    key: str          # the config key that places it, for error messages
    value: int        # that key's value
    start: int
    end: int

    def overlaps(self, other: "Region") -> bool:
        return self.start < other.end and other.start < self.end

    def __str__(self) -> str:
        return f"{self.name} [{self.start:#010x}, {self.end:#010x})"


@dataclass(frozen=True)
class Layout:
    """The i386 kernel's memory map (defaults shown; every value comes from the config).

    Virtual                                   Physical
    0x00000000 .. 0xC0000000  user half: empty after boot (identity map of the image is dropped)
    0xC0000000                virtual_base maps physical 0
    0xC0100000 .. +max_size   kernel image window      ->  0x00100000 .. +max_size (load_address)
                              .multiboot .text | .rodata | .data .bss (boot page tables, stack, boot info)
    0xD0000000 .. +vmm.size   vmm range window: vmm_alloc hands out page ranges here, backed now or on first touch
    0xFF400000 .. 0xFF7FFFFF  foreign window: PD[foreign_slot] -> an attached space's PD, whose page tables appear
                              here; that PD itself at recursive_base + foreign_slot*4K (templates/aspace.s)
    0xFF800000 .. +slots*4K   temp-map window: one page table, PTEs rewritten by temp_map()/temp_unmap()
    0xFFBE8000 .. 0xFFBFFFFF  pmm bitmap window (pmm.kind = "bitmap"): the last pages of the temp-map's page table,
                              room for a bit per frame of the most RAM the architecture takes; pmm_init maps as many
                              pages as the memory map's RAM needs (templates/pmm_bitmap.s)
    0xFFC00000 .. 0xFFFFFFFF  recursive window: PD[recursive_slot] -> PD, so page table i is at
                              recursive_base + i*4K and the PD itself at recursive_base + slot*4K

    During boot the image window is also identity-mapped (PD[load_address >> 22 ...]) so the code that turns
    paging on keeps running; the boot stub removes those entries after jumping to the higher half.

    The x86_64 kernel's memory map (defaults shown):

    Virtual                                          Physical
    0x0000000000000000 .. 0x00007FFFFFFFFFFF  user half (PML4[0..255]): empty after boot
    0xFFFFFD8000000000 .. 0xFFFFFDFFFFFFFFFF  foreign window (PML4[507]): an attached space's PTEs; its PDs,
                                              PDPTs and PML4 through the recursive slot (Layout.foreign_level_window)
    0xFFFFFE0000000000 .. +vmm.size           vmm range window (PML4[508])
    0xFFFFFE8000000000 .. +slots*4K           temp-map window (PML4[509]), one page table
    0xFFFFFE8000180000 .. 0xFFFFFE80001FFFFF  pmm bitmap window (pmm.kind = "bitmap"), the end of that page table
    0xFFFFFF0000000000 .. 0xFFFFFF7FFFFFFFFF  recursive window: PML4[510] -> PML4. The PTEs of all memory fill it;
                                              the PDEs sit at 0xFFFFFF7F80000000, the PDPTEs at 0xFFFFFF7FBFC00000,
                                              the PML4 itself at 0xFFFFFF7FBFDFE000 (Arch.recursive_window)
    0xFFFFFFFF80000000                        virtual_base maps physical 0 (PML4[511], PDPT[510]: the top 2 GiB)
    0xFFFFFFFF80100000 .. +max_size           kernel image window      ->  0x00100000 .. +max_size

    The 32-bit entry builds the tables for the image (at its higher-half address and identity) and for the temp-map
    window from a pool in .bss (`boot_page_tables`, `boot_table_count` tables: counted here by the same walk), enters
    long mode, jumps to the higher half and clears PML4[0..255], the identity map with it.
    """

    arch: Arch                      # what differs between i386 and x86_64 (kgen.arch): ask it, never its name
    page_size: int
    # Kernel image.
    kernel_virtual_base: int        # virtual address of physical 0 in the kernel half
    kernel_load_address: int        # physical address of the image
    kernel_max_size: int
    kernel_stack_size: int
    # Recursive mapping, and the foreign slot that shows another address space's tables (templates/aspace.s).
    recursive_slot: int
    foreign_slot: int
    # Temp-map window.
    tempmap_base: int
    tempmap_slots: int
    # Kernel virtual-range allocator.
    vmm_base: int
    vmm_size: int
    # Guest.
    memory_mib: int
    # The physical frame allocator: "stack" or "bitmap" (config.PMM_KINDS).
    pmm_kind: str = PMM_KINDS[0]
    # Segment selectors of kgen's GDT: null, kernel code, kernel data; then, per architecture, the TSS and ring 3's
    # (Arch.tss_selector, user_code_selector, user_data_selector).
    kernel_cs: int = 0x08
    kernel_ds: int = 0x10
    # User mode (templates/task.s).
    user_text_base: int = 0x400000     # where a user program's read-only text is mapped
    user_lazy_base: int = 0x10000000   # a user range backed on first touch: data and the stack's top
    user_lazy_size: int = 0x100000
    task_max: int = 8
    task_record_words: int = 8         # a task record's size in words; its first word the state
    task_ready: int = 1                # the state of a task created and not run yet
    syscall_vector: int = 0x80
    user_null_calls: int = 0x100       # system calls user_null_calls makes (kgen.harness.bench_aspace)
    # What the boot stub keeps of the Multiboot information before the identity mapping goes away.
    boot_mmap_max_entries: int = 32
    boot_mmap_entry_size: int = 24     # base (8), length (8), type (4), padding (4)
    boot_cmdline_max: int = 256
    # The PIC's interrupts (the call channel's IRQ wakes the serving kernel; kgen/protocol.py has the channel).
    irq_base: int = 0x20               # PIC vectors 0x20..0x2f, clear of the CPU's exceptions
    # Bounded metadata of the virtual-range allocator (templates/vmm.s): free ranges and live allocations.
    vmm_free_slots: int = 128
    vmm_alloc_slots: int = 128
    # The heap (templates/heap.s): slab pages come from a window of this many pages in the vmm range window.
    heap_slab_pages: int = 1024
    heap_min_shift: int = 4            # smallest block: 16 bytes
    heap_max_shift: int = 11           # largest slab block: 2048 bytes; bigger requests get whole pages
    heap_slab_header: int = 0x40
    heap_slab_magic: int = 0x48454150  # "HEAP"
    heap_large_slots: int = 64
    # Address spaces (templates/aspace.s): live top-level tables, the boot one included.
    as_max_spaces: int = 16
    # The build variants seeded in this kernel (names from kgen/build/variants.py): each bug's constant is 1.
    variants: frozenset[str] = frozenset()

    # ---- the architecture ------------------------------------------------------------------------------------
    @property
    def kernel_half_start(self) -> int:
        """Where the kernel half begins: the i386 kernel owns everything from its virtual base (3 GiB by default);
        on x86_64 the upper canonical half, PML4[256..511], which every address space will share."""
        return self.kernel_virtual_base if self.arch.kernel_half_at_base else self.arch.kernel_half

    def level_window(self, level: int) -> int:
        """Virtual address of the entries of paging level `level` (0 = top) through the recursive slot."""
        return self.arch.recursive_window(self.recursive_slot, level)

    def entry_address(self, vaddr: int, level: int) -> int:
        """Virtual address of the entry that maps `vaddr` at `level`, reached through the recursive slot."""
        return self.arch.entry_address(self.recursive_slot, vaddr, level)

    def foreign_level_window(self, level: int) -> int:
        """Virtual address of the attached (foreign) space's entries of level `level` (0 = its top table)."""
        return self.arch.recursive_window(self.recursive_slot, level, foreign=self.foreign_slot)

    def foreign_entry_address(self, vaddr: int, level: int) -> int:
        """Virtual address of the entry that maps `vaddr` at `level` in the attached space."""
        arch = self.arch
        return self.foreign_level_window(level) + ((vaddr & arch.va_mask) >> arch.shift(level)) * arch.entry_size

    @property
    def foreign_window(self) -> Region:
        """The top-level slot that maps an attached space's tables: its leaf entries fill it."""
        base = self.arch.canonical(self.foreign_slot << self.arch.shift(0))
        return Region("foreign window", "paging.foreign_slot", self.foreign_slot, base,
                      base + self.arch.span(0))

    @property
    def user_half_end(self) -> int:
        """Addresses below this belong to one address space; from the kernel half on, all spaces share them."""
        return self.kernel_half_start & self.arch.va_mask     # on x86_64 the end of the lower canonical half

    @property
    def leaf_table_span(self) -> int:
        """Bytes one last-level page table maps (4 MiB on i386, 2 MiB on x86_64)."""
        return self.arch.span(self.arch.levels - 2)

    @property
    def boot_table_count(self) -> int:
        """Tables the x86_64 boot stub takes from its .bss pool: one per table on the paths to the image's pages
        (higher half and identity) and to the temp-map window's page table, the top table not counted."""
        arch = self.arch
        tables: set[tuple[int, ...]] = set()

        def path_to(vaddr: int, depth: int):
            for level in range(1, depth + 1):
                tables.add(tuple((vaddr & arch.va_mask) >> arch.shift(lv) & (arch.entries_per_table - 1)
                                 for lv in range(level)))

        for offset in range(0, self.kernel_max_size, self.leaf_table_span):
            path_to(self.kernel_virtual_start + offset, arch.levels - 1)
            path_to(self.kernel_load_address + offset, arch.levels - 1)
        path_to(self.kernel_window.end - 1, arch.levels - 1)
        path_to(self.kernel_load_address + self.kernel_max_size - 1, arch.levels - 1)
        path_to(self.tempmap_base, arch.levels - 1)
        return len(tables)

    # ---- derived addresses -------------------------------------------------------------------------------
    @property
    def kernel_virtual_start(self) -> int:
        return self.kernel_virtual_base + self.kernel_load_address

    @property
    def kernel_window(self) -> Region:
        return Region("kernel image window", "kernel.max_size", self.kernel_max_size, self.kernel_virtual_start,
                      self.kernel_virtual_start + self.kernel_max_size)

    @property
    def identity_window(self) -> Region:
        """Where the image is identity-mapped while paging is switched on."""
        return Region("boot identity window", "kernel.load_address", self.kernel_load_address,
                      self.kernel_load_address, self.kernel_load_address + self.kernel_max_size)

    @property
    def recursive_base(self) -> int:
        return self.level_window(self.arch.levels - 1)

    @property
    def recursive_window(self) -> Region:
        return Region("recursive window", "paging.recursive_slot", self.recursive_slot, self.recursive_base,
                      self.recursive_base + self.arch.span(0))

    @property
    def recursive_top(self) -> int:
        """Virtual address at which the top-level table (PD, PML4) sees itself."""
        return self.level_window(0)

    @property
    def recursive_pd(self) -> int:
        """The i386 name of `recursive_top`."""
        return self.recursive_top

    def recursive_pt(self, pde_index: int) -> int:
        """Virtual address of the page table that PD[pde_index] points at."""
        return self.recursive_base + pde_index * self.page_size

    @property
    def tempmap_window(self) -> Region:
        return Region("temp-map window", "tempmap.base", self.tempmap_base, self.tempmap_base,
                      self.tempmap_base + self.tempmap_slots * self.page_size)

    @property
    def tempmap_pde_index(self) -> int:
        """Index of the temp-map window's page table among all page tables (its PDE's index on i386)."""
        return (self.tempmap_base & self.arch.va_mask) // self.leaf_table_span

    @property
    def tempmap_pt(self) -> int:
        """Virtual address of the temp-map window's page table through the recursive slot."""
        return self.entry_address(self.tempmap_base & ~(self.leaf_table_span - 1), self.arch.levels - 1)

    def tempmap_slot_address(self, slot: int) -> int:
        return self.tempmap_base + slot * self.page_size

    @property
    def kernel_pde_first(self) -> int:
        return self.kernel_virtual_start >> self.arch.shift(0)

    @property
    def kernel_pde_count(self) -> int:
        """Page tables the boot stub needs for the image window (shared by its identity and higher-half PDEs)."""
        last = (self.kernel_window.end - 1) >> self.arch.shift(0)
        return last - self.kernel_pde_first + 1

    @property
    def identity_pde_first(self) -> int:
        return self.kernel_load_address >> self.arch.shift(0)

    @property
    def tempmap_in_image_table(self) -> bool:
        """i386: the temp-map window lies in one of the image window's page tables (tempmap.base = 0xC0000000 below
        an image at 0xC0100000), so the boot stub points no PDE of its own at it: the slots are PTEs of that table."""
        first = self.kernel_pde_first
        return self.arch.boot_shares_tables and first <= self.tempmap_pde_index < first + self.kernel_pde_count

    @property
    def boot_page_tables(self) -> int:
        """Page tables allocated in .bss: the image window's plus the temp-map window's, unless it shares one."""
        return self.kernel_pde_count + (0 if self.tempmap_in_image_table else 1)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def success_status(self) -> int:
        return protocol.exit_status(protocol.DEBUG_EXIT_SUCCESS)

    @property
    def failure_status(self) -> int:
        return protocol.exit_status(protocol.DEBUG_EXIT_FAILURE)

    @property
    def multiboot_header_flags(self) -> int:
        flags = hw.MULTIBOOT_FLAG_PAGE_ALIGN | hw.MULTIBOOT_FLAG_MEMORY_INFO
        if self.arch.word_size == 8:
            flags |= hw.MULTIBOOT_FLAG_ADDRESSES    # QEMU's -kernel loads an ELF64 only through these fields
        return flags

    def asm_strings(self) -> dict[str, str]:
        """String constants the templates name as labels (generated into .rodata by the build)."""
        return {"serve_token": protocol.SERVE_TOKEN, "top_table_name": self.arch.paging.level_names[0]}

    @property
    def vmm_init_tables(self) -> int:
        """Frames vmm_init takes at boot: on x86_64 a PDPT for every kernel-half PML4 entry the boot stub left
        empty (so every address space can share the kernel half by copying those entries); none on i386."""
        if self.arch.kernel_half_generation:
            return 0
        arch = self.arch
        made_at_boot = {self.recursive_slot, self.foreign_slot} | {
            (v & arch.va_mask) >> arch.shift(0)
            for v in (self.kernel_virtual_start, self.kernel_window.end - 1, self.tempmap_base)}
        first = (self.kernel_half_start & arch.va_mask) >> arch.shift(0)
        return len(set(range(first, arch.entries_per_table)) - made_at_boot)

    @property
    def vmm_min_size(self) -> int:
        """The smallest vmm window: the heap's slab window, which heap_init reserves at boot, and room beyond it for
        vmm_alloc (VMM_ROOM_TABLES last-level tables' span)."""
        return self.heap_slab_pages * self.page_size + VMM_ROOM_TABLES * self.leaf_table_span

    @property
    def ram_needed(self) -> int:
        """Guest RAM the kernel needs: up to the end of its image window, then the frames of the tables vmm_init
        makes at boot and RAM_ABOVE_IMAGE more."""
        return (self.kernel_load_address + self.kernel_max_size + self.vmm_init_tables * self.page_size
                + RAM_ABOVE_IMAGE)

    @property
    def vmm_none(self) -> int:
        """vmm_translate/vmm_unmap's answer for "nothing mapped there": all ones, where no frame can start."""
        return self.arch.word_mask

    @property
    def vmm_window(self) -> Region:
        return Region("vmm range window", "vmm.base", self.vmm_base, self.vmm_base, self.vmm_base + self.vmm_size)

    @property
    def pmm_bitmap_window(self) -> Region:
        """Where the bitmap allocator maps its bitmap: the last pages of the temp-map window's page table, which the
        boot stub makes, so pmm_init maps the bitmap before any allocator exists to make a table. Sized for a bit
        per frame of the most RAM the architecture takes (pmm_init maps only the pages the memory map needs)."""
        bits = self.arch.max_memory_mib * MIB // self.page_size
        size = -(-bits // 8 // self.page_size) * self.page_size
        end = (self.tempmap_base & ~(self.leaf_table_span - 1)) + self.leaf_table_span
        return Region("pmm bitmap window", "pmm.kind", self.pmm_kind, end - size, end)

    @property
    def pmm_reserved_intervals(self) -> int:
        """[start, end) pairs pmm_init keeps out of the allocator: the image and the Multiboot information; the
        bitmap's own frames a third."""
        return 2 if self.pmm_kind == "stack" else 3

    @property
    def pmm_unit(self) -> str:
        """The template of the frame allocator this kernel is built with."""
        return "pmm" if self.pmm_kind == "stack" else f"pmm_{self.pmm_kind}"

    def regions(self) -> list[Region]:
        regions = [self.kernel_window, self.identity_window, self.recursive_window, self.tempmap_window,
                   self.vmm_window, self.foreign_window]
        return regions + [self.pmm_bitmap_window] if self.pmm_kind == "bitmap" else regions

    # ---- what the templates see --------------------------------------------------------------------------
    def asm_constants(self) -> dict[str, int]:
        """Every value a template may name. Layout choices, hardware facts and the kernel<->host contract
        (kgen/protocol.py) side by side, each named once."""
        consts = {
            "PAGE_SIZE": self.page_size,
            "KERNEL_VIRTUAL_BASE": self.kernel_virtual_base,
            "KERNEL_LOAD_ADDRESS": self.kernel_load_address,
            "KERNEL_VIRTUAL_START": self.kernel_virtual_start,
            "KERNEL_MAX_SIZE": self.kernel_max_size,
            "KERNEL_STACK_SIZE": self.kernel_stack_size,
            "RECURSIVE_SLOT": self.recursive_slot,
            "RECURSIVE_BASE": self.recursive_base,
            "RECURSIVE_PD": self.recursive_pd,
            "RECURSIVE_TOP": self.recursive_top,
            "FOREIGN_SLOT": self.foreign_slot,
            "FOREIGN_BASE": self.foreign_window.start,
            "FOREIGN_TOP": self.foreign_level_window(0),
            "FOREIGN_LEAF_ENTRIES": self.foreign_level_window(self.arch.levels - 1),
            "USER_HALF_END": self.user_half_end,
            "AS_MAX_SPACES": self.as_max_spaces,
            "TEMPMAP_BASE": self.tempmap_base,
            "TEMPMAP_SLOTS": self.tempmap_slots,
            "TEMPMAP_PTES": self.entry_address(self.tempmap_base, self.arch.levels - 1),
            "PMM_LOWEST": hw.LOW_MEMORY_END,
            "PMM_HIGHEST_END": FOUR_GIB - self.page_size,
            "PMM_RESERVED_INTERVALS": self.pmm_reserved_intervals,
            **self._pmm_bitmap_constants(),
            "VMM_BASE": self.vmm_base,
            "VMM_END": self.vmm_base + self.vmm_size,
            "VMM_PAGES": self.vmm_size // self.page_size,
            "VMM_FREE_SLOTS": self.vmm_free_slots,
            "VMM_ALLOC_SLOTS": self.vmm_alloc_slots,
            "VMM_NONE": self.vmm_none,
            "HEAP_SLAB_PAGES": self.heap_slab_pages,
            "HEAP_MIN_SHIFT": self.heap_min_shift,
            "HEAP_MAX_SHIFT": self.heap_max_shift,
            "HEAP_SLAB_HEADER": self.heap_slab_header,
            "HEAP_SLAB_MAGIC": self.heap_slab_magic,
            "HEAP_LARGE_SLOTS": self.heap_large_slots,
            "HEAP_MAX_SIZE": self.vmm_size,
            **self._user_constants(),
            # Seeded bugs: the templates wrap each in `.if NAME` (kgen/build/variants.py).
            **{variant.constant: int(variant.name in self.variants) for variant in VARIANTS},
            # The first page of the image, virtually below the kernel base: unmapped once the identity map is gone.
            "BOOT_FAULT_ADDRESS": self.kernel_load_address,
            "KERNEL_CS": self.kernel_cs,
            "KERNEL_DS": self.kernel_ds,
            "EXCEPTION_COUNT": hw.EXCEPTION_COUNT,
            "EXCEPTIONS_WITH_ERROR_CODE_MASK": hw.error_code_mask(),
            "MULTIBOOT_HEADER_FLAGS": self.multiboot_header_flags,
            "MULTIBOOT_HEADER_CHECKSUM": hw.multiboot_header_checksum(self.multiboot_header_flags),
            "BOOT_MMAP_MAX_ENTRIES": self.boot_mmap_max_entries,
            "BOOT_MMAP_ENTRY_SIZE": self.boot_mmap_entry_size,
            "BOOT_CMDLINE_MAX": self.boot_cmdline_max,
            "IRQ_BASE": self.irq_base,
            "IDT_VECTORS": self.irq_base + hw.PIC_IRQ_COUNT,
            **protocol.asm_constants(),
            # The call channel's UART, the serial port kgen/protocol.py gives it.
            "CALL_PORT": hw.COM_PORTS[protocol.CALL_SERIAL],
            "CALL_IRQ": hw.COM_IRQS[protocol.CALL_SERIAL],
            "MEMORY_BYTES": self.memory_bytes,
        }
        for name in ("PTE_P", "PTE_RW", "PTE_US", "PTE_PWT", "PTE_PCD", "PTE_A", "PTE_D", "PTE_PS", "PTE_G",
                     "PTE_FRAME_MASK", "CR0_PE", "CR0_WP", "CR0_PG", "CR4_PSE", "CR4_PGE",
                     "PAGE_SHIFT",
                     "PF_P", "PF_W", "PF_U", "PF_RSVD", "PF_I", "VECTOR_PAGE_FAULT",
                     "MULTIBOOT_HEADER_MAGIC", "MULTIBOOT_BOOTLOADER_MAGIC", "MULTIBOOT_FLAG_PAGE_ALIGN",
                     "MULTIBOOT_FLAG_MEMORY_INFO", "MULTIBOOT_FLAG_ADDRESSES", "MULTIBOOT_INFO_MEM", "MULTIBOOT_INFO_MMAP",
                     "MULTIBOOT_INFO_CMDLINE", "MULTIBOOT_MMAP_AVAILABLE", "MULTIBOOT_INFO_SIZE", "COM1_PORT",
                     "PIC1_COMMAND", "PIC1_DATA", "PIC2_COMMAND", "PIC2_DATA", "PIC_EOI", "PIC_IRQ_COUNT",
                     "UART_IER_RX_AVAILABLE", "UART_LSR_DATA_READY", "UART_LSR_TX_EMPTY",
                     "UART_LSR_TX_DONE", "UART_MCR_DTR_RTS_OUT2"):
            consts[name] = getattr(hw, name)
        consts.update(self._geometry_constants())
        consts.update(self._x86_64_constants() if self.arch.long_mode else self._i386_constants())
        return consts

    def _pmm_bitmap_constants(self) -> dict[str, int]:
        """The bitmap allocator's window and the frames it has bits for (none for the stack)."""
        if self.pmm_kind != "bitmap":
            return {}
        window = self.pmm_bitmap_window
        return {"PMM_BITMAP_BASE": window.start, "PMM_BITMAP_MAX_FRAMES": (window.end - window.start) * 8}

    def _geometry_constants(self) -> dict[str, int]:
        """The word size and the paging geometry, from the architecture record: what lets one template serve both
        word sizes. LEVELn_SHIFT is log2 of what an entry of level n (0 = top) maps; LEVELn_ENTRIES is where that
        level's entries appear through the recursive slot, so the entry mapping v at level n is at
        LEVELn_ENTRIES + ((v & VA_MASK) >> LEVELn_SHIFT) * ENTRY_SIZE."""
        arch = self.arch
        consts = {
            "WORD_SIZE": arch.word_size,
            "WORD_SHIFT": arch.word_shift,
            "ARCH_I386": int(not arch.long_mode),
            "ARCH_X86_64": int(arch.long_mode),
            # Features the templates ask instead of the architecture (kgen.arch.Arch).
            "HAS_NX": int(arch.has_nx),
            "NX_BIT": hw.PTE_NX.bit_length() - 1,      # XD, bit 63 of an entry
            "KERNEL_HALF_GENERATION": int(arch.kernel_half_generation),
            "CLIPS_RAM_AT_4G": int(arch.clips_ram_at_4g),
            "PAGING_LEVELS": arch.levels,
            "LEAF_LEVEL": arch.levels - 1,
            "ENTRY_SIZE": arch.entry_size,
            "ENTRY_SHIFT": arch.entry_size.bit_length() - 1,
            "TABLE_ENTRIES": arch.entries_per_table,
            "INDEX_MASK": arch.entries_per_table - 1,
            "VA_MASK": arch.va_mask,
            "VA_BITS": arch.va_bits,
            "LEAF_ENTRIES": self.level_window(arch.levels - 1),
            # An entry's flag bits, as a caller passes them: the low 12, and NX (bit 63) where entries have it.
            "PTE_FLAGS_MASK": hw.PAGE_SIZE - 1 | (hw.PTE_NX if arch.paging.nx_levels else 0),
            "LEAF_TABLE_SPAN": self.leaf_table_span,
            "KERNEL_HALF_START": self.kernel_half_start,
            "KERNEL_HALF_FIRST_SLOT": (self.kernel_half_start & arch.va_mask) >> arch.shift(0),
        }
        consts.update(self._exception_frame_constants())
        for level in range(arch.levels):
            consts[f"LEVEL{level}_SHIFT"] = arch.shift(level)
            consts[f"LEVEL{level}_ENTRIES"] = self.level_window(level)
            consts[f"FOREIGN_LEVEL{level}_ENTRIES"] = self.foreign_level_window(level)
        return consts

    def _exception_frame_constants(self) -> dict[str, int]:
        """Offsets in the frame exception_common builds (templates/interrupts.s), from its base (xbp) up: cr2; the
        general registers it saves, EXCEPTION_SAVED_REGISTERS of them (pushad's eight on i386; on x86_64, which has
        no pushad, the fifteen besides rsp); the stub's vector and error code; then the CPU's ip, cs and flags.
        One frame description serves the page-fault hand-off, the user-fault hand-off and the report's table."""
        word = self.arch.word_size
        saved = 8 if word == 4 else 15
        vector = (1 + saved) * word
        return {
            "EXCEPTION_SAVED_REGISTERS": saved,
            "EXC_CR2": 0,
            "EXC_REGISTERS": word,
            "EXC_VECTOR": vector,
            "EXC_ERROR": vector + word,
            "EXC_IP": vector + 2 * word,
            "EXC_CS": vector + 3 * word,
            "EXC_FLAGS": vector + 4 * word,
        }

    @property
    def user_cs(self) -> int:
        return self.arch.user_code_selector | hw.SELECTOR_RPL3

    @property
    def user_ds(self) -> int:
        return self.arch.user_data_selector | hw.SELECTOR_RPL3

    @property
    def task_killed_status(self) -> int:
        # What task_run returns for a task stopped by a fault (an exit status is the user's own word).
        return self.arch.word_mask

    @property
    def user_lazy_window(self) -> Region:
        return Region("user lazy range", "", 0, self.user_lazy_base, self.user_lazy_base + self.user_lazy_size)

    def _user_constants(self) -> dict[str, int]:
        # Ring 3: selectors, descriptors, the system-call gate and where a task's pages go (templates/task.s).
        return {
            "USER_CS": self.user_cs,
            "USER_DS": self.user_ds,
            "GDT_USER_CODE": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_CODE | hw.SEG_ACCESS_DPL3,
                                                   self.arch.code_segment_flags),
            "GDT_USER_DATA": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_DATA | hw.SEG_ACCESS_DPL3,
                                                   hw.SEG_FLAGS_32BIT_4K),
            "TASK_TSS": self.arch.tss_selector,
            "SEG_ACCESS_TSS32": hw.SEG_ACCESS_TSS32,
            "TSS32_SIZE": hw.TSS32_SIZE,
            "TSS_SP0": hw.TSS_SP0,
            "TSS32_SS0": hw.TSS32_SS0,
            "TSS32_IOMAP": hw.TSS32_IOMAP,
            "IDT_GATE_USER": self.arch.interrupt_gate | hw.IDT_GATE_DPL3,
            "SYSCALL_VECTOR": self.syscall_vector,
            "IDT_ENTRIES": self.syscall_vector + 1,
            "SYS_EXIT": 0x0,
            "SYS_WRITE": 0x1,
            "USER_EFLAGS": hw.EFLAGS_RESERVED,
            "USER_TEXT_BASE": self.user_text_base,
            "USER_LAZY_BASE": self.user_lazy_base,
            "USER_LAZY_END": self.user_lazy_base + self.user_lazy_size,
            "TASK_MAX": self.task_max,
            "TASK_RECORD_WORDS": self.task_record_words,
            "TASK_READY": self.task_ready,
            "TASK_EXITED": 0x2,
            "TASK_KILLED": 0x3,
            "TASK_KILLED_STATUS": self.task_killed_status,
            "SELECTOR_RPL3": hw.SELECTOR_RPL3,
            "MSR_STAR": hw.MSR_STAR,
            "MSR_LSTAR": hw.MSR_LSTAR,
            "MSR_FMASK": hw.MSR_FMASK,
            "EFER_SCE": hw.EFER_SCE,
            "SYSCALL_FLAGS_MASK": hw.EFLAGS_TF_IF_DF,
            # sysret loads CS = base + 16 and SS = base + 8 (RPL 3): the user data then code descriptors
            "SYSRET_BASE": (self.user_ds & ~hw.SELECTOR_RPL3) - 8,
            "USER_NULL_CALLS": self.user_null_calls,
        }

    def _i386_constants(self) -> dict[str, int]:
        return {
            "KERNEL_PDE_FIRST": self.kernel_pde_first,
            "KERNEL_PDE_COUNT": self.kernel_pde_count,
            "IDENTITY_PDE_FIRST": self.identity_pde_first,
            "BOOT_PAGE_TABLES": self.boot_page_tables,
            "TEMPMAP_PDE_INDEX": self.tempmap_pde_index,
            "TEMPMAP_OWN_TABLE": int(not self.tempmap_in_image_table),
            "GDT_KERNEL_CODE": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_CODE, hw.SEG_FLAGS_32BIT_4K),
            "GDT_KERNEL_DATA": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_DATA, hw.SEG_FLAGS_32BIT_4K),
            "IDT_GATE_INTERRUPT32": hw.IDT_GATE_INTERRUPT32,
        }

    def _x86_64_constants(self) -> dict[str, int]:
        return {
            "BOOT_TABLE_COUNT": self.boot_table_count,
            "PTE_FRAME_MASK": self.arch.paging.frame_mask,   # address bits 51..12 of a 64-bit entry
            "GDT_KERNEL_CODE": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_CODE, hw.SEG_FLAGS_64BIT_CODE),
            "GDT_KERNEL_DATA": hw.segment_descriptor(0, 0xFFFFF, hw.SEG_ACCESS_KERNEL_DATA, hw.SEG_FLAGS_32BIT_4K),
            "KERNEL_TSS": self.arch.tss_selector,
            "IDT_GATE_INTERRUPT64": hw.IDT_GATE_INTERRUPT64,
            "TSS64_SIZE": hw.TSS64_SIZE,
            "TSS64_IST1": hw.TSS64_IST1,
            "DOUBLE_FAULT_IST": 1,
            "VECTOR_DOUBLE_FAULT": hw.VECTOR_DOUBLE_FAULT,
            "SEG_ACCESS_TSS64": hw.SEG_ACCESS_TSS64,
            "CR4_PAE": hw.CR4_PAE,
            "MSR_EFER": hw.MSR_EFER,
            "EFER_LME": hw.EFER_LME,
            "EFER_NXE": hw.EFER_NXE,
            "CPUID_EXTENDED_MAX": hw.CPUID_EXTENDED_MAX,
            "CPUID_EXTENDED_FEATURES": hw.CPUID_EXTENDED_FEATURES,
            "CPUID_EDX_LONG_MODE": hw.CPUID_EDX_LONG_MODE,
            "CPUID_EDX_NX": hw.CPUID_EDX_NX,
            "PTE_NX_HIGH": 1 << 31,
            "KERNEL_PML4_FIRST": (self.kernel_virtual_start & self.arch.va_mask) >> self.arch.shift(0),
        }


# The fields that place or size each region, the one its Region names first: a rule two regions break names the
# key the user set (see _blame).
_PLACED_BY = {
    "kernel image window": ("kernel_max_size", "kernel_virtual_base", "kernel_load_address"),
    "boot identity window": ("kernel_load_address", "kernel_max_size"),
    "recursive window": ("paging_recursive_slot",),
    "temp-map window": ("tempmap_base", "tempmap_slots"),
    "vmm range window": ("vmm_base", "vmm_size"),
    "foreign window": ("paging_foreign_slot",),
    "pmm bitmap window": ("pmm_kind",),
}


def _fail(config: Config, key: str, value, rule: str):
    if isinstance(value, int) and not isinstance(value, bool):
        shown = show_int(value, decimal=key in DECIMAL_KEYS)
    else:
        shown = show_value(value)
    raise ConfigError(f"{config.source}: {key} = {shown}: {rule}")


def _blame(config: Config, *fields: str) -> str:
    """Of the fields whose values break a rule together, the one the message names: the first the user set
    (`Config.explicit`), since defaults alone obey every rule; the first when the user set none of them."""
    return next((f for f in fields if f in config.explicit), fields[0])


def _blame_largest(config: Config, *fields: str) -> str:
    """For a rule on a sum (start + size beyond a limit): the largest addend the user set, else the first field."""
    given = [f for f in fields if f in config.explicit]
    return max(given, key=lambda f: getattr(config, f)) if given else fields[0]


def _fail_on(config: Config, field: str, rule: str):
    _fail(config, Config.key_of(field), getattr(config, field), rule)


def compute(config: Config) -> Layout:
    """Check every rule that relates config values and return the layout; the first broken rule raises."""
    page = hw.PAGE_SIZE
    c = config
    arch = named(c.arch)
    entries = arch.entries_per_table
    top = 1 << arch.va_bits if arch.word_size == 4 else 1 << 64     # where the address space ends
    address_keys = (("kernel.virtual_base", c.kernel_virtual_base), ("tempmap.base", c.tempmap_base),
                    ("vmm.base", c.vmm_base))

    def aligned(field: str, value: int, alignment: int, what: str):
        if value % alignment:
            _fail(c, Config.key_of(field), value, f"must be aligned to {what} ({show_int(alignment)})")

    for key, value in address_keys:
        if value >= top:
            _fail(c, key, value, f"must be a {arch.name} virtual address (below {show_int(top)})")
        if not arch.is_canonical(value):
            _fail(c, key, value, f"is not canonical: bits 63..{arch.va_bits - 1} must all equal bit "
                  f"{arch.va_bits - 1} (x86_64 has {arch.va_bits}-bit virtual addresses)")
    if arch.boot_shares_tables:
        aligned("kernel_virtual_base", c.kernel_virtual_base, arch.span(0),
                "4 MiB, so the image's identity and higher-half mappings can share boot page tables")
    else:
        aligned("kernel_virtual_base", c.kernel_virtual_base, page, "a page")
    aligned("kernel_load_address", c.kernel_load_address, page, "a page")
    aligned("kernel_max_size", c.kernel_max_size, page, "a page")
    aligned("kernel_stack_size", c.kernel_stack_size, page, "a page")
    aligned("tempmap_base", c.tempmap_base, page, "a page")
    aligned("vmm_base", c.vmm_base, page, "a page")
    aligned("vmm_size", c.vmm_size, page, "a page")
    if c.vmm_size == 0:
        _fail(c, "vmm.size", 0, "must be at least one page")
    # The window's end is a constant of the kernel (VMM_END, compared with addresses in a register): it must be a
    # word, so the window ends below the top of the address space, never at it.
    vmm_end = c.vmm_base + c.vmm_size
    if vmm_end >= top or not arch.is_canonical(vmm_end - 1):
        blamed = "vmm_size" if c.vmm_size >= top else _blame(c, "vmm_size", "vmm_base")
        where = "within the canonical half it starts in, below 2**64" if arch.paging.canonical else "below 4 GiB"
        _fail_on(c, blamed, f"the vmm range window [{show_int(c.vmm_base)}, {show_int(vmm_end)}) must end {where} "
                 "(its end is a word of the kernel)")

    if c.kernel_load_address < hw.LOW_MEMORY_END:
        _fail(c, "kernel.load_address", c.kernel_load_address,
              f"must be at or above {show_int(hw.LOW_MEMORY_END)} (the first MiB holds BIOS data and VGA memory)")
    if c.kernel_virtual_base == 0:
        _fail(c, "kernel.virtual_base", 0, "must be above 0: the kernel lives in the higher half")
    if arch.kernel_half_at_base and c.kernel_virtual_base < I386_MIN_USER_HALF:
        _fail(c, "kernel.virtual_base", c.kernel_virtual_base,
              f"must be at least {show_int(I386_MIN_USER_HALF)}: the user half below it holds address spaces' user "
              "pages and user programs (1 GiB at least, Linux's lowest split)")
    if c.kernel_max_size == 0:
        _fail(c, "kernel.max_size", 0, "must be at least one page")
    if c.kernel_stack_size == 0:
        _fail(c, "kernel.stack_size", 0, "must be at least one page")
    if c.kernel_stack_size >= c.kernel_max_size:
        if _blame(c, "kernel_stack_size", "kernel_max_size") == "kernel_stack_size":
            _fail_on(c, "kernel_stack_size",
                     f"must be smaller than kernel.max_size ({show_int(c.kernel_max_size)}), which holds it")
        _fail_on(c, "kernel_max_size",
                 f"must be larger than kernel.stack_size ({show_int(c.kernel_stack_size)}), which it holds")
    image_end = c.kernel_load_address + c.kernel_max_size
    if image_end > min(c.kernel_virtual_base, FOUR_GIB):
        if {"kernel_load_address", "kernel_max_size"} & c.explicit or "kernel_virtual_base" not in c.explicit:
            blamed = _blame_largest(c, "kernel_load_address", "kernel_max_size")
        else:
            blamed = "kernel_virtual_base"
        _fail_on(c, blamed, f"the image window [{show_int(c.kernel_load_address)}, {show_int(image_end)}) must end "
                 f"below kernel.virtual_base ({show_int(c.kernel_virtual_base)}) and 4 GiB, to be identity-mapped at "
                 "boot")
    start = c.kernel_virtual_base + c.kernel_load_address
    if not arch.long_mode:
        if start + c.kernel_max_size > FOUR_GIB:
            _fail_on(c, _blame_largest(c, "kernel_virtual_base", "kernel_load_address", "kernel_max_size"),
                     f"the image window [{show_int(start)}, {show_int(start + c.kernel_max_size)}) would end beyond "
                     "4 GiB; lower kernel.virtual_base, kernel.load_address or kernel.max_size")
    elif start < TOP_2_GIB or start + c.kernel_max_size > top:
        # The base is what puts the window below the top 2 GiB; a size the user set is what pushes it past 2**64.
        blamed = "kernel_virtual_base"
        if start >= TOP_2_GIB and {"kernel_load_address", "kernel_max_size"} & c.explicit:
            blamed = _blame_largest(c, "kernel_max_size", "kernel_load_address")
        _fail_on(c, blamed, f"the image window [{show_int(start)}, {show_int(start + c.kernel_max_size)}) must lie "
                 f"in the top 2 GiB [{show_int(TOP_2_GIB)}, 2**64), where every kernel address is a sign-extended "
                 "32-bit value")
    if not 0 <= c.paging_recursive_slot < entries:
        _fail(c, "paging.recursive_slot", c.paging_recursive_slot,
              f"must be a {arch.paging.level_names[0]} index in 0..{entries - 1}")
    if not 0 <= c.paging_foreign_slot < entries:
        _fail(c, "paging.foreign_slot", c.paging_foreign_slot,
              f"must be a {arch.paging.level_names[0]} index in 0..{entries - 1}")
    if c.paging_foreign_slot == c.paging_recursive_slot:
        if _blame(c, "paging_foreign_slot", "paging_recursive_slot") == "paging_recursive_slot":
            _fail_on(c, "paging_recursive_slot", "must differ from paging.foreign_slot: one slot maps the current "
                     "space, the other a foreign one")
        _fail(c, "paging.foreign_slot", c.paging_foreign_slot,
              "must differ from paging.recursive_slot: one slot maps the current space, the other a foreign one")
    if not 0 <= c.paging_foreign_slot < entries:
        _fail(c, "paging.foreign_slot", c.paging_foreign_slot,
              f"must be a {arch.paging.level_names[0]} index in 0..{entries - 1}")
    if c.paging_foreign_slot == c.paging_recursive_slot:
        _fail(c, "paging.foreign_slot", c.paging_foreign_slot,
              "must differ from paging.recursive_slot: one slot maps the current space, the other a foreign one")
    if not 1 <= c.tempmap_slots <= entries:
        _fail(c, "tempmap.slots", c.tempmap_slots, f"must be in 1..{entries} (one page table)")
    tm_end = c.tempmap_base + c.tempmap_slots * page
    if tm_end > top:
        _fail(c, "tempmap.base", c.tempmap_base, f"the temp-map window would end beyond {show_int(top)}")
    span = arch.span(arch.levels - 2)
    if c.tempmap_base // span != (tm_end - 1) // span:
        _fail_on(c, _blame(c, "tempmap_base", "tempmap_slots"),
              f"the temp-map window [{show_int(c.tempmap_base)}, {show_int(tm_end)}) must lie within one "
              f"{span >> 20} MiB page table")
    if c.pmm_kind not in PMM_KINDS:
        _fail(c, "pmm.kind", c.pmm_kind, f"must be one of {', '.join(map(show_value, PMM_KINDS))}")
    for variant in VARIANTS:
        if getattr(c, variant.name) and variant.pmm_kind not in (None, c.pmm_kind):
            _fail(c, f"variant.{variant.name}", True, f"seeds its bug in the {variant.pmm_kind} allocator: set "
                  f"pmm.kind = {show_value(variant.pmm_kind)} too")
        if getattr(c, variant.name) and variant.arch not in (None, c.arch):
            _fail(c, f"variant.{variant.name}", True, f"seeds its bug in code only the {variant.arch} kernel has: "
                  f"build it with --arch {variant.arch}")
    if not MIN_MEMORY_MIB <= c.machine_memory_mib <= arch.max_memory_mib:
        _fail(c, "machine.memory_mib", c.machine_memory_mib,
              f"must be in {MIN_MEMORY_MIB}..{arch.max_memory_mib} ({arch.memory_limit_reason})")

    layout = Layout(
        arch=arch, page_size=page,
        kernel_virtual_base=c.kernel_virtual_base, kernel_load_address=c.kernel_load_address,
        kernel_max_size=c.kernel_max_size, kernel_stack_size=c.kernel_stack_size,
        recursive_slot=c.paging_recursive_slot, foreign_slot=c.paging_foreign_slot,
        tempmap_base=c.tempmap_base, tempmap_slots=c.tempmap_slots,
        memory_mib=c.machine_memory_mib, pmm_kind=c.pmm_kind,
        variants=frozenset(name for name in VARIANT_NAMES if getattr(c, name)),
        vmm_base=c.vmm_base, vmm_size=c.vmm_size,
    )

    kernel_half = layout.kernel_half_start
    for region in (r for r in layout.regions() if r not in (layout.kernel_window, layout.identity_window)):
        if region.start < kernel_half:
            which = "kernel.virtual_base" if arch.kernel_half_at_base else "the upper canonical half"
            placed_by = _PLACED_BY.get(region.name, ())
            if arch.kernel_half_at_base and "kernel_virtual_base" in c.explicit and not set(placed_by) & c.explicit:
                _fail_on(c, "kernel_virtual_base", f"the {region} must lie in the kernel half, at or above "
                         f"kernel.virtual_base: move the window or lower the base")
            _fail(c, region.key, region.value, f"the {region.name} must lie in the kernel "
                  f"half, at or above {which} ({show_int(kernel_half)})")
    regions = layout.regions()
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            if a.overlaps(b):
                # Named: the region the user placed (the later one when both or neither), by the key they set.
                a_set = set(_PLACED_BY.get(a.name, ())) & c.explicit
                b_set = set(_PLACED_BY.get(b.name, ())) & c.explicit
                moved, other = (a, b) if a_set and not b_set else (b, a)
                fields = _PLACED_BY.get(moved.name)
                if fields is None:
                    _fail(c, moved.key, moved.value, f"{moved} overlaps {other} (set by {other.key})")
                setters = ", ".join(Config.key_of(f) for f in _PLACED_BY.get(other.name, ())) or other.key
                _fail_on(c, _blame(c, *fields), f"{moved} overlaps {other} (set by {setters})")
    if c.vmm_size < layout.vmm_min_size:
        _fail_on(c, "vmm_size", f"must be at least {show_int(layout.vmm_min_size)}: the heap reserves "
                 f"{show_int(layout.heap_slab_pages * page)} of the vmm window for its slabs at boot, and vmm_alloc "
                 f"keeps {VMM_ROOM_TABLES} page tables' span ({show_int(VMM_ROOM_TABLES * layout.leaf_table_span)}) "
                 "beyond it")
    if layout.memory_bytes < layout.ram_needed:
        blamed = "machine_memory_mib"
        if "machine_memory_mib" not in c.explicit and {"kernel_load_address", "kernel_max_size"} & c.explicit:
            blamed = _blame_largest(c, "kernel_load_address", "kernel_max_size")
        boot_tables = f", {layout.vmm_init_tables} page tables made at boot" if layout.vmm_init_tables else ""
        _fail_on(c, blamed, f"guest RAM must reach {show_int(layout.ram_needed)} ({-(-layout.ram_needed // MIB)} "
                 f"MiB): the image window [{show_int(c.kernel_load_address)}, {show_int(image_end)}){boot_tables} and "
                 f"{RAM_ABOVE_IMAGE >> 20} MiB above it for page tables, the heap and kgen test")
    return layout
