"""Which frames the CPU oracle's temp-map check writes and reads (kgen/harness/suite/test_oracles.py): frames of
the guest's RAM as QEMU placed it, never [0, memory size) (with 3.5 GiB or more that range has the PCI hole in it
and misses the RAM above 4 GiB). No VM: the windows are those `info mtree` gives for `-m 3584` on `pc`."""
from kgen.build.layout import FOUR_GIB
from kgen.harness.suite.test_oracles import TEMP_MAP_FRAMES, frames_across_ram
from kgen.machine import RamWindow

MIB = 1 << 20
PAGE = 0x1000
LOW, HIGH = 3072 * MIB, 512 * MIB
SPLIT = [RamWindow(0, 0xA0000, 0), RamWindow(0x100000, LOW, 0x100000), RamWindow(FOUR_GIB, FOUR_GIB + HIGH, LOW)]
IMAGE_END = 0x500000


def in_ram(frame, windows) -> bool:
    return any(w.start <= frame and frame + PAGE <= w.end for w in windows)


def test_frames_are_in_ram_on_both_sides_of_the_pci_hole_with_each_edge():
    frames = frames_across_ram(SPLIT, IMAGE_END, None)
    assert all(in_ram(f, SPLIT) and f % PAGE == 0 and f >= IMAGE_END for f in frames), [hex(f) for f in frames]
    # the first frame above the image, the last below the hole, the first and last above 4 GiB, and a spread
    assert {IMAGE_END, LOW - PAGE, FOUR_GIB, FOUR_GIB + HIGH - PAGE} <= set(frames)
    assert len([f for f in frames if f >= FOUR_GIB]) > 2 and len(frames) >= TEMP_MAP_FRAMES


def test_a_kernel_that_reaches_no_ram_above_4gib_gets_frames_below_it_only():
    frames = frames_across_ram(SPLIT, IMAGE_END, FOUR_GIB)
    assert frames and max(frames) == LOW - PAGE and all(in_ram(f, SPLIT) for f in frames)


def test_ram_in_one_window_gives_evenly_spread_frames():
    one = [RamWindow(0x100000, 128 * MIB, 0x100000)]
    frames = frames_across_ram(one, IMAGE_END, None)
    assert frames[0] == IMAGE_END and frames[-1] == 128 * MIB - PAGE and len(frames) == TEMP_MAP_FRAMES
