"""Conversions spread over a Ray cluster, part by part.

A parted conversion (``max_file_size``) is a plan of parts, each a pure function of the
input, the options and its index. :func:`convert` plans once on the driver (headers
only, no tensor bytes), runs one Ray task per part, spread over the nodes (each
:func:`modelconv.convert_part` with the GIL released and as many threads as the task has
CPUs), records what every task wrote in the output's journal, and commits: one :func:`modelconv.convert` with
``resume=True`` on the driver checks each part by its hash (XXH3-128, or its ETag in
object storage) and writes the manifest and ``metadata.json`` last. The parts are the
bytes the CLI writes with the same options, whichever machine wrote them::

    from modelconv import ConversionConfig
    from modelconv.distributed import convert

    r = convert("s3://models/llama-70b/", "s3://converted/llama-70b/",
                ConversionConfig(validate_output=False), max_file_size="5GB",
                address="auto", cpus_per_task=4)
    print(r.success, r.file_size_mb, [(t["file"], t["node"], t["seconds"]) for t in r.tasks])

What a worker needs: the ``modelconv`` package (``pip install 'modelconv[ray]'``), and
the source and output reachable under the same name as on the driver: a path on a shared
file system, or a URL (``hf://``, ``https://``, ``s3://``; the ``AWS_*``, ``HF_*``
environment set on the workers too). Only the source and output names, the part index
and the options travel to a task.

A task that fails because its worker died (killed, out of memory, its node lost) is run
again by Ray, up to ``max_retries`` times; a part is written atomically (a temp file
renamed, or a multipart upload completed), so a part written twice is the same bytes,
and the commit checks every part against what its task reported. An error of the
conversion itself (a malformed checkpoint) is not retried: that model's result reports
it. Ctrl-C cancels the remaining tasks and commits nothing; the parts already written are
kept, and running the same conversion again reuses them (a distributed conversion always
resumes: parts of the same plan are kept, parts of another plan are refused, ``force``
starts a local output over).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import (
    ConversionConfig,
    ConversionResult,
    Error,
    OptionError,
    PathLike,
    _call,
    _native,
    _progress,
    _result,
    convert as _convert,
    convert_part as _convert_part,
    plan as _plan,
)

__all__ = ["convert"]


def _part_task(source: str, output: str, index: int, model_type: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """One part, on a worker: its outcome, how long it took and where it ran."""
    import ray

    started = time.monotonic()
    outcome = _convert_part(source, output, index, model_type=model_type, **options)
    return {
        "outcome": outcome,
        "seconds": time.monotonic() - started,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }


def convert(
    source: Union[PathLike, Sequence[Tuple[PathLike, PathLike]]],
    output: Optional[PathLike] = None,
    config: Optional[ConversionConfig] = None,
    *,
    max_file_size: Union[int, str],
    model_type: str = "auto",
    address: Optional[str] = None,
    cpus_per_task: int = 1,
    max_retries: int = 3,
    runtime_env: Optional[Dict[str, Any]] = None,
    progress: Union[bool, Callable[[int, int], None]] = False,
    **options: Any,
) -> Union[ConversionResult, List[ConversionResult]]:
    """Converts ``source`` into ``output`` in parts of at most ``max_file_size`` (bytes,
    or ``"5GB"``), one Ray task per part, and commits them; returns the seed's
    :class:`~modelconv.ConversionResult` with ``tasks`` (per part: ``file``, ``node``,
    ``pid``, ``seconds``, ``status``).

    ``source`` may instead be a list of ``(source, output)`` pairs (a model zoo): the
    parts of every model are scheduled together, and a list of results comes back, one
    per model, in order (a failed model reports its error; the others are committed).

    ``config`` gives the options as :class:`~modelconv.ModelConverter` takes them
    (default: ``ConversionConfig(validate_output=False)``: verifying on the driver reads
    the whole output on one machine); keyword ``options`` override them. ``address`` is
    the cluster's (``ray.init(address=...)``; ``None`` starts a local one unless Ray is
    already initialised). Each task asks for ``cpus_per_task`` CPUs and converts with as
    many threads. ``runtime_env`` is Ray's, for the tasks (``{"env_vars": {...}}``
    carries credentials and endpoints to workers started without them).

    Raises :class:`~modelconv.OptionError` without Ray or for options a distributed
    conversion cannot take; ``KeyboardInterrupt`` cancels the tasks in flight.
    """
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the test venv installs ray
        raise OptionError("modelconv.distributed needs Ray: pip install 'modelconv[ray]'") from e
    if cpus_per_task < 1:
        raise OptionError("cpus_per_task must be at least 1")
    zoo = output is None
    jobs: List[Tuple[str, str]] = (
        [(os.fspath(s), os.fspath(o)) for s, o in source]  # type: ignore[union-attr]
        if zoo else [(os.fspath(source), os.fspath(output))]  # type: ignore[arg-type]
    )
    cfg = config or ConversionConfig(validate_output=False)
    opts: Dict[str, Any] = {**cfg._options(), **options, "max_file_size": max_file_size}
    force = bool(opts.pop("force", False))
    opts.pop("resume", None)
    task_opts = {k: v for k, v in opts.items() if k not in ("validate", "extract_tokenizer")}
    task_opts["threads"] = cpus_per_task

    # The plans, on the driver: headers only.
    plans = [_plan(src, model_type, **{k: v for k, v in task_opts.items() if k != "threads"}) for src, _ in jobs]
    # What each output can take (validate_output reads a local one back), and with force
    # the conversion there removed: the library decides, as for one machine.
    for _, out in jobs:
        _call(_native.prepare_parts, out, force=force, **opts)

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        started_ray = True
    try:
        # Spread over the nodes: a part loads its node's network and disks as much as
        # its CPUs, and Ray's default packs tasks onto the driver's node first.
        task = ray.remote(_part_task).options(num_cpus=cpus_per_task, max_retries=max_retries,
                                              retry_exceptions=False, runtime_env=runtime_env,
                                              scheduling_strategy="SPREAD")
        return _run(ray, task, jobs, plans, opts, model_type, task_opts, progress, zoo)
    finally:
        if started_ray:
            ray.shutdown()


def _run(ray: Any, task: Any, jobs: List[Tuple[str, str]], plans: List[Dict[str, Any]], opts: Dict[str, Any],
         model_type: str, task_opts: Dict[str, Any], progress: Union[bool, Callable[[int, int], None]],
         zoo: bool) -> Union[ConversionResult, List[ConversionResult]]:
    """Runs every part of every job as a task, then commits each job whose parts are in."""
    started = time.monotonic()
    refs: Dict[Any, Tuple[int, int, int]] = {}
    for j, ((src, out), p) in enumerate(zip(jobs, plans)):
        for k, part in enumerate(p["parts"]):
            refs[task.remote(src, out, k, model_type, task_opts)] = (j, k, int(part["source_bytes"]))
    total = sum(b for _, _, b in refs.values())
    done_bytes = 0
    done: List[Dict[int, Dict[str, Any]]] = [{} for _ in jobs]
    failed: List[Optional[str]] = [None for _ in jobs]
    callback, close = _progress(progress)
    pending = list(refs)
    try:
        if callback:
            callback(0, total)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            for r in ready:
                j, k, nbytes = refs[r]
                try:
                    done[j][k] = ray.get(r)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), Error) else e
                    failed[j] = failed[j] or str(cause)
                except ray.exceptions.RayError as e:
                    failed[j] = failed[j] or f"part {k + 1}: {e}"
                done_bytes += nbytes
                if callback:
                    callback(done_bytes, total)
    except KeyboardInterrupt:
        for r in pending:
            ray.cancel(r, force=True)
        raise
    finally:
        close()

    results = []
    for j, (src, out) in enumerate(jobs):
        if failed[j] is not None:
            results.append(ConversionResult(success=False, model_name=src, output_dir=out,
                                            conversion_time_sec=time.monotonic() - started,
                                            error_message=failed[j]))
            continue
        parts = [done[j][k] for k in sorted(done[j])]
        try:
            _call(_native.record_parts, out, json.dumps([t["outcome"] for t in parts]))
            report = _convert(src, out, model_type, resume=True, **opts)
        except Error as e:
            results.append(ConversionResult(success=False, model_name=src, output_dir=out,
                                            conversion_time_sec=time.monotonic() - started,
                                            error_message=str(e)))
            continue
        result = _result(report)
        result.conversion_time_sec = time.monotonic() - started
        result.tasks = [
            {"file": t["outcome"]["file"], "status": t["outcome"]["status"], "node": t["node"],
             "pid": t["pid"], "seconds": t["seconds"]}
            for t in parts
        ]
        results.append(result)
    return results if zoo else results[0]
