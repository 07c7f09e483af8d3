"""A mutation run: bugs a kernel developer writes, planted one at a time in kgen's templates, and the share of them
that `kgen test` alone -- what a user runs on the kernel -- turns red.

Each mutant changes one line of one template the way a slip changes it:

  omit       an instruction left out (a forgotten INVLPG, store, flag bit set, call, counter update)
  negate     a conditional jump testing the opposite condition
  boundary   a conditional jump off by one (jb <-> jbe, ja <-> jae, jl <-> jle, jg <-> jge)
  flag       one named paging flag (PTE_*) dropped from an expression, or replaced by 0
  constant   an immediate or shift count off by one
  swap       two neighbouring instructions in the other order (a TLB flush before the entry is written)

Pushes, pops, returns, unconditional jumps and the FRAME bookkeeping are never touched (their mutants crash at once
and say nothing about the checks), nor the code of a build variant (`.if VARIANT`, kgen/build/variants.py: bugs
seeded on purpose), nor templates/bench.s (`kgen bench` runs it, `kgen test` does not).

For each architecture a mutant is built with `kgen build` from a copy of the checkout; one whose ELF is the
unmutated kernel's, byte for byte, is *equivalent* (the line is not in this architecture's kernel, or assembles the
same), one that does not assemble is *stillborn*; the rest are run through `kgen test -x` under TCG: status 1 (or 4,
the kernel failed) is *killed*, 0 is *survived*. The share reported is killed / (killed + survived).

    python tests/mutation/mutate.py --sample 150 --seed 1 --report /tmp/mutants.json
    python tests/mutation/mutate.py --only paging.s:57:omit       # one mutant, for a survivor's post-mortem
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from kgen.build.variants import VARIANTS  # noqa: E402

ARCHES = ("i386", "x86_64")
SKIPPED_TEMPLATES = ("bench.s",)
VARIANT_CONSTANTS = frozenset(v.constant for v in VARIANTS)
# Instructions whose loss or reordering only wrecks the stack or the control flow at once: never mutated.
UNTOUCHED = frozenset({"push", "pop", "pushw", "popw", "drop", "frame", "ret", "iret", "iretd", "iretq", "jmp",
                       "pushfd", "popfd", "pushfq", "popfq", "hlt", "nop"})
NEGATED = {"je": "jne", "jne": "je", "jz": "jnz", "jnz": "jz", "jb": "jae", "jae": "jb", "ja": "jbe", "jbe": "ja",
           "jl": "jge", "jge": "jl", "jg": "jle", "jle": "jg", "jc": "jnc", "jnc": "jc", "js": "jns", "jns": "js",
           "jnb": "jb", "jnae": "jae"}
BOUNDARY = {"jb": "jbe", "jbe": "jb", "ja": "jae", "jae": "ja", "jl": "jle", "jle": "jl", "jg": "jge", "jge": "jg",
            "jnb": "ja", "jc": "jbe", "jnc": "ja"}
SHIFTS = frozenset({"shl", "shr", "sar", "sal", "rol", "ror"})
FLAG_READERS = re.compile(r"j(?!mp)\w+|set\w+|cmov\w+|adc|sbb|rcl|rcr")
FLAG_WRITERS = re.compile(r"cmp|test|add|sub|and|or|xor|inc|dec|neg|sh[lr]|sa[lr]|ro[lr]|bt[src]?|bs[fr]|cmpxchg")
# Instructions whose order against any neighbour matters (side effects beyond registers and flags).
ORDERED = frozenset({"call", "invlpg", "wrmsr", "rdmsr", "out", "in", "sti", "cli", "lgdt", "lidt", "ltr", "sysret",
                     "syscall", "int", "stosd", "stosq", "movsd", "movsq", "rep", "lock", "xchg", "mfence"})
REGISTER = re.compile(r"\b(?:[xer]?(ax|bx|cx|dx|si|di|bp|sp)|([abcd])[lh]|(cl)|r(\d+)[dwb]?|cr(\d))\b")
NUMBER = re.compile(r"(?<![\w.])(0x[0-9a-fA-F]+|\d+)(?![\w.])")
FLAG = re.compile(r"\bPTE_[A-Z0-9_]+\b")


@dataclass(frozen=True)
class Mutant:
    template: str       # path below templates/
    line: int           # 1-based
    operator: str
    original: str
    mutated: str        # the replacement line ("" for a line left out)
    next_line: int = 0  # swap: the other line (1-based), which takes `original`

    @property
    def name(self) -> str:
        return f"{self.template}:{self.line}:{self.operator}" + (f":{self.mutated.split()[0]}"
                                                                   if self.operator == "flag-drop" else "")

    def apply(self, lines: list[str]) -> list[str]:
        changed = list(lines)
        if self.operator == "swap":
            changed[self.line - 1], changed[self.next_line - 1] = lines[self.next_line - 1], lines[self.line - 1]
        else:
            changed[self.line - 1] = self.mutated
        return changed


def instruction(line: str) -> tuple[str, str] | None:
    """(mnemonic in lower case, operands) for an instruction or macro call line, None for anything else."""
    code = line.split("#", 1)[0].strip()
    if not code or code.startswith(".") or code.endswith(":") or ":" in code.split()[0]:
        return None
    mnemonic, _, operands = code.partition(" ")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", mnemonic):
        return None
    return mnemonic.lower(), operands.strip()


def registers(operands: str) -> set[str]:
    """The register families an instruction's operands name (xax, eax, rax, ax and al are one)."""
    found = set()
    for m in REGISTER.finditer(operands):
        fam, byte, cl, numbered, control = m.groups()
        found.add(fam or byte + "x" if (fam or byte) else "cx" if cl else f"r{numbered}" if numbered else f"cr{control}")
    return found


def bookkeeping(mnemonic: str, operands: str) -> bool:
    """The stack pointer's own arithmetic (arguments dropped after a call): an assembler routine's calling
    convention, which a compiler writes, not the kernel's author."""
    return mnemonic in ("add", "sub", "lea") and bool(re.match(r"[xer]sp\b", operands))


def dependent(first: tuple[str, str], second: tuple[str, str]) -> bool:
    """Whether swapping two neighbouring instructions can change what they do: they share a register or both touch
    memory, one sets the flags the other reads, or one has effects beyond registers and flags. Independent ones
    (two loads into different registers) swap into an equivalent program: not a mutant."""
    (m1, o1), (m2, o2) = first, second
    if {m1.split()[0], m2.split()[0]} & ORDERED or m1.isupper() or m2.isupper():
        return True
    if commute(first, second) or disjoint_moves(first, second):
        return False
    if registers(o1) & registers(o2) or ("[" in o1 and "[" in o2):
        return True
    reads = lambda m: bool(FLAG_READERS.fullmatch(m))     # noqa: E731
    writes = lambda m: bool(FLAG_WRITERS.fullmatch(m))    # noqa: E731
    return (reads(m1) and writes(m2)) or (writes(m1) and reads(m2))


def operands_of(operands: str) -> tuple[str, str]:
    dst, _, src = operands.partition(",")
    return dst.strip(), src.strip()


def commute(first: tuple[str, str], second: tuple[str, str]) -> bool:
    """`or eax, A` then `or eax, B` (or and/add/xor): the same operation into one register from sources that do
    not read it gives the same register either way."""
    (m1, o1), (m2, o2) = first, second
    (d1, s1), (d2, s2) = operands_of(o1), operands_of(o2)
    return (m1 == m2 and m1 in ("or", "and", "add", "xor") and d1 == d2 and "[" not in d1
            and not registers(d1) & (registers(s1) | registers(s2)))


def disjoint_moves(first: tuple[str, str], second: tuple[str, str]) -> bool:
    """Two `mov`s that touch different registers and, where both touch memory, different displacements off the
    same registers (two fields of one record): either order is the same program."""
    (m1, o1), (m2, o2) = first, second
    if m1 != "mov" or m2 != "mov":
        return False
    (d1, s1), (d2, s2) = operands_of(o1), operands_of(o2)
    memory = [x for x in (d1, s1, d2, s2) if "[" in x]
    if len(memory) == 2 and (memory[0] == memory[1] or registers(memory[0]) != registers(memory[1])):
        return False            # the same word, or two addresses that may alias
    written = [registers(d) if "[" not in d else set() for d in (d1, d2)]
    read = [registers(s) | (registers(d) if "[" in d else set()) for d, s in ((d1, s1), (d2, s2))]
    return not (written[0] & (read[1] | written[1]) or written[1] & read[0])


def mutable_lines(text: str) -> list[int]:
    """0-based indexes of the lines that may be mutated: instructions outside a build variant's `.if` branch and
    outside a macro whose body is a variant switch."""
    result, stack = [], []          # stack: per open .if, whether its live branch is a seeded bug
    for index, line in enumerate(text.splitlines()):
        code = line.split("#", 1)[0].strip()
        word = code.split()[0] if code else ""
        if word == ".if":
            stack.append(code.split()[1] in VARIANT_CONSTANTS if len(code.split()) == 2 else False)
        elif word == ".else":
            if stack:
                stack[-1] = False
        elif word == ".endif":
            if stack:
                stack.pop()
        elif not any(stack) and instruction(line) and instruction(line)[0] not in UNTOUCHED \
                and not bookkeeping(*instruction(line)):
            result.append(index)
    return result


def mutants_of(template: str, text: str) -> list[Mutant]:
    lines = text.splitlines()
    indent = lambda s: s[:len(s) - len(s.lstrip())]  # noqa: E731
    found: list[Mutant] = []
    mutable = mutable_lines(text)
    for index in mutable:
        line = lines[index]
        mnemonic, operands = instruction(line)
        code = line.split("#", 1)[0].rstrip()
        make = lambda op, new: Mutant(template, index + 1, op, line, new)  # noqa: E731
        found.append(make("omit", indent(line) + "# mutant: " + code.strip()))
        if mnemonic in NEGATED:
            found.append(make("negate", code.replace(mnemonic, NEGATED[mnemonic], 1)))
        if mnemonic in BOUNDARY:
            found.append(make("boundary", code.replace(mnemonic, BOUNDARY[mnemonic], 1)))
        for flag in dict.fromkeys(FLAG.findall(operands)):
            dropped = re.sub(rf"\s*\|\s*{flag}\b|\b{flag}\s*\|\s*", "", code, count=1)
            found.append(make("flag-drop", dropped if dropped != code else re.sub(rf"\b{flag}\b", "0", code)))
        immediate = operands.rsplit(",", 1)[-1].strip() if "," in operands else operands
        if "[" not in immediate and (mnemonic in SHIFTS or "," in operands):
            numbers = NUMBER.findall(immediate)
            if len(numbers) == 1:
                value = int(numbers[0], 0)
                changed = value + 1 if value <= 1 or index % 2 == 0 else value - 1
                head, _, tail = code.rpartition(immediate)
                found.append(make("constant", head + immediate.replace(numbers[0], hex(changed), 1) + tail))
        following = index + 1
        while following < len(lines) and not lines[following].strip():
            following += 1
        if following in mutable and dependent((mnemonic, operands), instruction(lines[following])):
            found.append(Mutant(template, index + 1, "swap", line, lines[following], following + 1))
    return found


def all_mutants(templates: Path) -> list[Mutant]:
    mutants = []
    for path in sorted(templates.rglob("*")):
        if path.suffix in (".s", ".inc") and path.name not in SKIPPED_TEMPLATES:
            mutants += mutants_of(str(path.relative_to(templates)), path.read_text())
    return mutants


# ---- running them ------------------------------------------------------------------------------------------------
def copy_checkout(into: Path) -> Path:
    """kgen, its templates and boot tree in a directory of their own: kgen finds templates/ beside its package."""
    for part in ("kgen", "templates", "boot"):
        shutil.copytree(ROOT / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def kgen(checkout: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgen.cli", *args], cwd=checkout, env=_env(checkout), text=True,
                          capture_output=True, timeout=timeout)


def _env(checkout: Path) -> dict:
    import os
    return {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": "0"}


def first_failure(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1].split("::")[-1]
    for line in stdout.splitlines()[::-1]:
        if line.startswith("kgen: "):
            return line[:160]
    return ""


def judge(checkout: Path, mutant: Mutant | None, arch: str, baseline: bytes | None, jobs: int,
          timeout: float) -> dict:
    """Build the mutant for `arch` and run `kgen test -x` on it. Returns the record of one run."""
    out = checkout / f"out-{arch}"
    record = {"mutant": mutant.name if mutant else "(none)", "arch": arch}
    if mutant:
        record |= {k: v for k, v in asdict(mutant).items() if k in ("template", "line", "operator", "original",
                                                                      "mutated")}
    path = checkout / "templates" / mutant.template if mutant else None
    text = path.read_text() if path else ""
    start = time.monotonic()
    try:
        if path:
            path.write_text("\n".join(mutant.apply(text.splitlines())) + "\n")
        built = kgen(checkout, "build", "--arch", arch, "--no-iso", "--out", str(out), timeout=120)
        if built.returncode != 0:
            return record | {"outcome": "stillborn", "why": (built.stderr.strip().splitlines() or [""])[-1][:200]}
        elf = (out / "kernel.elf").read_bytes()
        if baseline is not None and elf == baseline:
            return record | {"outcome": "equivalent"}
        try:
            run = kgen(checkout, "test", "--arch", arch, "--out", str(out), "-x", "-j", str(jobs), timeout=timeout)
        except subprocess.TimeoutExpired:
            return record | {"outcome": "timeout", "seconds": round(time.monotonic() - start, 1)}
        outcome = {0: "survived", 1: "killed", 4: "killed"}.get(run.returncode, f"status {run.returncode}")
        return record | {"outcome": outcome, "by": first_failure(run.stdout) if outcome == "killed" else "",
                         "why": "" if outcome in ("killed", "survived") else run.stderr.strip()[-300:],
                         "seconds": round(time.monotonic() - start, 1), "elf": elf if mutant is None else None}
    finally:
        if path:
            path.write_text(text)


def summary(records: list[dict]) -> str:
    lines = []
    for arch in ARCHES:
        mine = [r for r in records if r["arch"] == arch]
        if not mine:
            continue
        count = {o: sum(r["outcome"] == o for r in mine) for o in
                 ("killed", "survived", "equivalent", "stillborn", "timeout")}
        judged = count["killed"] + count["survived"]
        share = f"{100 * count['killed'] / judged:.0f}%" if judged else "-"
        lines.append(f"{arch}: kgen test caught {count['killed']} of {judged} mutants ({share}); "
                     f"{count['equivalent']} equivalent, {count['stillborn']} stillborn, {count['timeout']} timed out")
        by_op: dict[str, list[int]] = {}
        for r in mine:
            if r["outcome"] in ("killed", "survived"):
                by_op.setdefault(r["operator"], [0, 0])[r["outcome"] == "killed"] += 1
        lines.append("    " + ", ".join(f"{op} {k}/{s + k}" for op, (s, k) in sorted(by_op.items())))
        for r in mine:
            if r["outcome"] == "survived":
                lines.append(f"    survived {r['mutant']}: {r['original'].strip()!r} -> {r['mutated'].strip()!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=0, help="this many mutants, drawn with --seed (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--arch", choices=ARCHES, action="append", help="(repeatable; default: both)")
    parser.add_argument("--only", action="append", default=[], help="mutants whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("-j", type=int, default=2, help="kgen test -j (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one kgen test")
    parser.add_argument("--report", type=Path, help="write every record here (JSON), as the run goes")
    args = parser.parse_args(argv)
    mutants = all_mutants(ROOT / "templates")
    if args.only:
        mutants = [m for m in mutants if m.name.startswith(tuple(args.only))]
    if args.sample and args.sample < len(mutants):
        mutants = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: (m.template, m.line))
    if args.list:
        print("\n".join(f"{m.name}: {m.original.strip()!r} -> {m.mutated.strip()!r}" for m in mutants))
        return 0
    records: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # unwinds: the copy of the checkout goes too
    with tempfile.TemporaryDirectory(prefix="kgen-mutants-") as tmp:
        checkout = copy_checkout(Path(tmp))
        for arch in args.arch or ARCHES:
            clean = judge(checkout, None, arch, None, args.j, args.timeout)
            if clean["outcome"] != "survived":
                print(f"{arch}: the unmutated kernel does not pass kgen test: {clean['outcome']} "
                      f"{clean.get('by') or clean.get('why')}", file=sys.stderr)
                return 1
            baseline = clean.pop("elf")
            for number, mutant in enumerate(mutants, 1):
                record = judge(checkout, mutant, arch, baseline, args.j, args.timeout)
                record.pop("elf", None)
                records.append(record)
                print(f"[{arch} {number}/{len(mutants)}] {record['outcome']:10} {mutant.name} "
                      f"{record.get('by', '') or record.get('why', '')}", flush=True)
                if args.report:
                    args.report.write_text(json.dumps(records, indent=1))
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
