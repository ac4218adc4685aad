"""argparse types for the command line: a bad number or path stops the parse with one
line naming the flag, before any work (counts, positive numbers, fractions, comma-
separated image sizes, output paths in a folder that exists, GPU numbers)."""
import argparse
from pathlib import Path


def count(minimum):
    """argparse type: an integer of at least `minimum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _number(text, ok, wanted):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def positive(text):
    """argparse type: a number above 0."""
    return _number(text, lambda v: v > 0, "above 0")


def fraction(text):
    """argparse type: a number in [0, 1]."""
    return _number(text, lambda v: 0 <= v <= 1, "between 0 and 1")


def sizes(text):
    """argparse type: comma-separated image sizes, e.g. 256,384,512 -> [256, 384, 512]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes in pixels") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text}")
    return values


def output_path(text):
    """argparse type: a path to write, in a folder that exists."""
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} does not exist")
    return text


def gpu(text):
    """argparse type: a GPU number; Caffe's `-gpu all` (several GPUs in one process) is
    refused with how vggcaffe does it (one MPI rank per GPU)."""
    if text.strip().lower() == "all" or "," in text:
        raise argparse.ArgumentTypeError(f"{text!r}: one process drives one GPU here; for several, start one "
                                         f"rank per GPU: mpirun -np N vggcaffe train --solver S --gpu 0 "
                                         f"(rank r takes GPU r)")
    return count(0)(text)
