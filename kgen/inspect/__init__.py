"""`kgen inspect`: boot a kernel (kgen's, built from the config, or anyone's Multiboot ELF with --kernel), stop it
at its ready point and show what its memory is: the virtual address space by region, every physical frame's role,
the invariants, and with --va one translation step by step.

    model.py    collect(live) -> the document (a dict; docs/inspect.md is its schema)
    explain.py  one translation: entries, their physical and recursive addresses, which accesses fault
    text.py     the document as text for a terminal
    html.py     the document as one self-contained HTML page (`render_html(doc) -> str`)

The boot is `kgen test`'s (`kgen.harness.foreign.checked_kernel`, `kgen.harness.live.boot`), so the
"when to look" options of `kgen test --kernel` mean the same here. The machine is booted cold and shut down when
the document is made, whatever happens.
"""
from __future__ import annotations

import json
import sys

from kgen.arch import Arch
from kgen.errors import KernelFailed, UsageError
from kgen.guest.addrspaces import parse_spec
from kgen.guest.diagnose import RunFailed
from kgen.harness.bench import load_figures
from kgen.harness.foreign import checked_kernel
from kgen.harness.live import boot
from kgen.harness.outputs import check_report_path, write_report
from kgen.harness.run import require_kvm
from kgen.inspect.model import collect
from kgen.inspect.text import render_text, use_colour


def _html_renderer():
    """kgen.inspect.html.render_html, or a one-line refusal before anything boots."""
    try:    # imported here: the page needs jinja2, which a distribution's package may leave out; the rest does not
        from kgen.inspect.html import render_html
    except ImportError as err:
        raise UsageError(f"--html: the HTML page is not available in this installation ({err})") from None
    return render_html


def run(args) -> int:
    render_html = _html_renderer() if args.html is not None else None
    bench = None
    if getattr(args, "bench", None) is not None:
        if args.html is None:
            raise UsageError("--bench draws figures in the HTML page: give --html FILE as well")
        bench = load_figures(args.bench, "--bench")
    if args.html is not None:
        check_report_path("--html", args.html)
    kernel = checked_kernel(args)
    if args.va is not None:
        _check_va(kernel, args.va)
    if args.accel == "kvm":
        require_kvm()
    spaces = parse_spec(args.address_spaces, kernel.elf) if getattr(args, "address_spaces", None) else None
    try:
        with boot(kernel, args.accel, cold=True) as live:
            doc = collect(live, accel=args.accel, va=args.va, spaces=spaces)
    except RunFailed as err:
        print(err.details(), file=sys.stderr)
        raise KernelFailed(f"{kernel.elf_path.name} did not reach the point to look at: {err}") from None
    doc["bench"] = bench
    if args.html is not None:
        write_report(args.html, render_html(doc))
        print(f"kgen: wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(doc, indent=1))
    elif args.html is None:
        sys.stdout.write(render_text(doc, colour=use_colour(sys.stdout)))
    return 0


def _check_va(kernel, vaddr: int) -> None:
    """An address no CPU of this kernel's architecture can translate is refused before the boot."""
    arch = kernel.layout.arch if kernel.layout is not None else Arch.for_elf(kernel.elf)
    if not arch.is_canonical(vaddr):
        what = (f"not canonical: bits 63..{arch.va_bits - 1} must all equal bit {arch.va_bits - 1}"
                if arch.va_bits < 64 and arch.word_size == 8 else f"beyond the {arch.va_bits}-bit address space")
        raise UsageError(f"--va {vaddr:#x}: {what} ({arch.name}); give an address the CPU can translate")
