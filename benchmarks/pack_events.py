"""Pack the TensorBoard events of archived experiments: each `<experiment>/tensorboard/` under the given folders
becomes `<experiment>/tensorboard.tar.xz` (`raysdpb.report.load.pack_tensorboard`: a sixth of the size, the same
bytes for the same events, read by `python -m raysdpb.report` as the folder was).

    python benchmarks/pack_events.py benchmarks/results [DIR ...]

`quality.py --archive` packs what it archives; this packs archives written before it did, or copied in since."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raysdpb.report.load import pack_tensorboard  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    roots = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [Path("benchmarks/results")]
    before = after = packed = 0
    for root in roots:
        for folder in sorted(root.rglob("tensorboard")):
            if not folder.is_dir():
                continue
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            target = pack_tensorboard(folder.parent)
            before, after, packed = before + size, after + target.stat().st_size, packed + 1
    print(f"packed {packed} experiment(s): {before / 2**20:.2f} MiB of events in {after / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
