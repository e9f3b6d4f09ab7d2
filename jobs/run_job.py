"""The job driver: `python -m jobs.run_job SPEC_FILE` runs (or resumes) one job on the Ray cluster it is in.

This is the entrypoint of submitted Ray Jobs (RAY_ADDRESS is set there) and works on a laptop too (a local Ray).
Exit status: 0 every image made (invalid rows aside), 1 some images failed, 2 the spec, model or manifest is
unusable (the message says what to fix).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from schemas.errors import UserError

log = logging.getLogger("jobs.run_job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run_job", description=__doc__.splitlines()[0])
    parser.add_argument("spec_file", help="job spec (YAML or JSON)")
    parser.add_argument("--shard-rows", type=int, help="result rows per shard")
    parser.add_argument("--shard-seconds", type=float, help="commit waiting results at least this often")
    parser.add_argument("--progress-seconds", type=float, help="seconds between progress lines")
    parser.add_argument("--block-rows", type=int, help="manifest rows per block")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from jobs.pipeline import PipelineOptions, run_pipeline
        from jobs.run_cmd import format_progress
        from schemas.job import JobSpec

        spec = JobSpec.from_file(args.spec_file)
        overrides = {"shard_rows": args.shard_rows, "shard_seconds": args.shard_seconds,
                     "progress_seconds": args.progress_seconds, "block_rows": args.block_rows}
        options = PipelineOptions(**{k: v for k, v in overrides.items() if v is not None})
        log.info("job %s: %s -> %s", spec.job_id, spec.manifest, spec.output)
        result = run_pipeline(spec, options, on_progress=lambda p: log.info("%s", format_progress(p)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"summary": result.summary.model_dump(mode="json"), "output": result.output_uri}), flush=True)
    return 1 if result.summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
