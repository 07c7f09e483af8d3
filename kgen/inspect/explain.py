"""One virtual address explained the way the MMU resolves it: at each level the index, the entry's physical
address and the virtual address at which the kernel itself reaches that entry through its recursive slot, the
entry decoded, where it leads; then the frame, and which accesses would fault and why.

The walk is the `Walker`'s (`Walker.walk`: the entries it read, also where it stops at a not-present one); the
recursive address is `Arch.entry_address` (kgen's layout: `Layout.entry_address`), the formula the kernel's
`ENTRY_OF` macro assembles. Nothing is re-derived here.
"""
from __future__ import annotations

from kgen.arch import ARCHES, hw
from kgen.errors import UsageError
from kgen.guest.invariants import GuestView
from kgen.guest.pagewalk import PTE_NX, PTE_P, PTE_RW, PTE_US, Walker

_FLAG_NAMES = ((hw.PTE_PWT, "PWT"), (hw.PTE_PCD, "PCD"), (hw.PTE_A, "A"), (hw.PTE_D, "D"), (hw.PTE_PS, "PS"),
               (hw.PTE_G, "G"), (PTE_NX, "NX"))


def decode(entry: int) -> str:
    """"P RW S A" for an entry: present, writable or read-only (R), user (U) or supervisor (S), then the rest."""
    if not entry & PTE_P:
        return "not present"
    words = ["P", "RW" if entry & PTE_RW else "R", "U" if entry & PTE_US else "S"]
    return " ".join(words + [name for bit, name in _FLAG_NAMES if entry & bit])


def recursive_slot(view: GuestView, walker: Walker) -> int | None:
    """The top-level slot the kernel reaches its tables through: the layout's, else the first self-reference."""
    if view.layout is not None:
        return view.layout.recursive_slot
    windows = walker.recursive_windows()
    return windows[0].slot if windows else None


def entry_virtual(view: GuestView, walker: Walker, vaddr: int, level: int) -> int | None:
    """Where the kernel reads the entry that maps `vaddr` at `level`, through its recursive slot; None without one
    or in a paging mode no architecture record describes (PAE)."""
    slot = recursive_slot(view, walker)
    arch = next((a for a in ARCHES.values() if a.paging == walker.mode), None)
    if slot is None or arch is None:
        return None
    if view.layout is not None:
        return view.layout.entry_address(vaddr, level)
    return arch.entry_address(slot, vaddr, level)


def check_address(view: GuestView, vaddr: int) -> None:
    mode = view.mode
    if not mode.contains(vaddr):
        why = (f"not canonical: bits 63..{mode.va_bits - 1} must all equal bit {mode.va_bits - 1}"
               if mode.canonical else f"beyond the {mode.va_bits}-bit address space")
        raise UsageError(f"--va {vaddr:#x}: {why} ({mode.name} paging); give an address the CPU can translate")


def explain_translation(view: GuestView, walker: Walker | None, vaddr: int, *, walk_error: str | None = None) -> dict:
    """`walk_error`: why there is no walker although paging is on (tables the walker cannot follow)."""
    names = view.mode.level_names
    result = {"va": f"{vaddr:#x}", "steps": [], "phys": None, "fault": None, "explanation": [], "access": []}
    if walker is None and view.regs.cr0 & hw.CR0_PG:
        check_address(view, vaddr)
        result["fault"] = walk_error or "the page tables cannot be walked"
        result["explanation"].append(result["fault"])
        return result
    if walker is None:
        result["explanation"].append(f"paging is off (CR0={view.regs.cr0:#x}): {vaddr:#x} is a physical address")
        result["phys"] = f"{vaddr:#x}"
        return result
    check_address(view, vaddr)
    chain, t = walker.walk(vaddr)
    bad = walker.malformed_at(vaddr) if t is None else None     # the walk stopped at an entry the CPU refuses
    mode = walker.mode
    top = names[0]
    tables = {walker.top} | {frame for _, frame in walker.page_tables()}
    slot = recursive_slot(view, walker)
    indices = []
    for level, ref in enumerate(chain):
        base = ref.addr - ref.index * mode.entry_size
        present = bool(ref.value & PTE_P)
        leaf = t is not None and level == len(chain) - 1
        nxt = None
        notes = []
        if base == walker.top and level > 0:
            notes.append(f"this {names[level]} is the {top} itself")
        if bad is not None and level == len(chain) - 1:
            notes.append(f"malformed: {bad.why}")
        elif present:
            size = 1 << mode.shift(level) if leaf else 0
            nxt = ref.value & mode.frame_mask & ~((size or hw.PAGE_SIZE) - 1)
            if nxt == walker.top:
                notes.append(f"points back at the {top} (the recursive slot)" if level == 0 else
                             f"points at the {top} again")
            if leaf:
                notes.append(f"maps a {_size(size)} page" + (f" at frame {nxt:#x}" if nxt != walker.top else ""))
        else:
            notes.append(f"not present: every access to {vaddr:#x} faults (#PF, error code P=0)")
        indices.append(f"{names[level]} {ref.index}")
        virt = entry_virtual(view, walker, vaddr, level)
        result["steps"].append({
            "level": mode.levels - level, "table": names[level], "index": ref.index,
            "entry_phys": f"{ref.addr:#x}", "entry_virt": None if virt is None else f"{virt:#x}",
            "entry": f"{ref.value:#0{2 * mode.entry_size + 2}x}", "flags": decode(ref.value),
            "next": None if nxt is None else f"{nxt:#x}", "note": "; ".join(notes),
        })
    lines = result["explanation"]
    lines.append(f"{vaddr:#x}: " + ", ".join(indices)
                 + (f"; the entries as the kernel reads them through {top}[{slot}] (recursive slot)"
                    if slot is not None else "; no recursive slot: the kernel has no virtual address for its "
                                            "entries through one"))
    if t is None:
        last = chain[-1]
        if bad is not None:
            result["fault"] = (f"malformed entry at level {mode.levels - len(chain) + 1} ({last.table}): {last} = "
                               f"{last.value:#x}: {bad.why}; {bad.fault}")
        else:
            result["fault"] = (f"not present at level {mode.levels - len(chain) + 1} ({last.table}): {last} = "
                               f"{last.value:#x}")
        lines.append(f"any access faults: {result['fault']}")
        return result
    result["phys"] = f"{t.paddr:#x}"
    frame = t.paddr & ~(hw.PAGE_SIZE - 1)
    returns = sum(1 for s in result["steps"] if s["next"] == f"{walker.top:#x}")
    if frame == walker.top:
        lines.append(f"{vaddr:#x} maps the {top} itself: reached through {top}[{slot}] "
                     f"{_times(returns)}, the frame is the {top} {walker.top:#x} (CR3)"
                     if slot is not None and all(r.index == slot for r in chain) else
                     f"{vaddr:#x} maps the {top} itself, frame {walker.top:#x} (CR3)")
    elif frame in tables:
        lines.append(f"{vaddr:#x} shows a page table (frame {frame:#x}) as a page: through the recursive window "
                     f"the kernel reads and writes it here")
    else:
        lines.append(f"{vaddr:#x} -> physical {t.paddr:#x} ({_size(t.size)} page, effective rights "
                     f"{decode(t.attrs)})")
    result["access"] = access_rights(view, walker, chain, t.attrs)
    lines += [f"{a['access']}: " + (f"faults: {a['why']}" if a["faults"] else "allowed" +
                                    (f" ({a['why']})" if a["why"] else "")) for a in result["access"]]
    return result


def access_rights(view: GuestView, walker: Walker, chain, attrs: int) -> list[dict]:
    """Each kind of access to a present page, whether the CPU allows it, and the entry or register that decides."""
    mode = walker.mode
    wp = bool(view.regs.cr0 & hw.CR0_WP)
    nx = bool(mode.nx_levels) and walker.nxe
    smep, smap = bool(view.regs.cr4 & hw.CR4_SMEP), bool(view.regs.cr4 & hw.CR4_SMAP)
    rights = [(level, ref) for level, ref in enumerate(chain) if level in mode.rights_levels]
    no_user = next((ref for _, ref in rights if not ref.value & PTE_US), None)
    no_write = next((ref for _, ref in rights if not ref.value & PTE_RW), None)
    no_exec = next((ref for level, ref in enumerate(chain) if level in mode.nx_levels and ref.value & PTE_NX),
                   None) if nx else None
    user_page = attrs & PTE_US

    def row(access: str, why: str | None, ok_note: str | None = None) -> dict:
        return {"access": access, "faults": why is not None, "why": why if why is not None else ok_note}

    kernel_write = None
    note = None
    if no_write is not None:
        if wp:
            kernel_write = f"write to a read-only page with CR0.WP set ({no_write} has R/W clear)"
        else:
            note = f"read-only ({no_write}), but CR0.WP is clear: supervisor writes ignore it"
    supervisor_user = "SMAP: a supervisor access to a user page (CR4.SMAP, EFLAGS.AC clear)" \
        if smap and user_page else None
    return [
        row("kernel read", supervisor_user),
        row("kernel write", supervisor_user or kernel_write, note),
        row("kernel fetch", f"NX: {no_exec} has XD set" if no_exec is not None else
            ("SMEP: a supervisor fetch from a user page (CR4.SMEP)" if smep and user_page else None),
            None if nx else "no NX in this paging mode: every present page is executable"),
        row("user read", f"user access to a supervisor page ({no_user} has U/S clear)" if no_user else None),
        row("user write", f"user access to a supervisor page ({no_user} has U/S clear)" if no_user else
            f"write to a read-only page ({no_write} has R/W clear; user writes always honour it)"
            if no_write else None),
        row("user fetch", f"user access to a supervisor page ({no_user} has U/S clear)" if no_user else
            f"NX: {no_exec} has XD set" if no_exec is not None else None),
    ]


def _size(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB" if size >= 1 << 20 else \
        f"{size >> 10} KiB"


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
