"""Where the assembly's time goes, next to the fused graph of the same tasks.

    python benchmarks/runtime_breakdown.py --bundle runs/quickstart/bundle

For all of the bundle's tasks, at batch 1 and 64, timed taking turns (see
runtime.time_in_turns):
- fused             one ONNX graph of the trunk + all tasks (the floor)
- assembly          kfdeploy's call, probabilities (the default)
- assembly logits   the same, logits: without the softmax
- bare sessions     the assembly's own sessions called back to back from a plain loop:
                    what separate sessions cost with no kfdeploy code around them
- trunk alone, tasks alone   the two halves of the bare loop, each on its own
Prints the table and writes results/runtime-breakdown-cpu.json. Run it alone.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

import kfdeploy
from kfdeploy.bundle import Bundle
from kfdeploy.data import SpritesSource
from runtime import BATCHES, default_session, parse_arguments, time_in_turns


def main() -> None:
    args = parse_arguments(__doc__, seconds=3.0)

    bundle = Bundle.open(args.bundle)
    assembly = kfdeploy.load(bundle, log=lambda s: None)
    with tempfile.TemporaryDirectory() as work:
        fused = default_session(assembly.save_fused(Path(work) / "fused.onnx"))
    trunk, tasks = assembly._trunk, list(assembly._tasks.values())
    images = SpritesSource().heldout(64)[0].numpy()
    rows = []
    for batch in BATCHES:
        x = np.ascontiguousarray(images[:batch])
        common = trunk.run({"image": x})

        def bare_sessions():
            shared = trunk.run({"image": x})
            return [task.run({"image": x, "common": shared}) for task in tasks]

        seconds = time_in_turns({
            "fused": lambda: fused.run(None, {"image": x}),
            "assembly": lambda: assembly(x),
            "assembly logits": lambda: assembly(x, logits=True),
            "bare sessions": bare_sessions,
            "trunk alone": lambda: trunk.run({"image": x}),
            "tasks alone": lambda: [task.run({"image": x, "common": common}) for task in tasks],
        }, args.seconds)
        rows.append({"batch": batch, "tasks": len(tasks), "ms": {name: s * 1e3 for name, s in seconds.items()}})

    print(f"{len(tasks)} tasks; ms per call, and time relative to the fused graph")
    print(f"{'':>16}" + "".join(f"{'batch ' + str(r['batch']):>22}" for r in rows))
    for name in rows[0]["ms"]:
        print(f"{name:>16}" + "".join(f"{r['ms'][name]:>12.3f} ({r['ms'][name] / r['ms']['fused']:5.2f}x)" for r in rows))
    for r in rows:
        ms = r["ms"]
        print(f"batch {r['batch']}: kfdeploy's own work {ms['assembly logits'] - ms['bare sessions']:+.3f} ms, "
              f"softmax {ms['assembly'] - ms['assembly logits']:+.3f} ms, "
              f"trunk + tasks timed apart {(ms['trunk alone'] + ms['tasks alone']) / ms['fused']:.2f}x the fused graph")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runtime-breakdown-cpu.json"
    path.write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
