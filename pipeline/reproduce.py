"""`python -m pipeline.reproduce <model dir or run dir>`: rebuild an ablated model from its recorded provenance.

The ablate artifact beside the model (`<cache>/ablate/<key>/`) and the artifacts upstream of it each
hold a manifest with the stage's resolved config slice, seed, input digests (prompt files, the source
checkpoint's contents), library versions and the sha256 of every file. This tool composes the config
those slices describe, reruns the stages into a fresh cache, and reports, per stage, whether the cache
key is the same (same settings and inputs) and, per file, whether the sha256 matches; where it does not,
the largest difference over the file's tensors. Library-version drift is reported, never fatal.

Reproduced means every sha256 matches. Across machines float sums may be ordered differently: a
safetensors file whose tensors differ by at most `TOLERANCE` relative to their largest value counts as
reproduced within float round-off. Exit status 0: reproduced (exactly or within round-off), 1: not,
2: bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from pipeline import artifacts
from pipeline.errors import PipelineError

TOLERANCE = 1e-4
"""Largest |difference| / largest |value| of a tensor that still counts as float round-off."""


def lineage(cache_dir: Path, stage: str, key: str) -> dict[str, dict[str, Any]]:
    """{stage: its manifest} for `stage`/`key` and every artifact upstream of it, read from `cache_dir`."""
    manifests, pending = {}, [(stage, key)]
    while pending:
        name, entry = pending.pop()
        if name in manifests:
            continue
        manifest = artifacts.read_manifest(cache_dir / name / entry)
        if manifest is None:
            raise PipelineError(f"{cache_dir / name / entry} has no manifest.json; reproduction needs the cache "
                                "that built the model (its upstream artifacts' manifests)")
        manifests[name] = manifest
        pending.extend(manifest.get("upstream", {}).items())
    return manifests


def recorded_config(manifests: dict[str, dict[str, Any]], cache_dir: Path, seed: int):
    """The run config the manifests' slices describe, with the cache moved to `cache_dir`."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401  (registers the schema)
    from pipeline.paths import package_file

    slices = {key: value for manifest in manifests.values() for key, value in manifest["config"].items()}
    name = slices.get("model", {}).get("name")
    overrides = [f"model={name}"] if name and package_file(f"conf/model/{name}.yaml").is_file() else []
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    for key, value in sorted(slices.items()):
        OmegaConf.update(cfg, key, value, merge=isinstance(value, dict))
    OmegaConf.update(cfg, "cache.dir", str(cache_dir))
    OmegaConf.update(cfg, "cache.models", str(cache_dir / "models"))
    OmegaConf.update(cfg, "run.seed", seed)
    OmegaConf.update(cfg, "run.progress", False)
    return cfg


def largest_difference(old: Path, new: Path) -> str:
    """The largest tensor difference between two safetensors files, relative to the tensor's largest value."""
    from safetensors import safe_open

    worst, where = 0.0, ""
    with safe_open(str(old), framework="pt") as a, safe_open(str(new), framework="pt") as b:
        if set(a.keys()) != set(b.keys()):
            return "different tensor names"
        for name in a.keys():
            x, y = a.get_tensor(name).double(), b.get_tensor(name).double()
            if x.shape != y.shape:
                return f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-30)
            relative = float((x - y).abs().max()) / scale if x.numel() else 0.0
            if relative > worst:
                worst, where = relative, name
    verdict = "within float round-off" if worst <= TOLERANCE else "NOT within tolerance"
    return f"largest difference {worst:.3g} of the tensor's max |value| in {where or '-'} ({verdict})"


def compare(old_dir: Path, new_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], bool]:
    """Per-file lines for one stage and whether it reproduced."""
    lines, ok = [], True
    for name, digest in sorted(old["files"].items()):
        theirs = new["files"].get(name)
        if theirs == digest:
            lines.append(f"  {name}: sha256 matches")
        elif theirs is None:
            lines.append(f"  {name}: missing from the rerun")
            ok = False
        elif name.endswith(".safetensors"):
            detail = largest_difference(old_dir / name, new_dir / name)
            ok = ok and "NOT" not in detail and "different" not in detail and "shape" not in detail
            lines.append(f"  {name}: sha256 differs, {detail}")
        else:
            lines.append(f"  {name}: sha256 differs")
            ok = False
    return lines, ok


def reproduce(target: Path, work: Path) -> tuple[list[str], bool]:
    from pipeline.chat import model_dir
    from pipeline.runner import Runner, code_commit, library_versions
    from pipeline.stages import registry

    ablate_dir = model_dir(target).resolve().parent
    manifest = artifacts.read_manifest(ablate_dir)
    if manifest is None or manifest.get("stage") != "ablate":
        raise PipelineError(f"{ablate_dir} is not an ablate artifact (no ablate manifest.json beside the model)")
    old_cache = ablate_dir.parent.parent
    manifests = lineage(old_cache, "ablate", manifest["key"])
    cfg = recorded_config(manifests, work, int(manifest.get("seed", 0)))
    runner = Runner(cfg, registry(), cache_dir=work, model_store=work / "models")
    results = runner.run(["ablate"])
    lines, reproduced = [], True
    for stage in (name for name in registry() if name in manifests):
        old = manifests[stage]
        result = results[stage]
        new = artifacts.read_manifest(result.dir) or {"files": {}}
        same_key = "same cache key" if result.key == old["key"] else f"cache key {old['key']} -> {result.key} (settings or inputs differ)"
        lines.append(f"{stage}: {same_key}")
        stage_lines, ok = compare(old_cache / stage / old["key"], result.dir, old, new)
        lines += stage_lines
        reproduced = reproduced and ok
    now = library_versions()
    drift = sorted({f"{lib} {version} -> {now.get(lib)}" for old in manifests.values()
                    for lib, version in old.get("libraries", {}).items() if now.get(lib) != version})
    commits = sorted({old.get("code_commit", "unknown") for old in manifests.values()})
    now_commit = code_commit()
    if commits != [now_commit]:
        lines.append(f"pipeline code: recorded {', '.join(commits)}, now {now_commit} (a code change can change keys and files)")
    lines.append("package versions: " + ("; ".join(drift) + " (reported, not fatal)" if drift else "same as recorded"))
    lines.append("reproduced: every sha256 matches" if reproduced and all("matches" in line for line in lines if line.startswith("  "))
                 else "reproduced within float round-off" if reproduced else "NOT reproduced")
    return lines, reproduced


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the ablated model directory (or a run folder that links it)")
    parser.add_argument("--work-dir", type=Path, help="the fresh cache to rebuild into (default: a temporary directory)")
    args = parser.parse_args(argv)
    try:
        if not args.path.exists():
            raise PipelineError(f"{args.path} does not exist; pass the ablated model directory or its run folder")
        if args.work_dir is not None:
            if args.work_dir.exists() and any(args.work_dir.iterdir()):
                raise PipelineError(f"--work-dir {args.work_dir} is not empty; reproduction needs a fresh cache")
            lines, ok = reproduce(args.path, args.work_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="pipeline-reproduce-") as work:
                lines, ok = reproduce(args.path, Path(work))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
