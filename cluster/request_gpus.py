"""Ask the Ray autoscaler for GPU nodes and wait until they have joined.

A sweep sizes itself from the GPUs alive when it starts (GPU or CPU workers, how many trials
at once), and the GPU node types in cluster/ scale from zero, so bring the GPUs up first:

    python cluster/request_gpus.py 8 --per-node 4   # two 4-GPU nodes (or one 8-GPU node)
    python -m tvlars_ray.run grid --space paper-nowarmup --store s3://BUCKET/tvlars --address auto
    python cluster/request_gpus.py 0                # afterwards: idle GPU nodes may go

The request stays until replaced, so the nodes also survive the idle gaps between trials.
Run it on the cluster (`ray exec CONFIG "python ~/tvlars-ray/cluster/request_gpus.py 8"`, or
as a Ray job); it joins the running cluster (RAY_ADDRESS, else the local one).
"""

from __future__ import annotations

import argparse
import sys
import time


def bundles(gpus: int, per_node: int) -> list[dict[str, int]]:
    """The resource shapes to request: ``gpus`` GPUs in blocks of ``per_node`` on one node each."""
    if gpus < 0 or per_node < 1:
        raise ValueError(f"need gpus >= 0 and --per-node >= 1, got {gpus} and {per_node}")
    if gpus % per_node:
        raise ValueError(f"{gpus} GPUs do not split into nodes of {per_node}")
    return [{"GPU": per_node} for _ in range(gpus // per_node)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gpus", type=int, help="GPUs to hold (0 releases an earlier request)")
    p.add_argument("--per-node", type=int, default=4,
                   help="GPUs that must share a node: a trial's DDP workers (default: 4, as in "
                        "the paper spaces)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait (default: 1800)")
    p.add_argument("--address", default="auto", help="Ray cluster (default: auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shapes = bundles(args.gpus, args.per_node)
    except ValueError as exc:
        parser.error(str(exc))

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    if not shapes:
        request_resources(num_cpus=0)  # replaces (clears) any earlier request
        print("released the GPU request: idle GPU nodes go after the idle timeout")
        return 0
    request_resources(bundles=shapes)
    deadline = time.monotonic() + args.timeout
    while True:
        have = ray.cluster_resources().get("GPU", 0)
        print(f"{have:g} of {args.gpus} GPUs up", flush=True)
        if have >= args.gpus:
            return 0
        if time.monotonic() > deadline:
            print(f"timed out after {args.timeout:g} s: see `ray status` and the autoscaler log "
                  f"(/tmp/ray/session_latest/logs/monitor.*) for quota or capacity errors",
                  file=sys.stderr)
            return 1
        time.sleep(15)


if __name__ == "__main__":
    sys.exit(main())
