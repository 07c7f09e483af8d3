"""The build variants: kernels broken on purpose, one seeded bug each, so the tests can prove they catch it.

This list is the only place a variant is named. The config's `[variant]` table takes one key per entry and the
Config one boolean field (kgen/build/config.py); the layout hands each to the templates as the constant NAME in
capitals (kgen/build/layout.py), 1 when the bug is seeded, so a template wraps the broken code in `.if NAME`; and
tests/kernel/test_variants.py builds every entry and runs the stage named here. Every variant is named for the bug it
seeds and is off by default: no constant means "the correct code" when it is 1.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str         # the [variant] key and the Config field
    bug: str          # what the kernel does wrong with it on (the config's comment)
    caught_by: str    # the stage of `kgen test` (a -k expression) that must see the bug on its own
    pmm_kind: str | None = None     # the frame allocator (pmm.kind) whose template holds the bug; None: any
    arch: str | None = None         # the architecture whose kernel has the code it breaks; None: both

    @property
    def constant(self) -> str:
        """The template constant: 1 when the bug is built in, else 0."""
        return self.name.upper()


VARIANTS: tuple[Variant, ...] = (
    Variant("fault_at_boot", "touch an unmapped page right after boot", "invariants"),
    Variant("aspace_skip_foreign_flush", "change the foreign slot without flushing the TLB", "address_spaces"),
    Variant("aspace_switch_user_window", "leave the space as_switch leaves with a user-accessible recursive window "
            "until it runs again", "as_switch"),
    Variant("tempmap_skip_invlpg", "remap temp-map slots without INVLPG", "temp_map"),
    Variant("vmm_skip_table_clear", "leave new page tables uncleared", "page_tables"),
    Variant("vmm_unmap_skip_invlpg", "unmap pages without INVLPG", "tlb"),
    Variant("vmm_table_user", "give a new table's entry one level up U/S", "page_tables"),
    Variant("vmm_map_wrong_index", "write vmm_map's PTE one entry too far", "page_tables"),
    Variant("pmm_double_push", "let pmm_free push the frame already on top", "double_free", pmm_kind="stack"),
    Variant("vrange_bad_merge", "merge a released range into the next free one wrongly", "merge"),
    Variant("heap_small_block", "serve kmalloc from blocks one class too small", "heap"),
    Variant("pmm_free_at_skip_invlpg", "free mapped frames (vmm_free, kfree) without INVLPG", "tlb"),
    Variant("pmm_bitmap_free_keeps_bit", "let the bitmap's pmm_free count the frame free but leave its bit set",
            "double_free", pmm_kind="bitmap"),
    Variant("vmm_protect_skip_invlpg", "narrow a page's rights (read-only, NX) without INVLPG", "narrowed"),
    Variant("tempmap_unmap_skip_invlpg", "give temp-map slots back without INVLPG", "temp_map"),
    Variant("aspace_detach_skip_flush", "empty the foreign slot (as_detach) without flushing the TLB",
            "address_spaces"),
    Variant("aspace_map_in_past_user_half", "let vmm_map_in map the first page past the user half", "user_half_edge"),
    Variant("vmm_alloc_keep_on_oom", "keep what an eager vmm_alloc took when it runs out of memory", "exhausted"),
    Variant("heap_double_free_unchecked", "let kfree take back a block freed before", "heap_pages_are_nx"),
    Variant("pmm_below_1mib", "count the memory map's RAM below 1 MiB as free frames", "pmm_totals",
            pmm_kind="stack"),
    Variant("user_text_writable", "map a user program's text writable", "ring_3"),
    Variant("translate_offset_low_bits", "keep only the low 9 bits of the page offset in vmm_translate (right "
            "below 0x200)", "page_tables"),
    Variant("translate_large_page_small_offset", "translate inside a large page with a 4 KiB page's offset (right "
            "in its first 4 KiB)", "large_pages"),
    Variant("heap_pages_executable", "map heap pages without NX", "heap_pages_are_nx", arch="x86_64"),
    Variant("kernel_pde_generation_kept", "make a kernel-half page table without moving vmm_kernel_pde_generation "
            "(other spaces keep their stale kernel half)", "kernel_table_made", arch="i386"),
)
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)
